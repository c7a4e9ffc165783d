"""Training data: read JSONL/JSON/parquet, check it, tokenise once (cached on disk), split, shard, batch.

Record shapes (detected from the first record; every record of a file must share it):
    messages            {"messages": [{"role", "content"}, ...]}    chat: rendered with the model's chat template,
    sharegpt            {"conversations": [{"from", "value"}, ...]}   loss on the assistant turns (``loss_on``);
    alpaca              {"instruction", "input"?, "output"}            images as content parts (pipelines.data.chat)
    text                {"text": ...}                               loss on every token
    prompt/completion   {"prompt": ..., "completion": ...}          loss on the completion only
    image-text          {"image": path, "prompt": ..., "response"}  through the model's processor;
                                                                    prompt holds "<image>"; loss on the response
    classification      {"text": ..., "label": int}                 sequence classifiers (BERT-like)

An example is a dict of tensors: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` where
no loss is taken; a 0-d class id for classification) and, for images, ``pixel_values``
(C, H, W). Every check that can fail runs before any tokenisation.

The data streams: records are read and checked one at a time (JSONL line by line, parquet by row batches; a
.json array is parsed whole) and none is kept on a cache hit; tokenised examples go to the cache file one at a
time, in record order (a large file is tokenised in ``data.num_proc`` worker processes, a chunk of records each:
``pipelines.data.parallel``; the file is the same byte for byte); ``load_datasets`` returns lazy sequences
(``pipelines.data.lazy.Examples``) that read each example from the cache file when it is accessed. A worker
holds the cache's index (about 100 bytes per example) and the batch it is collating, never the data set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.config import paths
from pipelines.config.data import DataConfig, DataError
from pipelines.config.run import LOSS_ON
from pipelines.data import chat, parallel, storage
from pipelines.data.lazy import CacheFile, CacheWriter, Examples

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what HF models' loss functions skip
CACHE_VERSION = 4  # bump when the tokenised layout changes, so old caches are not reused (4: lazy.py's file)
KINDS = {  # kind -> the keys that make it (checked in this order)
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "image": ("image", "prompt", "response"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}

# How often records were tokenised vs served from the cache in this process (tests and logs read it).
cache_stats = {"tokenized_files": 0, "cache_hits": 0}


# ---------------------------------------------------------------- reading and checking
@dataclass
class _Record:
    where: str  # "file, line N" for messages
    kind: str
    data: dict
    images: list[Path] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)  # as written in the record
    conv: chat.Conversation | None = None  # chat shapes only


def _iter_rows(path: Path, max_record_bytes: int) -> Iterator[tuple[str, Any]]:
    """Yields (location, raw row) pairs, one at a time (JSONL line by line, parquet by row batches; a .json
    array is parsed whole); JSON is parsed here so a bad line fails early, and a line over
    ``max_record_bytes`` fails before it costs anything (a 50 MB line would take minutes to tokenise)."""
    if path.suffix.lower() == ".json":
        yield from _read_json_array(path, max_record_bytes)
        return
    if path.suffix.lower() == ".parquet":
        yield from _iter_parquet(path)
        return
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if len(raw) > max_record_bytes:
                raise DataError(f"{path}, line {n}: a {len(raw) / 1e6:.1f} MB record, over data.max_record_mb = "
                                f"{max_record_bytes / 1e6:g}; split or shorten it, or raise data.max_record_mb.")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {n}: not UTF-8 (byte {raw[err.start]:#x} at column {err.start + 1}); "
                                "save the file as UTF-8 or fix that line.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {n}: malformed JSON ({err.msg} at column {err.colno}); fix that line "
                                "(one JSON object per line).") from err
            yield f"{path}, line {n}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    def unreadable(err: Exception) -> DataError:
        return DataError(f"{path}: not a readable parquet file ({err}).")

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise unreadable(err) from err
    i = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # noqa: BLE001 - as above, for a row group that cannot be read
            raise unreadable(err) from err
        if batch is None:
            return
        for row in batch.to_pylist():
            i += 1
            yield f"{path}, row {i}", row


def _read_json_array(path: Path, max_record_bytes: int) -> list[tuple[str, Any]]:
    """The records of a .json file holding one array, each with the line it starts on."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte {err.object[err.start]:#x}); save the file as UTF-8 "
                        "or fix that line.") from None
    decoder, out = json.JSONDecoder(), []

    def fail(pos: int, what: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        return DataError(f"{path}, line {line}: {what}; a .json data file holds one array of records "
                         "([{...}, {...}]), or use JSONL (one record per line).")

    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise fail(pos, "not a JSON array")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"malformed JSON ({err.msg})") from err
        where = f"{path}, line {text.count(chr(10), 0, pos) + 1}"
        if len(text[pos:end].encode()) > max_record_bytes:
            raise DataError(f"{where}: a record over data.max_record_mb = {max_record_bytes / 1e6:g}; split or "
                            "shorten it, or raise data.max_record_mb.")
        out.append((where, row))
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise fail(pos, "expected `,` or `]` after a record")
    if _skip_space(text, pos + 1) != len(text):
        raise fail(pos + 1, "text after the closing `]`")
    return out


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _kind_of(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    present = {k for k, v in row.items() if v is not None}
    for kind, keys in KINDS.items():
        if set(keys) <= present:
            return kind
    return None


@dataclass(frozen=True)
class Head:
    """What the model learns the data with: a language-model head (``num_labels`` None) or a classifier."""

    num_labels: int | None = None

    @property
    def classifies(self) -> bool:
        return self.num_labels is not None


def _check_types(where: str, kind: str, row: dict, head: Head | None) -> None:
    for key in KINDS[kind]:
        want = int if key == "label" else str
        if not isinstance(row[key], want) or isinstance(row[key], bool):
            raise DataError(f"{where}: `{key}` must be a {want.__name__}, got {type(row[key]).__name__}.")
    if kind == "classification":
        classes = head.num_labels if head is not None and head.classifies else 2**31
        if not 0 <= row["label"] < classes:
            raise DataError(f"{where}: label {row['label']} is not a class of the model (its head has {classes} "
                            f"labels: 0..{classes - 1}); fix the label, or set num_labels in the model's config.")


def _check_head(where: str, kind: str, head: Head | None) -> None:
    """Classification records need a classifier, every other shape a language-model head."""
    if head is None or (kind == "classification") == head.classifies:
        return
    if head.classifies:
        raise DataError(f"{where}: a {kind} record, but the model is a sequence classifier ({head.num_labels} "
                        "labels); use {\"text\", \"label\"} records, or a causal LM / VLM for this data.")
    raise DataError(f"{where}: a classification record ({{\"text\", \"label\"}}), but the model has a language-model "
                    "head; use a sequence classifier (e.g. the tiny-bert preset), or text / prompt-completion records.")


def _check_image_header(rec: "_Record") -> None:
    from PIL import Image, UnidentifiedImageError

    for path, name in zip(rec.images, rec.image_names):
        try:
            with Image.open(path) as img:  # reads the header only: cheap, catches non-images
                img.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise DataError(f"{rec.where}: image `{name}` ({path}) cannot be read as an image ({err}); "
                            "replace the file or fix the path on that line.") from err


def read_records(path: str | Path, image_root: str | Path | None = None, max_samples: int | None = None,
                 image_token: str | None = None, check_image_headers: bool = True, head: Head | None = None,
                 max_record_bytes: int = 8_000_000) -> list[_Record]:
    """Returns the checked records of one file (no tokenisation): :func:`iter_records`, kept in a list.

    Raises ``DataError`` for malformed JSON, an unknown or mixed record shape, a missing or
    unreadable image, a prompt without ``image_token``, a record the model's ``head`` cannot learn from
    (a label outside it), a record over ``max_record_bytes``, or an empty file. Without
    ``check_image_headers`` images are only checked to exist (a cache hit needs no more: the
    cache key holds every image's size and mtime, and they were read when it was written).
    """
    records = list(iter_records(path, image_root, max_samples, image_token, head, max_record_bytes))
    if check_image_headers:
        _check_image_headers(records)
    return records


def iter_records(path: str | Path, image_root: str | Path | None = None, max_samples: int | None = None,
                 image_token: str | None = None, head: Head | None = None,
                 max_record_bytes: int = 8_000_000) -> Iterator[_Record]:
    """Yields the checked records of one file one at a time, keeping none (images only checked to exist).

    The checks of :func:`read_records`, each raised when its row is reached (the first bad row of the file
    fails); rows after ``max_samples`` are still read and parsed (a malformed line anywhere is an error) but not
    yielded. An empty file raises once the file is read.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    file_kind, first_where, yielded = None, None, 0
    for where, row in _iter_rows(path, max_record_bytes):
        if max_samples is not None and yielded >= max_samples:
            continue
        yielded += 1
        kind = _kind_of(row)
        if kind is None:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{where}: unknown record shape, found keys {found}; use {{\"messages\"}}, {{\"conversations\"}} "
                "(sharegpt), {\"instruction\", \"output\"} (alpaca), {\"text\"}, {\"prompt\", \"completion\"}, "
                "{\"image\", \"prompt\", \"response\"} or {\"text\", \"label\"}."
            )
        if file_kind is None:
            file_kind, first_where = kind, where
            _check_head(where, kind, head)
        elif kind != file_kind:
            raise DataError(f"{where}: a {kind} record, but {first_where} is {file_kind}; one file holds one format.")
        if kind in chat.SHAPES:
            conv = chat.parse(where, kind, row, root, images_allowed=image_token is not None)
            yield _Record(where, kind, row, conv.images, conv.image_names, conv)
            continue
        _check_types(where, kind, row, head)
        if kind == "image":
            if image_token is None:
                raise DataError(f"{where}: image-text records need a VLM processor, but the model's processor "
                                "has no image processor; use a vision-language model or text-only data.")
            if image_token not in row["prompt"]:
                raise DataError(f"{where}: the prompt has no `{image_token}` token; put it where the image goes, "
                                f"e.g. \"{image_token}\\n{row['prompt']}\".")
            yield _Record(where, kind, row, [chat.image_path(where, row["image"], root)], [row["image"]])
            continue
        yield _Record(where, kind, row)
    if not yielded:
        raise DataError(f"{path}: no records (empty dataset); add records (one JSON object per line) or point "
                        "data.train / data.eval at another file.")


def _check_image_headers(records: Iterable[_Record]) -> None:
    for rec in records:
        _check_image_header(rec)


# ---------------------------------------------------------------- tokenising
def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def _image_token(processor) -> str | None:
    return getattr(processor, "image_token", None) if hasattr(processor, "image_processor") else None


def pad_token_id(processor) -> int:
    """Returns the id ``collate`` should pad with: the tokenizer's pad id, else its eos id, else 0."""
    tok = _tokenizer_of(processor)
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _encode(tok, text: str, specials: bool, max_length: int) -> list[int]:
    """The token ids of ``text``; only as much of a long text is tokenised as ``max_length`` can use.

    A prefix of a text tokenises to a prefix of its tokens except near the cut, so a prefix that gives
    comfortably more than ``max_length`` tokens gives the same first ``max_length`` (a book-length record
    costs milliseconds, not minutes and gigabytes)."""
    chars = max(4096, 16 * max_length)
    while True:
        ids = list(tok(text[:chars], add_special_tokens=specials)["input_ids"])
        if chars >= len(text) or len(ids) > max_length + 16:
            return ids
        chars *= 4


@dataclass(frozen=True)
class _Plan:
    """How records become examples: the cut, what the loss covers, the chat template (chat shapes)."""

    max_length: int
    loss_on: str = "assistant"
    template: str | None = None


def _rendered(rec: _Record, processor, plan: _Plan) -> tuple[str, list[tuple[int, int]]]:
    """The chat record rendered with the template, its assistant spans, and its image placeholders checked."""
    text, spans = chat.render(rec.where, rec.conv, _tokenizer_of(processor), plan.template)
    token = _image_token(processor)
    placed = text.count(token) if token else 0
    if placed != len(rec.images):
        raise DataError(f"{rec.where}: {len(rec.images)} image(s) but the chat template rendered {placed} `{token}` "
                        "placeholder(s); each image part must render the processor's image token once (fix the "
                        "record's image parts or data.chat_template).")
    return text, spans


def _chat_example(rec: _Record, processor, plan: _Plan, rendered: tuple[str, list]) -> dict[str, torch.Tensor] | None:
    """A chat record's example: the rendered text tokenised whole (as the model sees it at inference), labels on
    the tokens that start inside an assistant span (every token with ``loss_on="all"``)."""
    text, spans = rendered
    if rec.images:
        return _chat_image_example(rec, processor, plan, text, spans)
    tok = _tokenizer_of(processor)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[: plan.max_length]
    learn = chat.labelled_mask(enc["offset_mapping"], spans) if plan.loss_on == "assistant" else [True] * len(ids)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, learn)]
    return _example(ids, labels)


