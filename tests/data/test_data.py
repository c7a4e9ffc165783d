"""Data loading: record shapes, label masking, the on-disk cache, splits, shards, batches, errors, demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.data import dataset as data_mod
from pipelines.data.dataset import IGNORE_INDEX, cache_path, collate, count_tokens, load_datasets, pad_token_id, shard
from pipelines.config.data import DataConfig, DataError
from pipelines.demo.shapes import make_demo_data
from pipelines.models.loading import load_model, load_processor


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def llava(model_dirs):
    return load_model(model_dirs["tiny-llava"]), load_processor(model_dirs["tiny-llava"])


def cfg_for(tmp_path, train, **kw) -> DataConfig:
    return DataConfig(train=train, cache_dir=str(tmp_path / "cache"), **kw)


# ---------------------------------------------------------------- shapes and labels
def test_prompt_completion_masks_the_prompt(tmp_path, tok):
    train = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "add 1 and 2:", "completion": " 3"}] * 4)
    examples, _ = load_datasets(cfg_for(tmp_path, train, eval_fraction=0), tok, seed=0)
    ex = examples[0]
    n_prompt = 1 + len("add 1 and 2:")  # bos + bytes
    assert ex["labels"][:n_prompt].eq(IGNORE_INDEX).all()
    assert ex["labels"][n_prompt:].tolist() == ex["input_ids"][n_prompt:].tolist() == [4 + ord(" "), 4 + ord("3"), tok.eos_token_id]
    assert ex["attention_mask"].eq(1).all()


def test_text_records_learn_every_token_and_truncate(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 100}, {"text": "12+7=19"}])
    examples, _ = load_datasets(cfg_for(tmp_path, train, eval_fraction=0, max_length=16), tok, seed=0)
    assert [len(e["input_ids"]) for e in examples] == [16, 1 + 7 + 1]
    assert torch.equal(examples[1]["labels"], examples[1]["input_ids"])


def test_image_text_example_runs_through_llava(tmp_path, llava, demo_files):
    model, proc = llava
    cfg = DataConfig(train=str(demo_files["train"]), eval=str(demo_files["eval"]), cache_dir=str(tmp_path / "c"))
    train, evals = load_datasets(cfg, proc, seed=0)
    assert len(train) == 64 and len(evals) == 16
    ex = train[0]
    assert ex["pixel_values"].shape == (1, 3, 32, 32)  # as the processor returns one record
    image_slots = ex["input_ids"] == proc.image_token_id
    assert int(image_slots.sum()) == 17
    # loss only on the response (+ eos): the prompt, its image tokens included, is masked
    learned = ex["labels"] != IGNORE_INDEX
    assert not (learned & image_slots).any()
    record = json.loads(Path(demo_files["train"]).read_text().splitlines()[0])
    assert proc.tokenizer.decode(ex["labels"][learned], skip_special_tokens=True) == record["response"]

    batch = collate(train[:3], pad_token_id(proc))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_parquet_matches_jsonl(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": f"add {i} and 1:", "completion": f" {i + 1}"} for i in range(6)]
    jsonl = write_jsonl(tmp_path / "pc.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pc.parquet")
    a, _ = load_datasets(cfg_for(tmp_path, jsonl, eval_fraction=0), tok, seed=0)
    b, _ = load_datasets(cfg_for(tmp_path, str(tmp_path / "pc.parquet"), eval_fraction=0), tok, seed=0)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b, strict=True))


def test_classification_records(tmp_path, tok):
    train = write_jsonl(tmp_path / "cls.jsonl", [{"text": "good", "label": 1}, {"text": "bad!", "label": 0}])
    examples, _ = load_datasets(cfg_for(tmp_path, train, eval_fraction=0), tok, seed=0)
    batch = collate(examples, pad_token_id(tok))
    assert batch["labels"].tolist() == [1, 0]


# ---------------------------------------------------------------- cache
def test_cache_hit_then_miss_on_new_settings(tmp_path, tok):
    train = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    cfg = cfg_for(tmp_path, train)
    load_datasets(cfg, tok, seed=0)
    cached = cache_path(cfg, train, tok)
    assert cached.is_file()
    stamp, tokenised = cached.stat().st_mtime_ns, data_mod.cache_stats["tokenized_files"]

    again, _ = load_datasets(cfg, tok, seed=0)
    assert data_mod.cache_stats["tokenized_files"] == tokenised  # nothing re-tokenised
    assert cached.stat().st_mtime_ns == stamp

    shorter = cfg_for(tmp_path, train, max_length=8)
    load_datasets(shorter, tok, seed=0)
    assert data_mod.cache_stats["tokenized_files"] == tokenised + 1
    assert cache_path(shorter, train, tok) != cached

    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": f"C{i}"} for i in range(10)])
    assert cache_path(cfg, train, tok) != cached  # new file bytes, new key
    assert not list(cached.parent.glob(".tmp-*"))  # atomic writes leave no temp files


def test_cache_key_follows_images(tmp_path, llava):
    _, proc = llava
    paths = make_demo_data(tmp_path / "d", n_train=4, n_eval=1, seed=3)
    cfg = DataConfig(train=str(paths["train"]), cache_dir=str(tmp_path / "cache"))
    before = cache_path(cfg, paths["train"], proc)
    first_image = tmp_path / "d" / json.loads(Path(paths["train"]).read_text().splitlines()[0])["image"]
    make_demo_data(tmp_path / "other", n_train=1, n_eval=1, seed=9)["train"]
    first_image.write_bytes((tmp_path / "other" / "images" / "finetune_train_00000.png").read_bytes())
    assert cache_path(cfg, paths["train"], proc) != before


def _same_examples(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b))


def test_warm_cache_gives_back_exactly_what_was_tokenised(tmp_path, llava, tok):
    # image-text (4-D pixel_values, 1-D ids) and classification (0-d labels): every field, shape and dtype
    _, proc = llava
    paths = make_demo_data(tmp_path / "d", n_train=6, n_eval=2, seed=4)
    cfg = DataConfig(train=str(paths["train"]), eval=str(paths["eval"]), cache_dir=str(tmp_path / "c"))
    cold = load_datasets(cfg, proc, seed=0)
    hits = data_mod.cache_stats["cache_hits"]
    warm = load_datasets(cfg, proc, seed=0)
    assert data_mod.cache_stats["cache_hits"] == hits + 2
    assert all(_same_examples(c, w) for c, w in zip(cold, warm))
    assert cold[0][0]["pixel_values"].dim() == 4  # (images, C, H, W): a batch of one, as the processor gives it

    labelled = write_jsonl(tmp_path / "cls.jsonl", [{"text": "x" * (i + 1), "label": i % 3} for i in range(7)])
    cfg = cfg_for(tmp_path, labelled, eval_fraction=0)
    cold, warm = load_datasets(cfg, tok, seed=0)[0], load_datasets(cfg, tok, seed=0)[0]
    assert _same_examples(cold, warm) and warm[0]["labels"].dim() == 0


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(5)])
    cfg = cfg_for(tmp_path, train, eval_fraction=0)
    first, _ = load_datasets(cfg, tok, seed=0)
    cache_path(cfg, train, tok).write_bytes(b"not a torch file")
    tokenised = data_mod.cache_stats["tokenized_files"]
    again, _ = load_datasets(cfg, tok, seed=0)
    assert data_mod.cache_stats["tokenized_files"] == tokenised + 1 and _same_examples(first, again)


def test_an_unreadable_image_in_eval_stops_before_train_is_tokenised(tmp_path, llava):
    _, proc = llava
    paths = make_demo_data(tmp_path / "d", n_train=3, n_eval=2, seed=5)
    first_eval_image = tmp_path / "d" / json.loads(Path(paths["eval"]).read_text().splitlines()[0])["image"]
    first_eval_image.write_text("not a png")
    before = dict(data_mod.cache_stats)
    with pytest.raises(DataError, match=r"line 1: image .* cannot be read as an image"):
        load_datasets(DataConfig(train=str(paths["train"]), eval=str(paths["eval"]),
                                 cache_dir=str(tmp_path / "c")), proc, seed=0)
    assert data_mod.cache_stats == before


# ---------------------------------------------------------------- split and shard
def test_split_is_deterministic_and_disjoint(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i:02d}"} for i in range(40)])
    cfg = cfg_for(tmp_path, train, eval_fraction=0.25)

    def keys(seed):
        a, b = load_datasets(cfg, tok, seed=seed)
        return [tuple(e["input_ids"].tolist()) for e in a], [tuple(e["input_ids"].tolist()) for e in b]

    tr, ev = keys(0)
    assert len(tr) == 30 and len(ev) == 10 and not set(tr) & set(ev)
    assert keys(0) == (tr, ev)
    assert keys(1)[1] != ev


def test_shards_are_disjoint_and_equal(tmp_path):
    dataset = list(range(23))
    parts = [shard(dataset, r, 4) for r in range(4)]
    assert {len(p) for p in parts} == {5}
    flat = [x for p in parts for x in p]
    assert len(set(flat)) == len(flat) == 20
    assert shard(dataset[:2], 0, 4) == []  # fewer examples than workers: the caller decides
    with pytest.raises(ValueError, match="rank 4"):
        shard(dataset, 4, 4)


def test_collate_pads_and_counts(tok, tmp_path):
    train = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "ab", "completion": "c"}, {"prompt": "a", "completion": "bcdef"}])
    examples, _ = load_datasets(cfg_for(tmp_path, train, eval_fraction=0), tok, seed=0)
    batch = collate(examples, pad_token_id=0)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert count_tokens(batch) == sum(lengths)
    short = lengths.index(min(lengths))
    assert batch["input_ids"][short, min(lengths):].eq(0).all()
    assert batch["labels"][short, min(lengths):].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == lengths


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "broken"'], r"bad\.jsonl, line 2: malformed JSON"),
    (['{"text": "ok"}', '', '{"question": "q", "answer": "a"}'], r"line 3: unknown record shape, found keys \['answer', 'question'\]"),
    (['{"text": "ok"}', '{"prompt": "p", "completion": "c"}'], r"line 2: a prompt_completion record, but .*line 1 is text"),
    (['{"text": 5}'], r"line 1: `text` must be a str"),
    (['', '  '], r"bad\.jsonl: no records \(empty dataset\)"),
])
def test_bad_records_are_named(tmp_path, tok, lines, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    before = dict(data_mod.cache_stats)
    with pytest.raises(DataError, match=message):
        load_datasets(cfg_for(tmp_path, bad), tok, seed=0)
    assert data_mod.cache_stats == before  # failed before any tokenisation


def test_missing_and_unreadable_images(tmp_path, llava):
    _, proc = llava
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "fake.png").write_text("not a png")
    rec = {"prompt": "<image>\nWhat?", "response": "x"}
    missing = write_jsonl(tmp_path / "m.jsonl", [{**rec, "image": "img/none.png"}])
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: image `img/none.png` not found .*img/none\.png"):
        load_datasets(cfg_for(tmp_path, missing), proc, seed=0)
    fake = write_jsonl(tmp_path / "f.jsonl", [{**rec, "image": "img/fake.png"}])
    with pytest.raises(DataError, match=r"f\.jsonl, line 1: image `img/fake.png` .* cannot be read as an image"):
        load_datasets(cfg_for(tmp_path, fake), proc, seed=0)


def test_image_records_need_image_token_and_vlm(tmp_path, llava, tok, demo_files):
    _, proc = llava
    image = str(Path(demo_files["images"]) / "finetune_train_00000.png")  # absolute path
    no_token = write_jsonl(tmp_path / "n.jsonl", [{"image": image, "prompt": "What?", "response": "x"}])
    with pytest.raises(DataError, match=r"line 1: the prompt has no `<image>` token"):
        load_datasets(cfg_for(tmp_path, no_token), proc, seed=0)
    with pytest.raises(DataError, match=r"line 1: image-text records need a VLM processor"):
        load_datasets(cfg_for(tmp_path, str(demo_files["train"])), tok, seed=0)


def test_errors_in_eval_file_come_before_tokenising_train(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}] * 3)
    bad = write_jsonl(tmp_path / "eval.jsonl", ["{nope"])
    before = dict(data_mod.cache_stats)
    with pytest.raises(DataError, match=r"eval\.jsonl, line 1: malformed JSON"):
        load_datasets(DataConfig(train=train, eval=bad, cache_dir=str(tmp_path / "c")), tok, seed=0)
    assert data_mod.cache_stats == before


@pytest.mark.parametrize("changes, message", [
    ({"train": ""}, r"data\.train is empty"),
    ({"train": "x.csv"}, r"data\.train = 'x\.csv': use a \.jsonl, \.json or \.parquet"),
    ({"train": "missing.jsonl"}, r"data\.train = 'missing\.jsonl': no such file"),
    ({"eval_fraction": 1.0}, r"data\.eval_fraction = 1\.0"),
    ({"max_length": 2}, r"data\.max_length = 2"),
    ({"max_samples": 0}, r"data\.max_samples = 0"),
])
def test_config_validation_names_the_field(tmp_path, changes, message):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=message):
        DataConfig.from_dict({"train": ok, **changes})
    with pytest.raises(DataError, match=r"`max_len` \(did you mean `max_length`\?\)"):
        DataConfig.from_dict({"train": ok, "max_len": 3})


def test_max_samples_and_too_small_split(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"{i}"} for i in range(50)])
    a, b = load_datasets(cfg_for(tmp_path, train, max_samples=10, eval_fraction=0.2), tok, seed=0)
    assert (len(a), len(b)) == (8, 2)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="too few to hold out"):
        load_datasets(cfg_for(tmp_path, one), tok, seed=0)


# ---------------------------------------------------------------- demo data
def test_demo_data_is_deterministic_and_loadable(tmp_path, tok):
    a = make_demo_data(tmp_path / "a", n_train=12, n_eval=4, seed=5, task="pretrain")
    b = make_demo_data(tmp_path / "b", n_train=12, n_eval=4, seed=5, task="pretrain")
    c = make_demo_data(tmp_path / "c", n_train=12, n_eval=4, seed=6, task="pretrain")
    for key in ("train", "eval", "text_train", "text_eval"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes()
    assert Path(a["train"]).read_bytes() != Path(c["train"]).read_bytes()
    pngs = sorted(p.name for p in Path(a["images"]).iterdir())
    assert len(pngs) == 16
    assert all((Path(a["images"]) / n).read_bytes() == (Path(b["images"]) / n).read_bytes() for n in pngs)

    pre = [json.loads(x) for x in Path(a["train"]).read_text().splitlines()]
    assert pre[0]["prompt"].startswith("<image>") and pre[0]["response"].startswith("a ")
    fine = make_demo_data(tmp_path / "a", n_train=12, n_eval=4, seed=5, task="finetune")
    ft = [json.loads(x) for x in Path(fine["train"]).read_text().splitlines()]
    assert all(r["response"].startswith("shape: ") and "; side: " in r["response"] for r in ft)
    assert Path(a["train"]).exists()  # both tasks can share a folder

    text, _ = load_datasets(cfg_for(tmp_path, str(fine["text_train"]), eval_fraction=0), tok, seed=0)
    assert len(text) == 12


def test_demo_images_match_their_captions(tmp_path):
    from PIL import Image

    paths = make_demo_data(tmp_path, n_train=30, n_eval=1, seed=0, task="finetune")
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
    for line in Path(paths["train"]).read_text().splitlines():
        rec = json.loads(line)
        fields = dict(part.split(": ") for part in rec["response"].split("; "))
        img = Image.open(tmp_path / rec["image"]).convert("RGB")
        xs = [x for x in range(32) for y in range(32) if img.getpixel((x, y)) == colours[fields["colour"]]]
        assert xs, rec
        centre = (min(xs) + max(xs)) / 2
        assert (centre < 16) == (fields["side"] == "left"), rec


# ---------------------------------------------------------------- long records
def _bpe_tokenizer():
    """A real byte-level BPE (multi-character tokens, merges), trained here in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    core.train_from_iterator([" ".join(words * 20)] * 50, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="<s>")


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_a_long_record_tokenises_only_what_max_length_keeps(tok, which):
    """A book-length record gives the same first max_length tokens as tokenising all of it, from a prefix."""
    import random

    tokenizer = tok if which == "bytes" else _bpe_tokenizer()
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "x", "  ", "\n", "ünïcødé", "12345"]
    text = " ".join(rng.choice(words) for _ in range(60_000))  # ~300k characters
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    for max_length in (8, 128, 1000):
        ids = data_mod._encode(tokenizer, text, True, max_length)
        assert ids[:max_length] == full[:max_length]
        assert len(ids) < len(full) // 4, "the whole record was tokenised"


def test_a_record_over_the_size_limit_is_refused_with_its_line(tmp_path, tok):
    train = write_jsonl(tmp_path / "big.jsonl", [{"text": "short"}, {"text": "y" * 2_000_000}])
    with pytest.raises(DataError, match=r"big.jsonl, line 2: a 2.0 MB record, over data.max_record_mb = 1"):
        load_datasets(cfg_for(tmp_path, train, eval_fraction=0, max_record_mb=1), tok, seed=0)
    assert not (tmp_path / "cache").exists()
