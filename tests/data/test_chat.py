"""Chat records (messages, sharegpt, alpaca; JSONL, JSON, parquet): the chat template renders them, the loss
covers the assistant turns exactly, and bad records are named by file and line before any tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config.data import DataConfig, DataError
from pipelines.data import dataset as data_mod
from pipelines.data.dataset import IGNORE_INDEX, cache_path, load_datasets
from pipelines.models.tokenizer import build_byte_tokenizer

IM_END = "<|im_end|>"
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "grass?"}]},
    {"role": "assistant", "content": "Green."},
]


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def cfg_for(tmp_path, train, **kw) -> DataConfig:
    return DataConfig(train=train, cache_dir=str(tmp_path / "cache"), eval_fraction=0, **kw)


def expected(tok) -> tuple[list[int], list[int]]:
    """CONVERSATION in the presets' ChatML template, written out by hand: (ids, labels). Independent of the
    renderer: pieces marked True are what the assistant says, its end-of-turn token included."""
    pieces = [
        ("<s><|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nColour of the sky?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Blue.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd grass?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Green.<|im_end|>", True),
        ("\n", False),
    ]
    ids, labels = [], []
    for text, learn in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learn else [IGNORE_INDEX] * len(piece)
    return ids, labels


# ---------------------------------------------------------------- the loss mask
def test_labels_are_exactly_the_assistant_turns(tmp_path, tok):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    [ex], _ = load_datasets(cfg_for(tmp_path, train), tok, seed=0)
    ids, labels = expected(tok)
    assert ex["input_ids"].tolist() == ids
    assert ex["labels"].tolist() == labels
    learned = ex["labels"] != IGNORE_INDEX
    assert tok.decode(ex["input_ids"][learned]) == f"Blue.{IM_END}Green.{IM_END}"
    end = tok.convert_tokens_to_ids(IM_END)
    assert (ex["labels"] == end).sum() == 2 and (ex["input_ids"] == end).sum() == 5  # only the assistant's ends


@pytest.mark.parametrize("max_length", [70, 73, 90, 106, 110, 200])  # in/after answer 1, in/after answer 2
def test_truncation_keeps_the_mask_aligned(tmp_path, tok, max_length):
    ids, labels = expected(tok)
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    [ex], _ = load_datasets(cfg_for(tmp_path, train, max_length=max_length), tok, seed=0)
    assert ex["input_ids"].tolist() == ids[:max_length]
    assert ex["labels"].tolist() == labels[:max_length]


def test_a_record_cut_before_any_answer_is_dropped(tmp_path, tok):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    examples, _ = load_datasets(cfg_for(tmp_path, train, max_length=45), tok, seed=0)
    assert len(examples) == 1  # the system prompt pushes record 1's first answer past 45 tokens
    assert examples[0]["labels"].ne(IGNORE_INDEX).sum() == len("Blue.") + 1


def test_loss_on_all_labels_every_token_and_keys_the_cache(tmp_path, tok):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    cfg = cfg_for(tmp_path, train)
    [ex], _ = load_datasets(cfg, tok, seed=0, loss_on="all")
    assert torch.equal(ex["labels"], ex["input_ids"])
    assert cache_path(cfg, train, tok, loss_on="all") != cache_path(cfg, train, tok, loss_on="assistant")
    [again], _ = load_datasets(cfg, tok, seed=0)  # the other cache file, not the loss_on="all" one
    assert again["labels"].tolist() == expected(tok)[1]
    with pytest.raises(DataError, match=r"train\.loss_on = 'prompt': use one of assistant, all"):
        load_datasets(cfg, tok, seed=0, loss_on="prompt")


# ---------------------------------------------------------------- shapes and files
def test_sharegpt_and_alpaca_map_onto_messages(tmp_path, tok):
    sharegpt = {"system": "Answer in one word.", "conversations": [
        {"from": "human", "value": "Colour of the sky?"}, {"from": "gpt", "value": "Blue."},
        {"from": "human", "value": "And grass?"}, {"from": "gpt", "value": "Green."}]}
    alpaca = {"instruction": "Colour of the sky?", "input": "Think of noon.", "output": "Blue.",
              "system": "Answer in one word."}
    as_messages = [CONVERSATION[0], {"role": "user", "content": "Colour of the sky?\n\nThink of noon."},
                   CONVERSATION[2]]
    got = {}
    for name, record in (("sharegpt", sharegpt), ("alpaca", alpaca), ("messages", {"messages": as_messages})):
        train = write_jsonl(tmp_path / f"{name}.jsonl", [record])
        got[name] = load_datasets(cfg_for(tmp_path, train), tok, seed=0)[0][0]
    assert got["sharegpt"]["labels"].tolist() == expected(tok)[1]
    assert torch.equal(got["alpaca"]["input_ids"], got["messages"]["input_ids"])
    assert torch.equal(got["alpaca"]["labels"], got["messages"]["labels"])


def test_json_array_and_parquet_match_jsonl(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": f"{i + 1}"}]}
               for i in range(5)]
    jsonl = write_jsonl(tmp_path / "c.jsonl", records)
    (tmp_path / "c.json").write_text(json.dumps(records, indent=2))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    runs = [load_datasets(cfg_for(tmp_path, f), tok, seed=0)[0]
            for f in (jsonl, str(tmp_path / "c.json"), str(tmp_path / "c.parquet"))]
    for other in runs[1:]:
        assert [e["labels"].tolist() for e in other] == [e["labels"].tolist() for e in runs[0]]


def test_json_array_errors_name_the_line(tmp_path, tok):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"text": "ok"},\n  {"text": "no close"\n]\n')
    with pytest.raises(DataError, match=r"bad\.json, line 4: malformed JSON"):
        load_datasets(cfg_for(tmp_path, str(bad)), tok, seed=0)
    bad.write_text('[\n  {"messages": [{"role": "user", "content": "hi"}]},\n\n  {"messages": [\n'
                   '    {"role": "robot", "content": "x"}]}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json, line 2: the conversation has no assistant turn"):
        load_datasets(cfg_for(tmp_path, str(bad)), tok, seed=0)
    bad.write_text('{"text": "an object, not an array"}')
    with pytest.raises(DataError, match=r"bad\.json, line 1: not a JSON array"):
        load_datasets(cfg_for(tmp_path, str(bad)), tok, seed=0)


# ---------------------------------------------------------------- the template
def test_a_model_without_chat_template_is_refused_then_given_one(tmp_path, tok):
    bare = build_byte_tokenizer()
    bare.chat_template = None
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    before = dict(data_mod.cache_stats)
    with pytest.raises(DataError, match=r"chat\.jsonl, line 1: a messages record, but the model has no chat "
                                        r"template.*set data\.chat_template"):
        load_datasets(cfg_for(tmp_path, train), bare, seed=0)
    assert data_mod.cache_stats == before
    (tmp_path / "chatml.jinja").write_text(tok.chat_template)
    [ex], _ = load_datasets(cfg_for(tmp_path, train, chat_template=str(tmp_path / "chatml.jinja")), bare, seed=0)
    assert ex["labels"].tolist() == expected(tok)[1]
    with pytest.raises(DataError, match=r"data\.chat_template = '.*none\.jinja': no such file"):
        load_datasets(cfg_for(tmp_path, train, chat_template=str(tmp_path / "none.jinja")), bare, seed=0)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, tok):
    # renders only the last assistant turn's content: a prefix then differs from the whole conversation
    odd = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
           "{% endfor %}")
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:]}])
    with pytest.raises(DataError, match=r"line 1: the chat template renders the conversation up to turn 1 "
                                        r"differently.*train\.loss_on: all"):
        load_datasets(cfg_for(tmp_path, train, chat_template=odd), tok, seed=0)


# ---------------------------------------------------------------- bad records
USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("record, message", [
    ({"messages": [USER, {"role": "bot", "content": "x"}]},
     r"line 2: turn 1 has the unknown role 'bot'; use one of system, user, assistant"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "model", "value": "x"}]},
     r"line 2: turn 1 has the unknown role 'model'; use one of human, user, gpt, assistant, system"),
    ({"messages": [USER, {"role": "system", "content": "be nice"}]}, r"line 2: the conversation has no assistant turn"),
    ({"messages": [ANSWER, USER]}, r"line 2: the conversation opens with an assistant turn"),
    ({"messages": [USER, {"role": "assistant", "content": 5}]}, r"line 2: turn 1: `content` must be a string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, ANSWER]}, r"line 2: turn 0, part 0: unknown "
                                                                              r"content part"),
    ({"messages": []}, r"line 2: `messages` must be a non-empty list of turns"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "nowhere.png"}]}, ANSWER]},
     r"line 2: image `nowhere\.png` not found \(looked at .*nowhere\.png\)"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}, ANSWER], "images": ["a.png"]},
     r"line 2: 2 image parts / `<image>` placeholders but 1 image\(s\) in `images`"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}],
      "images": ["a.png", "a.png"]}, r"line 2: 2 image\(s\) in `images` but only 1 image part"),
    ({"instruction": "hi", "output": 3}, r"line 2: `output` must be a string"),
])
def test_bad_chat_records_are_named(tmp_path, tok, record, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"alpaca": {"instruction": "q", "output": "a"}, "sharegpt": {"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}}
    first = good["alpaca"] if "instruction" in record else good["sharegpt"] if "conversations" in record \
        else {"messages": [USER, ANSWER]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [first, record])
    before = dict(data_mod.cache_stats)
    with pytest.raises(DataError, match=rf"bad\.jsonl, {message}"):
        load_datasets(cfg_for(tmp_path, bad), tok, seed=0)
    assert data_mod.cache_stats == before  # refused before any tokenisation


def test_images_for_a_text_model_are_refused(tmp_path, tok):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    train = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "what?"}]}, ANSWER]}])
    with pytest.raises(DataError, match=r"c\.jsonl, line 1: a record with images, but the model's processor has no "
                                        r"image processor"):
        load_datasets(cfg_for(tmp_path, train), tok, seed=0)