def _image_ids(processor) -> set[int]:
    """The ids the processor writes for images (image slots, Idefics3's frame tokens, Qwen's vision start/end):
    never labelled, since nothing there is for the model to predict."""
    return {int(v) for k, v in vars(processor).items()
            if isinstance(v, int) and k.endswith("token_id") and ("image" in k or "vision" in k)}


def _shift(char: int, moves: list[dict]) -> int:
    """``char`` of the rendered text in the processor's expanded text (image placeholders replaced)."""
    gained = 0
    for move in moves:
        if move["span"][1] > char:
            break
        gained = move["new_span"][1] - move["span"][1]
    return char + gained


def _chat_image_example(rec: _Record, processor, plan: _Plan, text: str, spans: list) -> dict | None:
    """The processor expands the image placeholders (image tokens, pixel values, grids or tile masks, as its
    family needs) in one call; its replacement offsets move the assistant spans onto the expanded text."""
    from PIL import Image

    images = []
    for path in rec.images:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    out = dict(processor(text=[text], images=[images], return_tensors="pt", add_special_tokens=False,
                         return_offsets_mapping=True, return_text_replacement_offsets=True))
    ids, offsets = out.pop("input_ids")[0].tolist(), out.pop("offset_mapping")[0].tolist()
    moves = sorted(out.pop("text_replacement_offsets", [[]])[0], key=lambda m: m["span"][0])
    out.pop("attention_mask", None)
    image_ids = _image_ids(processor)
    if len(ids) > plan.max_length and any(t in image_ids for t in ids[plan.max_length:]):
        raise DataError(f"{rec.where}: the conversation with its {len(images)} image(s) takes {len(ids)} tokens and "
                        f"max_length = {plan.max_length} would cut image tokens (which breaks the model); raise "
                        "data.max_length, or use smaller or fewer images.")
    if plan.loss_on == "assistant":
        learn = chat.labelled_mask(offsets, [(_shift(a, moves), _shift(b, moves)) for a, b in spans])
    else:
        learn = [True] * len(ids)
    labels = [t if keep and t not in image_ids else IGNORE_INDEX for t, keep in zip(ids, learn)]
    per_token = {k: v[0][: plan.max_length] for k, v in out.items() if v.shape[:2] == (1, len(ids))}
    vision = {k: v for k, v in out.items() if k not in per_token}  # as the processor batches one record
    return _example(ids[: plan.max_length], labels[: plan.max_length], **per_token, **vision)


