"""Sequence packing (pipelines.data.packing): the plan, the rows, and the model seeing a batch of packed rows
exactly as it sees the examples one by one (logits, summed loss, gradients), on real tiny Llama / Qwen2 models
built from transformers configs, fp32, sdpa and eager attention."""

from __future__ import annotations

import random

import pytest
import torch
import transformers as tf

from pipelines.data.dataset import IGNORE_INDEX, collate, count_tokens
from pipelines.data.packing import (PackedDataset, attention_implementation, block_mask, pack, pack_plan,
                                    packed_batch, packed_example)
from pipelines.training.step import labelled_tokens, summed_loss

VOCAB = 128
MAX_LENGTH = 24
LENGTHS = [5, 9, 3, 12, 7, 4, 20, 2, 6, 11]  # packs into rows of unequal lengths: the batch is padded
FAMILIES = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}


def example(n: int, seed: int, prompt: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n,), generator=g)
    labels = ids.clone()
    labels[:prompt] = IGNORE_INDEX  # a prompt/completion example: loss on the completion only
    return {"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.long), "labels": labels}


def examples() -> list[dict]:
    return [example(n, seed=i, prompt=2 if i % 3 == 0 else 0) for i, n in enumerate(LENGTHS)]


def tiny(family: str, attn: str):
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_cls(config).eval()


def packed_inputs(model, rows: PackedDataset) -> tuple[dict, torch.Tensor]:
    batch = collate([rows[i] for i in range(len(rows))], pad_token_id=0)
    inputs = packed_batch(batch, attention_implementation(model, MAX_LENGTH))
    return inputs, inputs.pop("labels")


# ---------------------------------------------------------------- the plan
@pytest.mark.parametrize("max_length", [1, 7, 24, 64, 1000])
def test_plan_packs_every_index_once_within_max_length(max_length):
    rng = random.Random(max_length)
    lengths = [rng.randint(1, 80) for _ in range(300)]
    plan = pack_plan(lengths, max_length)
    assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
    for row in plan:
        assert row == sorted(row)
        total = sum(lengths[i] for i in row)
        assert total <= max_length or len(row) == 1, (row, total)  # over-long: a row of its own
    assert [row[0] for row in plan] == sorted(row[0] for row in plan)
    assert pack_plan(lengths, max_length) == plan  # deterministic


def test_plan_best_fit_decreasing_and_long_examples_alone():
    # longest first, each into the fullest row it fits: 20+4, 12+9+3, 7+5+2; 30 > 24 alone
    assert pack_plan([5, 9, 3, 12, 7, 4, 20, 2, 30], 24) == [[0, 4, 7], [1, 2, 3], [5, 6], [8]]
    assert pack_plan([], 8) == []
    # fuller than a greedy pass in data order, which closes a row at the first misfit: 6 | 5 | 6 | 5 4 | 4
    assert len(pack_plan([6, 5, 6, 5, 4, 4], 10)) == 3


@pytest.mark.parametrize("lengths, max_length", [([3, 0], 8), ([3, -1], 8), ([2.5], 8), ([True], 8), ([3], 0),
                                                 ([3], True), ([3], 8.0)])
def test_plan_rejects_bad_lengths(lengths, max_length):
    with pytest.raises(ValueError, match="positive int"):
        pack_plan(lengths, max_length)


# ---------------------------------------------------------------- one row
def test_row_restarts_positions_and_masks_boundary_labels():
    parts = [example(3, 0), example(4, 1, prompt=2), example(2, 2)]
    row = packed_example(parts)
    assert torch.equal(row["input_ids"], torch.cat([p["input_ids"] for p in parts]))
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert row["attention_mask"].tolist() == [1] * 9
    want = torch.cat([p["labels"] for p in parts])
    want[[0, 3, 7]] = IGNORE_INDEX  # every example's first token: nothing may predict it across a boundary
    assert torch.equal(row["labels"], want)
    assert parts[2]["labels"][0] == parts[2]["input_ids"][0]  # the examples themselves are left as they were


@pytest.mark.parametrize("extra, match", [
    ({"pixel_values": torch.zeros(1, 3, 8, 8)}, r"image tensors \(`pixel_values`\).*train.packing: false"),
    ({"image_grid_thw": torch.tensor([[1, 2, 2]])}, r"image tensors.*text-only causal-LM"),
    ({"labels": torch.tensor(1)}, r"sequence-classification.*causal-LM text only.*train.packing: false"),
    ({"token_type_ids": torch.zeros(4, dtype=torch.long)}, r"`token_type_ids`.*plain causal-LM text"),
])
def test_images_and_classification_are_refused(extra, match):
    bad = {**example(4, 0), **extra}
    with pytest.raises(ValueError, match=match):
        packed_example([example(3, 1), bad])
    with pytest.raises(ValueError, match=match):
        pack([bad, example(3, 1)], MAX_LENGTH)  # at set-up, not at the first step
    with pytest.raises(ValueError, match=match):
        pack([bad, example(3, 1)], MAX_LENGTH, lengths=[4, 3])


def test_padded_examples_are_refused():
    padded = example(4, 0)
    padded["attention_mask"][-1] = 0
    with pytest.raises(ValueError, match="padding"):
        packed_example([padded])


class CountingSequence(torch.utils.data.Dataset):
    """A lazy base: counts every example it hands out."""

    def __init__(self, items):
        self.items, self.reads = items, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.items[i]


def test_packed_dataset_builds_rows_on_access_only():
    base = CountingSequence(examples())
    plan = pack_plan(LENGTHS, MAX_LENGTH)
    rows = PackedDataset(base, plan)
    assert base.reads == [] and len(rows) == len(plan)
    assert torch.equal(rows[1]["input_ids"], torch.cat([base.items[i]["input_ids"] for i in plan[1]]))
    assert base.reads == plan[1]
    tail = rows[1:]
    assert isinstance(tail, PackedDataset) and tail.plan == plan[1:] and base.reads == plan[1]
    assert torch.equal(rows[-1]["labels"], tail[-1]["labels"])
    assert rows[::2].plan == plan[::2]
    assert len(list(rows)) == len(plan)
    with pytest.raises(IndexError):
        rows[len(plan)]
    with pytest.raises(TypeError):
        rows["0"]
    with pytest.raises(ValueError, match="names example 99"):
        PackedDataset(base, [[0, 99]])


def test_packs_the_lazy_cache_sequence_from_its_index(tmp_path, monkeypatch):
    from pipelines.data.lazy import CacheFile, Examples, write_examples

    data = examples()
    write_examples(data, tmp_path / "cache.safetensors")
    file = CacheFile(tmp_path / "cache.safetensors")
    reads = []
    read = file.read
    monkeypatch.setattr(file, "read", lambda i: reads.append(i) or read(i))
    lazy = Examples(file)
    assert pack_plan(lazy.lengths(), MAX_LENGTH) == pack_plan(LENGTHS, MAX_LENGTH)  # numpy ints are lengths too
    rows = pack(lazy, MAX_LENGTH)
    assert reads == [0]  # lengths from the file's index; only the first example read (checked)
    eager = pack(data, MAX_LENGTH)
    assert rows.plan == eager.plan
    for key, value in rows[2].items():
        assert torch.equal(value, eager[2][key]), key
    assert sorted(reads[1:]) == sorted(rows.plan[2])


# ---------------------------------------------------------------- the model sees each example alone
def test_block_mask_pattern():
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0]])  # examples of 2 and 3 tokens, then one padding token
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    allowed = block_mask(position_ids, attention_mask)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]  # padding sees itself only; nothing sees padding
    # padding whose position ids do not restart (not collate's zeros) is still cut off by the attention mask
    allowed = block_mask(torch.tensor([[0, 1, 2, 3]]), torch.tensor([[1, 1, 0, 0]]))[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_batch_equals_examples_one_by_one(family, attn):
    model = tiny(family, attn)
    data = examples()
    rows = pack(data, MAX_LENGTH)
    inputs, labels = packed_inputs(model, rows)
    row_lengths = [sum(LENGTHS[i] for i in row) for row in rows.plan]
    assert len(rows) > 1 and len(set(row_lengths)) > 1  # rows of unequal lengths: padding inside the batch
    assert any(len(row) > 1 for row in rows.plan)
    with torch.no_grad():
        logits = model(**inputs).logits
        alone = [model(input_ids=ex["input_ids"][None], attention_mask=ex["attention_mask"][None]).logits
                 for ex in data]
    for r, row in enumerate(rows.plan):
        at = 0
        for i in row:
            n = LENGTHS[i]
            torch.testing.assert_close(logits[r, at:at + n], alone[i][0], atol=1e-5, rtol=0)
            at += n
    loss = summed_loss(logits, labels)
    expected = sum(summed_loss(out, ex["labels"][None]) for out, ex in zip(alone, data))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-6)
    batch = {"labels": labels, "attention_mask": collate([rows[i] for i in range(len(rows))], 0)["attention_mask"]}
    assert labelled_tokens(batch) == sum(labelled_tokens({"labels": ex["labels"][None]}) for ex in data)
    assert count_tokens(batch) == sum(LENGTHS)


