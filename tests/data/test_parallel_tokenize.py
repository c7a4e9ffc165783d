"""Tokenising in worker processes (``data.num_proc``): the cache file is byte for byte the one a single process
writes (prompt/completion, chat and image-text records through the real tiny-LLaVA processor), drops the same
records with the same messages, and a bad record found in a worker fails with the same error type and message.
A processor that cannot be pickled, or that a worker cannot load, is tokenised in this process instead.

Each test that starts worker processes pays for them importing torch and transformers (seconds each): there are
two such tests, one with ``num_proc: 2`` (an explicit ``num_proc`` > 1 always starts processes, even for the few
records here) and one with the automatic choice made to start two.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
from PIL import Image

from pipelines.config.data import DataConfig, DataError
from pipelines.data import dataset as D
from pipelines.data import parallel
from pipelines.models.tokenizer import build_byte_tokenizer

LOGGER = "pipelines.data.dataset"


def write_jsonl(path: Path, records: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def cache_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def load_both_ways(tmp_path: Path, caplog, proc, num_proc: int | None = 2, **data) -> tuple[dict, dict, list, list]:
    """Loads ``data`` with num_proc 1, then ``num_proc``, into two cache folders: (files, files, log, log)."""
    out = []
    for n in (1, num_proc):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            cfg = DataConfig(**data, num_proc=n, cache_dir=str(tmp_path / f"cache{n}"))
            D.load_datasets(cfg, proc, seed=0)
        out.append((cache_files(tmp_path / f"cache{n}"), [r.getMessage() for r in caplog.records]))
    (one, log1), (two, log2) = out
    return one, two, log1, log2


def warnings_of(messages: list[str]) -> list[str]:
    return [m for m in messages if "dropped" in m]


# ---------------------------------------------------------------- the same cache file
def test_text_and_chat_records_give_the_same_file_and_drops(tmp_path, tok, caplog, monkeypatch):
    """Automatic num_proc, made to choose processes for these few records: the first ones are tokenised here and
    timed, the rest in two workers, and the file is still the one a single process writes."""
    monkeypatch.setattr(D, "PROBE_RECORDS", 7)
    monkeypatch.setattr(D, "AUTO_MIN_SECONDS", 0.0)
    monkeypatch.setattr(D, "_cpus", lambda: 2)
    rows = [{"prompt": f"add {i} and 1:", "completion": f" {i + 1}"} for i in range(60)]
    for i in (4, 31, 57):  # nothing left to learn at max_length 48: dropped (one before the hand-over, two after)
        rows[i] = {"prompt": "p" * 60, "completion": "c"}
    chats = [{"messages": [{"role": "user", "content": f"Count to {i}." + ("?" * 30 if i % 7 == 3 else "")},
                           {"role": "assistant", "content": " ".join(str(j) for j in range(i % 5))}]}
             for i in range(30)]  # the long questions leave no answer token within 48: dropped
    one, two, log1, log2 = load_both_ways(tmp_path, caplog, tok, num_proc=None, max_length=48,
                                          train=write_jsonl(tmp_path / "pc.jsonl", rows),
                                          eval=write_jsonl(tmp_path / "chat.jsonl", chats))
    assert len(one) == 2 and one == two  # same names (cache keys) and the same bytes
    dropped = warnings_of(log1)
    assert len(dropped) == 2 and "3 record(s) dropped" in dropped[0] and "4 record(s) dropped" in dropped[1]
    assert warnings_of(log2) == dropped
    assert any("tokenising 60 records in 2 processes (the first 7 here" in m for m in log2)
    assert any("tokenising 30 records in 2 processes (the first 7 here" in m for m in log2)  # the same workers


def test_image_text_records_through_llava_give_the_same_file_and_a_bad_record_the_same_error(tmp_path, llava_proc,
                                                                                          caplog):
    """One load, so that the workers (which import transformers' LLaVA processor: seconds) start once: the train
    file (image-text) is written, then a chat record of the eval file is found bad in a worker."""
    folder = tmp_path / "data"
    folder.mkdir()
    images, chats = [], []
    for i in range(24):
        Image.new("RGB", (20 + i, 12 + 3 * (i % 5)), (10 * i, 200, 30)).save(folder / f"img_{i}.png")
        images.append({"image": f"img_{i}.png", "prompt": f"<image>\nColour {i}?", "response": f"green {i}"})
        if i % 3 == 1:  # a text-only conversation in an image chat file
            chats.append({"messages": [{"role": "user", "content": f"Count to {i}."},
                                       {"role": "assistant", "content": " ".join(str(j) for j in range(i))}]})
            continue
        question = "a long question " * 5 if i == 17 else "Colour?"  # line 18: pushes the image past max_length
        chats.append({"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                                {"type": "image", "image": f"img_{i}.png"}]},
                                   {"role": "assistant", "content": f"green {i}"}]})
    data = {"train": write_jsonl(folder / "img.jsonl", images), "eval": write_jsonl(folder / "chat.jsonl", chats),
            "max_length": 80}
    files, errors, logs = [], [], []
    for n in (1, 2):
        caplog.clear()
        cache = tmp_path / f"cache{n}"
        with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(Exception) as caught:
            D.load_datasets(DataConfig(**data, num_proc=n, cache_dir=str(cache)), llava_proc, seed=0)
        files.append(cache_files(cache))
        errors.append(caught.value)
        logs.append([r.getMessage() for r in caplog.records])
    assert len(files[0]) == 1 and next(iter(files[0])).startswith("img-")  # the train file only: eval failed
    assert files[0] == files[1]  # the same name (cache key) and the same bytes
    in_process, in_worker = errors
    assert type(in_worker) is type(in_process) is DataError
    assert str(in_worker) == str(in_process)
    assert "chat.jsonl, line 18: the conversation with its 1 image(s) takes" in str(in_worker)
    assert "would cut image tokens" in str(in_worker)
    assert sum("in 2 processes" in m for m in logs[1]) == 2  # both files went to the workers


# ---------------------------------------------------------------- settings
def test_num_proc_below_one_is_refused_naming_the_setting():
    for value in (0, -2):
        with pytest.raises(DataError, match=r"data\.num_proc = .*use at least 1"):
            DataConfig.from_dict({"train": "demo:train", "num_proc": value}).validate()
    DataConfig.from_dict({"train": "demo:train", "num_proc": 1}).validate()


# ---------------------------------------------------------------- how many processes, and when not
def test_automatic_num_proc_and_chunks(monkeypatch):
    monkeypatch.setattr(D, "_cpus", lambda: 16)
    assert D._auto_processes(D.AUTO_MIN_SECONDS - 1, 10 ** 6) == 1  # not worth starting processes
    assert D._auto_processes(D.AUTO_MIN_SECONDS, 10 ** 6) == D.AUTO_MAX_PROCESSES == 8
    assert D._auto_processes(10 ** 4, 3) == 3  # at most one a record
    monkeypatch.setattr(D, "_cpus", lambda: 1)
    assert D._auto_processes(10 ** 4, 10 ** 6) == 1
    chunks = list(D._chunks(list(range(100)), 2, images=False))
    assert [x for c in chunks for x in c] == list(range(100)) and len(chunks) == 8  # contiguous, in order
    assert max(len(c) for c in D._chunks(list(range(10 ** 4)), 2, images=False)) == D.CHUNK_RECORDS
    assert max(len(c) for c in D._chunks(list(range(10 ** 4)), 2, images=True)) == D.CHUNK_IMAGE_RECORDS


def test_a_small_file_stays_in_this_process_by_default(tmp_path, tok, caplog, monkeypatch):
    monkeypatch.setattr(parallel.OrderedPool, "map", lambda *a: pytest.fail("started worker processes"))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(50)])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        D.load_datasets(DataConfig(train=train, eval_fraction=0, cache_dir=str(tmp_path / "c")), tok, seed=0)
    assert any("tokenising 50 records in 1 process" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.INFO, logger=LOGGER):  # automatic: a larger file whose records are quick
        train = write_jsonl(tmp_path / "t2.jsonl", [{"text": f"row {i}"} for i in range(D.PROBE_RECORDS * 3)])
        D.load_datasets(DataConfig(train=train, eval_fraction=0, cache_dir=str(tmp_path / "c")), tok, seed=0)
    assert any(f"tokenising {D.PROBE_RECORDS * 3} records in 1 process (the first {D.PROBE_RECORDS} here; the other"
               in r.getMessage() for r in caplog.records)


def test_a_processor_that_cannot_be_pickled_is_tokenised_in_this_process(tmp_path, caplog):
    unpicklable = build_byte_tokenizer()
    unpicklable.hook = lambda: None  # what some remote-code processors hold: pickle refuses a lambda
    rows = [{"prompt": f"add {i} and 2:", "completion": f" {i + 2}"} for i in range(20)]
    train = write_jsonl(tmp_path / "pc.jsonl", rows)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        D.load_datasets(DataConfig(train=train, eval_fraction=0, num_proc=2, cache_dir=str(tmp_path / "c2")),
                        unpicklable, seed=0)
    D.load_datasets(DataConfig(train=train, eval_fraction=0, num_proc=1, cache_dir=str(tmp_path / "c1")),
                    build_byte_tokenizer(), seed=0)
    said = [r for r in caplog.records if "cannot be pickled" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "tokenising in this process" in said[0].getMessage()
    assert cache_files(tmp_path / "c1") == cache_files(tmp_path / "c2")


def test_workers_that_cannot_load_the_processor_hand_back_to_this_process(tmp_path, tok, caplog, monkeypatch):
    """A worker that cannot unpickle the processor fails each task it is given (an initializer that raised would
    break the pool); the records not yet tokenised then go in this process. Simulated here, without processes:
    the first chunk is made as a worker makes it, the second fails."""
    monkeypatch.setattr(parallel, "_shared", None)
    parallel._start(b"not a pickle", {})
    with pytest.raises(parallel.SetupFailed, match="UnpicklingError"):
        parallel._run(len, [1])

    def first_chunk_then_setup_failed(self, fn, chunks):
        yield fn(pickle.loads(self._shared), next(iter(chunks)))
        raise parallel.SetupFailed("UnpicklingError: invalid load key")

    monkeypatch.setattr(parallel.OrderedPool, "map", first_chunk_then_setup_failed)
    rows = [{"text": f"row {i} " + "z" * (i % 7)} for i in range(40)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        D.load_datasets(DataConfig(train=train, eval_fraction=0, num_proc=2, cache_dir=str(tmp_path / "c2")), tok, 0)
    D.load_datasets(DataConfig(train=train, eval_fraction=0, num_proc=1, cache_dir=str(tmp_path / "c1")), tok, 0)
    assert any("a worker process could not load the processor (UnpicklingError" in r.getMessage()
               for r in caplog.records)
    assert cache_files(tmp_path / "c1") == cache_files(tmp_path / "c2")