def _example(ids: list[int], labels: list[int], **extra) -> dict[str, torch.Tensor] | None:
    if all(x == IGNORE_INDEX for x in labels):
        return None  # truncation left nothing to learn
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "labels": torch.tensor(labels), **extra}


def _tokenize(rec: _Record, processor, plan: _Plan, rendered=None) -> dict[str, torch.Tensor] | None:
    """Returns one example, or None when truncation leaves no token to learn from."""
    if rec.conv is not None:
        return _chat_example(rec, processor, plan, rendered or _rendered(rec, processor, plan))
    max_length = plan.max_length
    tok = _tokenizer_of(processor)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    extra = {}
    if rec.kind == "classification":
        ids = _encode(tok, rec.data["text"], True, max_length)[:max_length]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(rec.data["label"])}
    if rec.kind == "text":
        prompt, target = [], _encode(tok, rec.data["text"], True, max_length) + eos
    elif rec.kind == "prompt_completion":
        prompt = _encode(tok, rec.data["prompt"], True, max_length)
        target = _encode(tok, rec.data["completion"], False, max_length) + eos
    else:  # image: the processor expands the image token to as many slots as the model has image features
        from PIL import Image

        with Image.open(rec.images[0]) as img:
            out = processor(images=[img.convert("RGB")], text=[rec.data["prompt"]], return_tensors="pt")
        prompt = out["input_ids"][0].tolist()
        target = _encode(tok, rec.data["response"], False, max_length) + eos
        if len(prompt) >= max_length:
            raise DataError(f"{rec.where}: the prompt with its image takes {len(prompt)} tokens, max_length is "
                            f"{max_length}; raise data.max_length (cutting image tokens would break the model).")
        extra = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}  # a batch of one
    ids = (prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
    if plan.loss_on == "all":  # the prompt too (never image slots: nothing there to predict)
        image_id = getattr(processor, "image_token_id", None)
        labels = [IGNORE_INDEX if t == image_id else t for t in ids]
    return _example(ids, labels, **extra)


def _processor_fingerprint(processor) -> str:
    """What of the processor decides the tokens: the tokenizer file and the processor settings."""
    tok = _tokenizer_of(processor)
    parts = [tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok.get_vocab())]
    parts.append(json.dumps(tok.special_tokens_map, sort_keys=True, default=str))
    if processor is not tok:
        for attr in ("image_processor", "video_processor"):
            sub = getattr(processor, attr, None)
            if sub is not None:
                parts.append(sub.to_json_string())
        parts.append(json.dumps({k: getattr(processor, k, None) for k in (
            "patch_size", "vision_feature_select_strategy", "image_token", "num_additional_image_tokens")},
            sort_keys=True, default=str))
    return "\n".join(parts)