def test_packed_gradients_equal_unpacked():
    data = examples()
    rows = pack(data, MAX_LENGTH)
    packed_model, alone_model = tiny("llama", "sdpa"), tiny("llama", "sdpa")
    inputs, labels = packed_inputs(packed_model, rows)
    summed_loss(packed_model(**inputs).logits, labels).backward()
    for ex in data:
        out = alone_model(input_ids=ex["input_ids"][None], attention_mask=ex["attention_mask"][None]).logits
        summed_loss(out, ex["labels"][None]).backward()
    for (name, p), q in zip(packed_model.named_parameters(), alone_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padding_content_changes_nothing():
    model = tiny("qwen2", "sdpa")
    rows = pack(examples(), MAX_LENGTH)
    inputs, _ = packed_inputs(model, rows)
    other = dict(inputs)
    other["input_ids"] = inputs["input_ids"].clone()
    pad = collate([rows[i] for i in range(len(rows))], 0)["attention_mask"] == 0
    assert pad.any()
    other["input_ids"][pad] = 77  # whatever the padding holds, real tokens never see it
    with torch.no_grad():
        a, b = model(**inputs).logits, model(**other).logits
    torch.testing.assert_close(a[~pad], b[~pad], atol=0, rtol=0)


def test_without_the_4d_mask_examples_attend_across_boundaries():
    """Why packed_batch builds a 4-D mask (transformers 5.24, masking_utils._preprocess_mask_arguments): with our
    2-D padding mask, or with it dropped while the forward creates its DynamicCache (use_cache defaults to the
    config's True), the model uses a plain causal mask and the examples of a row see each other."""
    model = tiny("llama", "sdpa")
    rows = pack(examples(), MAX_LENGTH)
    inputs, _ = packed_inputs(model, rows)
    batch = collate([rows[i] for i in range(len(rows))], 0)
    plain = {k: v for k, v in batch.items() if k != "labels"}
    no_mask = {k: v for k, v in plain.items() if k != "attention_mask"}
    with torch.no_grad():
        right = model(**inputs).logits
        assert not torch.allclose(model(**plain).logits, right, atol=1e-3)  # 2-D mask: no packing detected
        assert not torch.allclose(model(**no_mask).logits, right, atol=1e-3)  # cache created: not detected
        torch.testing.assert_close(model(**no_mask, use_cache=False).logits, right, atol=1e-5, rtol=0)


def test_attention_implementation_checks():
    assert attention_implementation(tiny("llama", "eager"), MAX_LENGTH) == "eager"
    flash = tiny("llama", "sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager.*flash_attention_2"):
        attention_implementation(flash)
    windowed = tf.MistralForCausalLM(tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      num_key_value_heads=2, sliding_window=16))
    with pytest.raises(ValueError, match="sliding window of 16"):
        attention_implementation(windowed, MAX_LENGTH)
    assert attention_implementation(windowed, 16) in ("sdpa", "eager")
    with pytest.raises(ValueError, match="not a batch of packed rows"):
        packed_batch(collate(examples()[:2], 0), "sdpa")
    with pytest.raises(ValueError, match="4-D mask"):
        packed_batch(collate([packed_example(examples()[:2])], 0), "flash_attention_2")
