"""Lazy data (pipelines.data.lazy): ``load_datasets`` hands out sequences read from the cache file on access, equal
example for example to the examples tokenised in memory (every record shape, images, mixed chat files, the seeded
eval split, a data.eval file, a URI cache), with slices, steps, shards and pickling as views; a cache hit keeps
no record and tokenises nothing; the file is a plain safetensors file."""

from __future__ import annotations

import json
import pickle
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config.data import DataConfig
from pipelines.data import chat
from pipelines.data import dataset as D
from pipelines.data.lazy import CacheFile, Examples, write_examples
from pipelines.demo.shapes import make_demo_data

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue."},
]


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def eager(cfg: DataConfig, proc, seed: int = 0, loss_on: str = "assistant") -> tuple[list, list]:
    """The examples as they were before: every record tokenised in memory by the same functions, no cache, the
    same seeded split."""
    files = [cfg.train] + ([cfg.eval] if cfg.eval else [])
    plan = D._Plan(cfg.max_length, loss_on, chat.template_of(proc, cfg.chat_template_text()))
    sets = []
    for f in files:
        records = D.read_records(f, cfg.image_root, cfg.max_samples, D._image_token(proc))
        sets.append([ex for ex in (D._tokenize(r, proc, plan) for r in records) if ex is not None])
    train = sets[0]
    if cfg.eval:
        return train, sets[1]
    if cfg.eval_fraction == 0:
        return train, []
    n_eval = max(1, round(len(train) * cfg.eval_fraction))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]


def same(lazy, want: list) -> None:
    assert len(lazy) == len(want)
    for i, (got, ex) in enumerate(zip(lazy, want, strict=True)):  # iteration
        assert got.keys() == ex.keys(), i
        for k in ex:
            assert got[k].dtype == ex[k].dtype and got[k].shape == ex[k].shape, (i, k)
            assert torch.equal(got[k], ex[k]), (i, k)
    for i in (0, len(want) - 1) if want else ():  # indexing
        assert all(torch.equal(lazy[i][k], want[i][k]) for k in want[i])


# ---------------------------------------------------------------- data of every shape
def text_data(tmp: Path, tok) -> tuple[DataConfig, object]:
    rows = [{"text": "x" * (3 + i * 7 % 40) + f" row {i}"} for i in range(30)]
    return DataConfig(train=write_jsonl(tmp / "t.jsonl", rows), max_length=16, eval_fraction=0.2,
                      cache_dir=str(tmp / "cache")), tok


def prompt_completion_data(tmp: Path, tok) -> tuple[DataConfig, object]:
    rows = [{"prompt": f"add {i} and 1:", "completion": f" {i + 1}"} for i in range(12)]
    rows[4] = {"prompt": "p" * 40, "completion": "c"}  # nothing left to learn at max_length 24: dropped
    evals = [{"prompt": f"add {i} and 2:", "completion": f" {i + 2}"} for i in range(5)]
    return DataConfig(train=write_jsonl(tmp / "pc.jsonl", rows), eval=write_jsonl(tmp / "pce.jsonl", evals),
                      max_length=24, cache_dir=str(tmp / "cache")), tok


def classification_data(tmp: Path, tok) -> tuple[DataConfig, object]:
    rows = [{"text": "y" * (i + 1), "label": i % 3} for i in range(9)]
    return DataConfig(train=write_jsonl(tmp / "cls.jsonl", rows), eval_fraction=0.3,
                      cache_dir=str(tmp / "cache")), tok


def chat_data(tmp: Path, tok) -> tuple[DataConfig, object]:
    rows = [{"messages": CONVERSATION[:2] + [{"role": "assistant", "content": "Blue" + "!" * i}]} for i in range(7)]
    return DataConfig(train=write_jsonl(tmp / "chat.jsonl", rows), eval_fraction=0,
                      cache_dir=str(tmp / "cache")), tok


def image_data(tmp: Path, proc) -> tuple[DataConfig, object]:
    paths = make_demo_data(tmp / "demo", n_train=10, n_eval=3, seed=7)
    return DataConfig(train=str(paths["train"]), eval=str(paths["eval"]), max_length=64,
                      cache_dir=str(tmp / "cache")), proc