@dataclass(frozen=True)
class _Scan:
    """What the cache key needs of a file's records, gathered while they stream past (none is kept)."""

    first: _Record  # its kind and location name the file's format in errors
    count: int
    images: str  # sha256 over every image's path, size and mtime, in record order


def _scan(records: Iterable[_Record]) -> _Scan:
    h, first, count = hashlib.sha256(), None, 0
    for rec in records:
        first = first or rec
        count += 1
        for image in rec.images:  # stat, not bytes: cheap, and catches a replaced image
            st = image.stat()
            h.update(f"{os.path.abspath(image)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    if first is None:
        raise DataError("no records (empty dataset)")  # iter_records names the file first
    return _Scan(first, count, h.hexdigest())


def _cache_key(path: Path, records: Iterable[_Record] | _Scan, processor, max_length: int, max_samples: int | None,
               loss_on: str = "assistant", template: str | None = None) -> str:
    scan = records if isinstance(records, _Scan) else _scan(records)
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|max_length={max_length}|max_samples={max_samples}|loss_on={loss_on}\n".encode())
    if scan.first.conv is not None:  # the template decides the tokens of chat records only (one file, one shape)
        h.update(f"template={template}\n".encode())
    with open(path, "rb") as fh:  # every byte, streamed
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    h.update(f"images={scan.images}\n".encode())
    h.update(_processor_fingerprint(processor).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``<cache root>/data``: the project's one cache root (``pipelines.config.paths.cache_root``)."""
    return paths.cache_root() / "data"


def cache_path(cfg: DataConfig, path: str | Path, processor, loss_on: str = "assistant") -> Path | str:
    """Returns the cache file that holds ``path`` tokenised with ``processor`` under ``cfg`` and ``loss_on`` (a
    URI, as a string, when ``cfg.cache_dir`` is one: s3://bucket/cache/...)."""
    scan = _scan(iter_records(path, cfg.image_root, cfg.max_samples, _image_token(processor),
                              max_record_bytes=_record_bytes(cfg)))
    return _cache_file(cfg, Path(path), scan, processor, loss_on)


def _cache_file(cfg: DataConfig, path: Path, records: Iterable[_Record] | _Scan, processor,
                loss_on: str = "assistant") -> Path | str:
    template = chat.template_of(processor, cfg.chat_template_text())
    key = _cache_key(path, records, processor, cfg.max_length, cfg.max_samples, loss_on, template)
    name = f"{path.stem}-{key[:20]}.pt"
    if cfg.cache_dir and paths.is_uri(cfg.cache_dir):  # s3://..., gs://...: read and written through pyarrow
        return storage.join(cfg.cache_dir, name)
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return root / name


def _fetch_remote(uri: str) -> str:
    """A local copy of the cache file at ``uri`` (streamed to a temporary file; the caller opens and unlinks it)."""
    fd, local = tempfile.mkstemp(prefix="freezetune-data-", suffix=".pt")
    os.close(fd)
    try:
        storage.download(uri, local)
    except BaseException:
        os.unlink(local)
        raise
    return local


def _read_cache(target: Path | str, path: Path) -> CacheFile | None:
    """The cache file of ``path``, opened (its index read, no example), or None when there is no usable one.
    A URI's file is downloaded to a temporary local file first (unlinked once open: nothing is left behind)."""
    remote = isinstance(target, str)  # a URI (_cache_file)
    if not (storage.is_file(target) if remote else target.is_file()):
        return None
    try:
        opened = CacheFile(_fetch_remote(target), source=target, fetch=_fetch_remote, unlink=True) if remote \
            else CacheFile(target)
    except Exception as err:  # a corrupt or foreign cache is rebuilt, never trusted
        log.warning("data cache %s unreadable (%s); tokenising again", target, err)
        return None
    cache_stats["cache_hits"] += 1
    log.info("data %s: %d examples from cache %s", path, len(opened), target)
    return opened


def _plan(cfg: DataConfig, processor, loss_on: str, files: list[Path], firsts: list[_Record]) -> _Plan:
    """The tokenising plan; a chat file with no chat template to render it is an error naming the fix
    (``firsts``: each file's first record, which gives the file's shape)."""
    if loss_on not in LOSS_ON:
        raise DataError(f"train.loss_on = {loss_on!r}: use one of {', '.join(LOSS_ON)}.")
    template = chat.template_of(processor, cfg.chat_template_text())
    for f, first in zip(files, firsts):
        if template is None and first is not None and first.conv is not None:
            raise DataError(f"{first.where}: a {first.kind} record, but the model has no chat template to "
                            "render it; set data.chat_template (Jinja text, or a .jinja file), use a model folder "
                            f"that has one (tokenizer_config.json / chat_template.jinja), or convert {f.name} to "
                            "prompt/completion records.")
    return _Plan(cfg.max_length, loss_on, template)


# ---------------------------------------------------------------- tokenising in worker processes (data.num_proc)
# Automatic num_proc: the first PROBE_RECORDS records are tokenised here and timed; worker processes take the rest
# only when it would take over AUTO_MIN_SECONDS here: a worker needs seconds to start (it imports torch, transformers
# and the processor's class: ~7 s for tiny-llava's on 2 idle cores), which text records rarely repay, images often.
PROBE_RECORDS = 100
AUTO_MIN_SECONDS = 30.0
AUTO_MAX_PROCESSES = 8
CHUNK_RECORDS = 256  # the most records a worker is given at once (its examples come back in one message)...
CHUNK_IMAGE_RECORDS = 32  # ... fewer when they have images: their pixel values can be MBs per record


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (a taskset's or container's share)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _auto_processes(seconds_left: float, records_left: int) -> int:
    """Automatic num_proc: min(CPUs, ``AUTO_MAX_PROCESSES``) processes when the records left would take over
    ``AUTO_MIN_SECONDS`` in this process, else this process alone."""
    if seconds_left < AUTO_MIN_SECONDS:
        return 1
    return max(1, min(_cpus(), AUTO_MAX_PROCESSES, records_left))


def _chunks(pairs: list, processes: int, images: bool) -> Iterator[list]:
    """Contiguous chunks of (record, rendered) pairs: about four a process for a small file (so the work evens
    out), at most ``CHUNK_RECORDS`` (``CHUNK_IMAGE_RECORDS``) records each for a large one."""
    cap = CHUNK_IMAGE_RECORDS if images else CHUNK_RECORDS
    size = max(1, min(cap, math.ceil(len(pairs) / (4 * processes))))
    for start in range(0, len(pairs), size):
        yield pairs[start:start + size]


def _tokenize_chunk(shared: tuple, pairs: list) -> list[dict[str, Any] | None]:
    """Runs in a worker process: the examples of a chunk, in order. Tensors travel as numpy arrays, pickled as
    plain bytes (torch would move each tensor through shared memory, a file descriptor apiece)."""
    processor, plan = shared
    return [_to_arrays(_tokenize(rec, processor, plan, rendered)) for rec, rendered in pairs]


def _to_arrays(example: dict | None) -> dict | None:
    if example is None:
        return None
    out = {}
    for key, value in example.items():
        try:
            out[key] = value.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16): sent as a tensor
            out[key] = value
    return out


def _from_arrays(example: dict | None) -> dict | None:
    if example is None:
        return None
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in example.items()}


class _Workers:
    """Tokenises the records of the files of one ``load_datasets`` call, in record order: in this process, or in
    ``data.num_proc`` worker processes (started for the first file that needs them, reused by the next; spawned,
    never forked, and read in chunk order: ``pipelines.data.parallel`` says why)."""

    def __init__(self, cfg: DataConfig, processor, plan: _Plan):
        self.cfg, self.processor, self.plan = cfg, processor, plan
        self._pool: parallel.OrderedPool | None = None
        self._in_process_only = False  # set once worker processes turned out not to work with this processor

    def examples(self, path: Path, records: list[_Record], rendered: list) -> Iterator[dict | None]:
        """One example per record (None: dropped, nothing left to learn), in record order, made one chunk at a
        time (memory holds a few chunks of examples, never the file's). A worker's error is raised unchanged."""
        pairs, done = list(zip(records, rendered)), 0
        if self.cfg.num_proc is not None:
            processes, how = min(self.cfg.num_proc, len(pairs)), ""
        else:  # automatic: time the first records here (the first one apart: it pays for lazy imports)
            spent = 0.0
            for rec, x in pairs[:PROBE_RECORDS]:
                started = time.perf_counter()
                example = _tokenize(rec, self.processor, self.plan, x)
                spent += (time.perf_counter() - started) if done else 0.0
                done += 1
                yield example
            left = len(pairs) - done
            estimate = spent / max(done - 1, 1) * left
            processes = _auto_processes(estimate, left)
            how = f" (the first {done} here; the other {left} would take ~{estimate:.0f} s in one)" if left else ""
        pool = self._pool_for(path, processes) if processes > 1 else None
        log.info("data %s: tokenising %d records in %d process%s%s", path, len(pairs),
                 pool.processes if pool else 1, "es" if pool else "", how)
        if pool is not None:
            chunks = _chunks(pairs[done:], pool.processes, any(r.images for r in records))
            try:
                for chunk in pool.map(_tokenize_chunk, chunks):
                    for example in chunk:
                        done += 1
                        yield _from_arrays(example)
                return
            except parallel.SetupFailed as err:  # nothing is lost: the records from `done` on go in this process
                self._give_up(path, f"a worker process could not load the processor ({err})")
            except parallel.BrokenProcessPool as err:
                raise DataError(f"{path}: a worker process tokenising it stopped ({err}); it may have run out of "
                                "memory: lower data.num_proc, or set it to 1 to tokenise in this process.") from err
        for rec, x in pairs[done:]:
            yield _tokenize(rec, self.processor, self.plan, x)

    def _pool_for(self, path: Path, processes: int) -> parallel.OrderedPool | None:
        if self._in_process_only:
            return None
        if self._pool is None:
            blob, why = parallel.pickled((self.processor, self.plan))
            if blob is None:
                self._give_up(path, f"the processor cannot be pickled for worker processes ({why})")
                return None
            self._pool = parallel.OrderedPool(processes, blob)
        return self._pool

    def _give_up(self, path: Path, why: str) -> None:
        self.close()
        self._in_process_only = True
        # a warning when data.num_proc asked for processes; information when they were only the automatic choice
        log.log(logging.WARNING if self.cfg.num_proc else logging.INFO,
                "data %s: tokenising in this process (data.num_proc ignored): %s", path, why)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tokenize_into_cache(cfg: DataConfig, path: Path, records: list[_Record], processor,
                         target: Path | str, plan: _Plan | None = None, workers: _Workers | None = None) -> CacheFile:
    """Tokenises ``records`` into the cache file ``target`` one example at a time (each goes to disk as it is
    made: memory holds the records, never the examples) and returns the file, opened. ``workers`` (default: ones
    for this file alone) tokenise in this process or in ``data.num_proc`` processes: the file is the same."""
    plan = plan or _Plan(cfg.max_length)
    # every chat record is rendered and checked before the first one is tokenised
    rendered = [_rendered(r, processor, plan) if r.conv is not None else None for r in records]
    remote = isinstance(target, str)  # a URI: written locally, then uploaded whole (storage.upload)
    folder = Path(tempfile.gettempdir()) if remote else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    own = workers is None
    workers = workers or _Workers(cfg, processor, plan)
    writer = CacheWriter(folder)
    try:
        for ex in workers.examples(path, records, rendered):
            if ex is not None:
                writer.add(ex)
        dropped = len(records) - writer.count
        if dropped:
            log.warning("data %s: %d record(s) dropped: nothing left to learn after cutting to max_length=%d",
                        path, dropped, cfg.max_length)
        if not writer.count:
            raise DataError(f"{path}: no usable examples (empty dataset after truncation to max_length="
                            f"{cfg.max_length}).")
        cache_stats["tokenized_files"] += 1
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                writer.write(fh)
            # this process reads its own copy (unlinked once open): the cache file itself may be replaced, or
            # rewritten in place by hand, without changing what the returned examples read
            opened = CacheFile(tmp, source=target, fetch=_fetch_remote if remote else None)
            if remote:  # one whole object, never half of one
                storage.upload(tmp, target)
            else:
                fd, shared = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
                os.close(fd)
                try:
                    shutil.copyfile(tmp, shared)
                    os.replace(shared, target)  # atomic: concurrent workers never read half a file
                finally:
                    if os.path.exists(shared):
                        os.unlink(shared)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        writer.close()
        if own:
            workers.close()
    log.info("data %s: tokenised %d examples into %s", path, len(opened), target)
    return opened