def mixed_chat_data(tmp: Path, proc) -> tuple[DataConfig, object]:
    """A chat file where only some records have an image (the text-only ones have no image tensors)."""
    folder = tmp / "mixed"
    folder.mkdir()
    rows = []
    for i in range(9):
        if i % 3 == 1:
            rows.append({"messages": [{"role": "user", "content": f"Count to {i}."},
                                      {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]})
            continue
        Image.new("RGB", (20 + i, 12 + 2 * i), (30 * i, 200, 30)).save(folder / f"img_{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"img_{i}.png"},
                                                               {"type": "text", "text": "Colour?"}]},
                                  {"role": "assistant", "content": f"green {i}"}]})
    return DataConfig(train=write_jsonl(folder / "mixed.jsonl", rows), eval_fraction=0.25, max_length=128,
                      cache_dir=str(tmp / "cache")), proc


TEXT_SHAPES = {"text": text_data, "prompt_completion": prompt_completion_data, "classification": classification_data,
               "chat": chat_data}
IMAGE_SHAPES = {"image_text": image_data, "mixed_chat_images": mixed_chat_data}


@pytest.mark.parametrize("shape", sorted(TEXT_SHAPES) + sorted(IMAGE_SHAPES))
def test_lazy_examples_equal_the_eager_ones(tmp_path, tok, llava_proc, shape):
    make = TEXT_SHAPES.get(shape) or IMAGE_SHAPES[shape]
    cfg, proc = make(tmp_path, tok if shape in TEXT_SHAPES else llava_proc)
    for loss_on in ("assistant", "all") if shape == "chat" else ("assistant",):
        want = eager(cfg, proc, seed=3, loss_on=loss_on)
        tokenised, hits = D.cache_stats["tokenized_files"], D.cache_stats["cache_hits"]
        cold = D.load_datasets(cfg, proc, seed=3, loss_on=loss_on)
        assert D.cache_stats["tokenized_files"] > tokenised  # a miss: tokenised now, read back from the file
        warm = D.load_datasets(cfg, proc, seed=3, loss_on=loss_on)
        assert D.cache_stats["cache_hits"] == hits + (2 if cfg.eval else 1)
        for got in (cold, warm):
            assert all(isinstance(part, Examples) for part in got)
            same(got[0], want[0])
            same(got[1], want[1])
    if shape == "mixed_chat_images":
        present = ["pixel_values" in ex for ex in warm[0]]
        assert any(present) and not all(present)
    if shape == "image_text":
        assert warm[0][0]["pixel_values"].shape == (1, 3, 32, 32)


# ---------------------------------------------------------------- views
@pytest.fixture()
def views(tmp_path, tok):
    rows = [{"text": f"row {i:02d} " + "z" * (i % 5)} for i in range(23)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "v.jsonl", rows), eval_fraction=0, cache_dir=str(tmp_path / "c"))
    lazy, _ = D.load_datasets(cfg, tok, seed=0)
    return lazy, eager(cfg, tok)[0]


SLICES = [slice(None), slice(2, 9), slice(None, None, 3), slice(1, None, 4), slice(-5, None), slice(None, None, -1),
          slice(10, 2, -2), slice(-1, -8, -3), slice(100, 200), slice(5, 5), slice(None, 0)]


@pytest.mark.parametrize("sl", SLICES, ids=str)
def test_slices_and_steps_are_views_equal_to_list_slices(views, sl):
    lazy, want = views
    part = lazy[sl]
    assert isinstance(part, Examples) and part.file is lazy.file  # a view: no example read, same file
    same(part, want[sl])
    assert part.lengths().tolist() == [len(ex["input_ids"]) for ex in want[sl]]
    assert bool(part) == bool(want[sl])