# ---------------------------------------------------------------- datasets
def _record_bytes(cfg: DataConfig) -> int:
    return int(cfg.max_record_mb * 1e6)


def load_datasets(cfg: DataConfig, processor, seed: int, head: Head | None = None,
                  loss_on: str = "assistant") -> tuple[Examples, Examples]:
    """Returns (train, eval): lazy read-only sequences of examples (dicts of tensors), read from the on-disk
    cache when accessed (:class:`pipelines.data.lazy.Examples`: ``len``, ``ds[i]``, slices, iteration).

    Both files are read and checked (against the model's ``head`` when given) before anything is
    tokenised; on a cache hit no record is kept (they stream past the checks and the cache key). ``loss_on``:
    ``"assistant"`` labels only what the model should answer (assistant turns of chat records, completions,
    responses), ``"all"`` every token but image slots. Without ``cfg.eval``, a seeded shuffle holds out
    ``eval_fraction`` of train (eval is empty when it is 0).
    """
    cfg.validate()
    image_token = _image_token(processor)
    files = [Path(cfg.train)] + ([Path(cfg.eval)] if cfg.eval else [])

    def records(f: Path) -> Iterator[_Record]:
        return iter_records(f, cfg.image_root, cfg.max_samples, image_token, head=head,
                            max_record_bytes=_record_bytes(cfg))

    scans = [_scan(records(f)) for f in files]  # every record of every file checked; none kept
    plan = _plan(cfg, processor, loss_on, files, [s.first for s in scans])
    targets = [_cache_file(cfg, f, scan, processor, loss_on) for f, scan in zip(files, scans)]
    cached = [_read_cache(t, f) for t, f in zip(targets, files)]
    # the files to tokenise are read again, kept this time; every image of each is checked before any tokenising
    missed = {i: list(records(files[i])) for i, hit in enumerate(cached) if hit is None}
    for recs in missed.values():
        _check_image_headers(recs)
    with _Workers(cfg, processor, plan) as workers:  # worker processes (data.num_proc), if any, serve both files
        opened = [hit if hit is not None else _tokenize_into_cache(cfg, files[i], missed.pop(i), processor,
                                                                   targets[i], plan, workers)
                  for i, hit in enumerate(cached)]
    train = Examples(opened[0])
    if cfg.eval:
        return train, Examples(opened[1])
    if cfg.eval_fraction == 0:
        return train, train[:0]
    n_eval = max(1, round(len(train) * cfg.eval_fraction))
    if n_eval >= len(train):
        raise DataError(f"{cfg.train}: {len(train)} example(s) are too few to hold out eval_fraction="
                        f"{cfg.eval_fraction}; add data, give data.eval, or set data.eval_fraction=0.")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.take(order[n_eval:]), train.take(order[:n_eval])


def shard(dataset: Sequence, rank: int, world_size: int) -> Sequence:
    """Returns worker ``rank``'s part: every ``world_size``-th example, the remainder dropped.

    Parts are disjoint and equally long, so every DDP worker runs the same number of steps.
    With fewer examples than workers every part is empty; the caller decides whether that is an error.
    A sequence is sliced (an ``Examples`` gives a lazy view, a list a list); any other indexable gives a list.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is not in [0, {world_size})")
    stop = len(dataset) // world_size * world_size
    if isinstance(dataset, Sequence):
        return dataset[rank:stop:world_size]
    return [dataset[i] for i in range(rank, stop, world_size)]


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Returns a padded batch for the model's forward: ``input_ids``, ``attention_mask``, ``labels``
    (B, T), right-padded with ``pad_token_id`` / 0 / -100, other per-token fields padded with 0, and the
    image tensors merged as the model's processor batches them (:func:`_merge_vision`).

    Examples without images (text-only records of a chat file that has images elsewhere) may share a batch with
    examples that have them: they add no image tensors (and 0 to per-token fields such as Qwen2-VL's
    ``mm_token_type_ids``). The VLMs take that: LLaVA, Idefics3 and Qwen2-VL encode the batch's images in order
    and scatter the features into the ``<image>`` slots of the whole batch, never matching images to rows.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    length = max(len(ex["input_ids"]) for ex in batch)
    size = (len(batch), length)
    out = {
        "input_ids": torch.full(size, pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(size, dtype=torch.long),
    }
    sequence_labels = batch[0]["labels"].dim() == 1
    out["labels"] = torch.full(size, IGNORE_INDEX, dtype=torch.long) if sequence_labels else \
        torch.stack([ex["labels"] for ex in batch])
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][i, :n] = ex["input_ids"]
        out["attention_mask"][i, :n] = ex["attention_mask"]
        if sequence_labels:
            out["labels"][i, :n] = ex["labels"]
    for key in sorted(set().union(*batch) - {"input_ids", "attention_mask", "labels"}):
        have = [ex for ex in batch if key in ex]
        values = [ex[key] for ex in have]
        if all(v.shape == ex["input_ids"].shape for v, ex in zip(values, have)):  # per token (mm_token_type_ids)
            out[key] = torch.zeros(size, dtype=values[0].dtype)  # 0 where an example lacks it: a text token
            for i, ex in enumerate(batch):
                if key in ex:
                    out[key][i, : len(ex[key])] = ex[key]
        else:  # image tensors: only the examples that have images have them
            out[key] = _merge_vision(values)
    return out


def _merge_vision(values: list[torch.Tensor]) -> torch.Tensor:
    """One record's image tensors as its processor returns them for a batch of one, merged the way the processor
    merges a batch: concatenated along dim 0 (LLaVA's images, Qwen2-VL's patches and grid rows, Idefics3's batch
    axis), the other dims zero-padded to the largest (Idefics3's image count: the model drops all-zero images)."""
    if any(v.dim() != values[0].dim() for v in values):
        raise ValueError("collate: image tensors of different ranks in one batch")
    if values[0].dim() == 0:
        return torch.stack(values)
    biggest = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
    padded = []
    for v in values:
        pad = []
        for d in reversed(range(1, v.dim())):
            pad += [0, biggest[d] - v.shape[d]]
        padded.append(torch.nn.functional.pad(v, pad) if any(pad) else v)
    return torch.cat(padded)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Returns the number of non-padding tokens in a collated batch."""
    return int(batch["attention_mask"].sum())