def test_nested_views_shards_take_and_indexing(views):
    lazy, want = views
    same(lazy[1:][::2][-3:], want[1:][::2][-3:])
    same(lazy[::-1][3:15:4], want[::-1][3:15:4])
    for world in (2, 3, 4):
        for rank in range(world):
            part = D.shard(lazy, rank, world)
            assert isinstance(part, Examples)
            same(part, D.shard(want, rank, world))
            same(lazy[rank::world], want[rank::world])  # the loop's eval_part
            same(D.shard(lazy[rank::world], 0, 2), D.shard(want[rank::world], 0, 2))
    assert len(D.shard(lazy[:2], 0, 4)) == 0  # fewer examples than workers
    order = [5, 0, 22, 5, -1]
    same(lazy.take(order), [want[i] for i in order])
    same(lazy[::2].take(torch.tensor([3, 1])), [want[::2][3], want[::2][1]])
    for i in (0, 7, -1, -23, np.int64(4), torch.tensor(6)):
        assert torch.equal(lazy[i]["input_ids"], want[int(i)]["input_ids"])
    with pytest.raises(IndexError):
        lazy[23]
    with pytest.raises(IndexError):
        lazy[-24]
    with pytest.raises(IndexError):
        lazy.take([23])
    with pytest.raises(TypeError):
        lazy["0"]
    a, b = lazy[3], lazy[3]
    a["input_ids"][0] = -7  # every access reads into fresh tensors: the data set is read-only
    assert not torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(lazy[3]["input_ids"], b["input_ids"])
    got, expect = D.collate(lazy[4:9], pad_token_id=0), D.collate(want[4:9], pad_token_id=0)  # a view as it is
    assert got.keys() == expect.keys() and all(torch.equal(got[k], expect[k]) for k in got)


def test_views_pickle_and_reopen(views):
    lazy, want = views
    for part, expect in ((lazy, want), (lazy[::-3], want[::-3]), (lazy.take([4, 2]), [want[4], want[2]])):
        copy = pickle.loads(pickle.dumps(part))
        assert copy.file is not part.file
        same(copy, expect)
    assert len(pickle.dumps(lazy)) < 4096  # the index and the file's name travel, never the examples


# ---------------------------------------------------------------- the cache file
def test_cache_file_is_safetensors_and_holds_each_field_once(tmp_path, llava_proc):
    from safetensors import safe_open

    cfg, proc = mixed_chat_data(tmp_path, llava_proc)
    cfg.eval_fraction = 0
    want = eager(cfg, proc)[0]
    lazy, _ = D.load_datasets(cfg, proc, seed=0)
    path = D.cache_path(cfg, cfg.train, proc)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "freezetune.examples" and int(meta["count"]) == len(want)
        fields = json.loads(meta["fields"])
        assert set(fields) == set().union(*want)
        have = [ex for ex in want if "pixel_values" in ex]
        pixels = torch.cat([ex["pixel_values"].reshape(-1) for ex in have])
        assert torch.equal(f.get_tensor("pixel_values/data"), pixels)
        assert f.get_tensor("pixel_values/present").tolist() == ["pixel_values" in ex for ex in want]
        assert f.get_tensor("pixel_values/shapes").tolist() == [list(ex["pixel_values"].shape) for ex in have]
        assert torch.equal(f.get_tensor("input_ids/data"), torch.cat([ex["input_ids"] for ex in want]))
    # the index a worker holds: a few int64 arrays, not a Python object per example
    assert lazy.file.index_bytes() <= 64 * len(fields) * len(want)


def test_writer_reader_round_trip_of_dtypes_and_ranks(tmp_path):
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(6):
        ex = {"ids": torch.randint(0, 100, (i + 1,), generator=g), "label": torch.tensor(i % 2),
              "half": torch.randn(2, i, generator=g).to(torch.bfloat16), "mask": torch.rand(i, generator=g) > 0.5,
              "empty": torch.zeros(0, dtype=torch.int32)}
        if i % 2:
            ex["grid"] = torch.tensor([[1, i, i]])
        examples.append(ex)
    assert write_examples(examples, tmp_path / "x.pt") == 6
    lazy = Examples(CacheFile(tmp_path / "x.pt"))
    same(lazy, examples)
    assert lazy.file.lengths("ids").tolist() == list(range(1, 7))
    with pytest.raises(ValueError, match="differ in rank"):
        write_examples([{"a": torch.zeros(2)}, {"a": torch.zeros(2, 2)}], tmp_path / "bad.pt")


@pytest.mark.parametrize("damage", ["truncate", "foreign", "empty"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path, tok, damage):
    cfg, proc = text_data(tmp_path, tok)
    want = eager(cfg, proc)
    D.load_datasets(cfg, proc, seed=0)
    path = D.cache_path(cfg, cfg.train, proc)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:-5], "foreign": b"PK\x03\x04" + data[4:], "empty": b""}[damage])
    tokenised = D.cache_stats["tokenized_files"]
    again = D.load_datasets(cfg, proc, seed=0)
    assert D.cache_stats["tokenized_files"] == tokenised + 1
    same(again[0], want[0])
    assert path.read_bytes() == data


def test_a_uri_cache_is_read_from_a_local_copy_that_is_not_left_behind(tmp_path, tok, monkeypatch):
    """data.cache_dir as a URI (file:// here; s3:// in tests/jobs/test_s3_storage.py): written through
    storage.upload, downloaded on a hit into a temporary file that is unlinked once open."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg, proc = prompt_completion_data(tmp_path, tok)
    cfg.cache_dir = f"file://{tmp_path / 'remote'}"
    want = eager(cfg, proc)
    cold = D.load_datasets(cfg, proc, seed=0)
    hits = D.cache_stats["cache_hits"]
    warm = D.load_datasets(cfg, proc, seed=0)
    assert D.cache_stats["cache_hits"] == hits + 2
    target = D.cache_path(cfg, cfg.train, proc)
    assert isinstance(target, str) and target.startswith("file://")
    assert Path(target[len("file://"):]).is_file()
    for got in (cold, warm):
        same(got[0], want[0])
        same(got[1], want[1])
    assert not list(scratch.iterdir())  # the local copies are open, and unlinked
    copy = pickle.loads(pickle.dumps(warm[0][::2]))  # fetched again where it is unpickled
    same(copy, want[0][::2])
    assert not list(scratch.iterdir())


# ---------------------------------------------------------------- a hit keeps nothing, tokenises nothing
def _warm_load_traced_peak(tmp: Path, tok, n: int) -> tuple[int, tuple]:
    rows = [{"text": f"record number {i} " + "q" * 200} for i in range(n)]
    cfg = DataConfig(train=write_jsonl(tmp / f"big{n}.jsonl", rows), eval_fraction=0.1, max_length=32,
                     cache_dir=str(tmp / "c"))
    cold = D.load_datasets(cfg, tok, seed=0)
    tracemalloc.start()
    try:
        warm = D.load_datasets(cfg, tok, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [len(part) for part in warm] == [len(part) for part in cold] == [n - n // 10, n // 10]
    assert torch.equal(warm[0][-1]["input_ids"], cold[0][-1]["input_ids"])
    return peak, warm


def test_a_cache_hit_streams_the_records_and_tokenises_nothing(tmp_path, tok, monkeypatch):
    """Python allocations (tracemalloc) of a warm load_datasets at 400 and 4,000 records: the peak grows by the
    index only (tens of bytes per record), not by the records (before: ~1.3 KB per record, every record kept)."""
    D._processor_fingerprint(tok)  # first calls allocate caches of their own
    small, _ = _warm_load_traced_peak(tmp_path, tok, 400)

    def forbidden(*a, **kw):
        raise AssertionError("a cache hit must not tokenise or keep the records")

    monkeypatch.setattr(D, "_tokenize", forbidden)
    monkeypatch.setattr(D, "read_records", forbidden)
    monkeypatch.setattr(D, "_tokenize_into_cache", forbidden)
    D.load_datasets(DataConfig(train=str(tmp_path / "big400.jsonl"), eval_fraction=0.1, max_length=32,
                               cache_dir=str(tmp_path / "c")), tok, seed=0)
    monkeypatch.undo()
    big, warm = _warm_load_traced_peak(tmp_path, tok, 4000)
    per_record = (big - small) / 3600
    assert per_record < 300, (small, big, per_record)
    assert warm[0].file.index_bytes() / len(warm[0].file) <= 64
