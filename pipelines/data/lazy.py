"""Tokenised examples on disk, read one at a time: the data cache's file format, its writer and lazy sequences.

A worker never holds the data set: ``load_datasets`` hands out :class:`Examples`, read-only sequences whose
examples are read from the cache file when they are accessed (``ds[i]``), and whose slices and shards are views
(an index, no data). What a worker holds is the file's *index* — a few int64 arrays, about 100 bytes per example —
and the batch it is collating.

The file (``CacheWriter``) is a safetensors file (``safetensors.safe_open`` reads it; the format: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then the bytes). Per
field of the examples (``input_ids``, ``labels``, ``pixel_values``, ...) it holds, as ``_pack`` did before:

    ``<field>/data``     every example's tensor flattened and concatenated (1-D)
    ``<field>/shapes``   (examples that have the field, ndim) int64: each one's shape
    ``<field>/present``  (examples,) bool, only when some examples lack the field (a chat file mixing records
                         with and without images: the text-only ones have no image tensors)

and, in the header's ``__metadata__``, the format, its version, the example count and the fields in order.

Reading (``CacheFile``): the header and the ``shapes`` / ``present`` tensors are read once (the index); an example
is one positioned read (``os.preadv``) per field straight into a fresh tensor. No mmap: mapped file pages count in
the process's RSS once touched (an epoch touches them all), and positioned reads leave the file in the kernel's page
cache, shared and reclaimable, not in the worker. Positioned reads are also safe in forked and threaded readers
(no shared file offset), and an ``Examples`` pickles (the file is reopened where it is unpickled).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import shutil
import struct
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FORMAT = "freezetune.examples"
VERSION = "1"
_HEADER_MAX = 100 << 20  # a header longer than this is not one of ours

# torch dtype <-> safetensors dtype name
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_BY_CODE = {code: dtype for dtype, code in _DTYPES.items()}


class CacheFormatError(ValueError):
    """A file that is not a complete examples cache of this format (truncated, foreign, corrupt)."""


# ---------------------------------------------------------------- writing
class _Field:
    def __init__(self, key: str, dtype: torch.dtype, ndim: int, spool):
        self.key, self.dtype, self.ndim, self.spool = key, dtype, ndim, spool
        self.shapes = array("q")  # flattened (owners, ndim)
        self.owners = array("q")  # the examples that have this field
        self.numel = 0


class CacheWriter:
    """Writes examples one at a time (each field's bytes spooled to a temporary file beside the target), then
    the cache file in one pass: memory holds the shapes, never the examples."""

    def __init__(self, spool_dir: str | os.PathLike | None = None):
        self._dir = str(spool_dir) if spool_dir is not None else None
        self._fields: dict[str, _Field] = {}
        self.count = 0

    def add(self, example: dict[str, torch.Tensor]) -> None:
        for key, value in example.items():
            field = self._fields.get(key)
            if field is None:
                if value.dtype not in _DTYPES:
                    raise ValueError(f"example field `{key}`: dtype {value.dtype} cannot be cached")
                field = self._fields[key] = _Field(key, value.dtype, value.dim(), tempfile.TemporaryFile(dir=self._dir))
            if value.dim() != field.ndim:
                raise ValueError(f"examples whose `{key}` tensors differ in rank")  # one processor: does not happen
            if value.dtype != field.dtype:
                raise ValueError(f"examples whose `{key}` tensors differ in dtype ({field.dtype}, {value.dtype})")
            flat = value.detach().reshape(-1).contiguous()
            if flat.numel():
                field.spool.write(memoryview(flat.view(torch.uint8).numpy()))
            field.shapes.extend(value.shape)
            field.owners.append(self.count)
            field.numel += flat.numel()
        self.count += 1

    def _tensors(self) -> list[tuple[str, str, list[int], int, Callable[[Any], None]]]:
        """(name, dtype code, shape, nbytes, write) for every tensor, largest element size first: every tensor
        then starts at a multiple of its element size, and the byte buffer has no holes (safetensors' rule)."""
        out = []
        for f in self._fields.values():
            owners = len(f.owners)
            shapes = np.frombuffer(f.shapes, dtype=np.int64) if len(f.shapes) else np.zeros(0, dtype=np.int64)
            out.append((f"{f.key}/shapes", "I64", [owners, f.ndim], shapes.nbytes,
                        lambda fh, b=shapes: fh.write(memoryview(b))))
            itemsize = torch.empty(0, dtype=f.dtype).element_size()

            def copy(fh, spool=f.spool):
                spool.seek(0)
                shutil.copyfileobj(spool, fh, 1 << 20)

            out.append((f"{f.key}/data", _DTYPES[f.dtype], [f.numel], f.numel * itemsize, copy))
            if owners != self.count:
                present = np.zeros(self.count, dtype=np.bool_)
                present[np.frombuffer(f.owners, dtype=np.int64)] = True
                out.append((f"{f.key}/present", "BOOL", [self.count], present.nbytes,
                            lambda fh, b=present: fh.write(memoryview(b.view(np.uint8)))))
        size = {code: torch.empty(0, dtype=dtype).element_size() for dtype, code in _DTYPES.items()}
        return sorted(out, key=lambda t: -size[t[1]])  # stable: fields keep their order within a size

    def write(self, fh) -> None:
        """Writes the cache file to the binary file object ``fh``; the writer is spent afterwards."""
        tensors = self._tensors()
        header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "version": VERSION, "count": str(self.count),
                                                   "fields": json.dumps(list(self._fields))}}
        at = 0
        for name, code, shape, nbytes, _ in tensors:
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [at, at + nbytes]}
            at += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the byte buffer starts 8-aligned
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for *_, nbytes, write in tensors:
            write(fh)
        self.close()

    def close(self) -> None:
        for f in self._fields.values():
            f.spool.close()
        self._fields = {}


# ---------------------------------------------------------------- reading
class _Column:
    """One field's index: where each example's bytes start (elements), its shape, which examples have it."""

    def __init__(self, key: str, dtype: torch.dtype, offset: int, shapes: np.ndarray, present: np.ndarray | None,
                 count: int):
        self.key, self.dtype, self.offset = key, dtype, offset
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        numels = shapes.prod(axis=1) if shapes.shape[1] != 1 else shapes[:, 0]
        self.starts = np.zeros(len(shapes) + 1, dtype=np.int64)
        np.cumsum(numels, out=self.starts[1:])
        self.shapes = shapes if shapes.shape[1] != 1 else None  # 1-D: the shape is the element count
        self.ndim = shapes.shape[1]
        if present is None:
            self.slot = None
        else:
            if len(present) != count or int(present.sum()) != len(shapes):
                raise CacheFormatError(f"`{key}`: present does not match its shapes")
            self.slot = np.where(present, np.cumsum(present) - 1, -1).astype(np.int64)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.starts, self.shapes, self.slot) if a is not None)


def _read_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:  # pread may return less (signals, network filesystems)
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise CacheFormatError(f"the file ends at byte {offset + len(data)}, {n - len(data)} bytes early")
        data += more
    return data


def _read_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fills the uint8 tensor ``out`` from ``fd`` at ``offset`` (no copy through Python bytes where possible)."""
    view = memoryview(out.numpy())
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, len(view) - done, offset + done)
            view[done:done + len(chunk)] = chunk
            got = len(chunk)
        if got <= 0:
            raise CacheFormatError(f"the file ends at byte {offset + done}, {len(view) - done} bytes early")
        done += got


class CacheFile:
    """An examples cache file, opened: its index in memory, its examples read on access (:meth:`read`).

    ``path`` is the file opened now; ``source`` where it is opened again by a copy of this object made by pickling
    (default: ``path``): the cache file of which ``path`` is a private copy (``unlink``: ``path`` is removed once
    open, the open descriptor keeps it readable, so nothing is left behind), or a URI that ``fetch(source) ->
    local path`` downloads again. The reopened file must have the same header as the one opened first."""

    def __init__(self, path: str | os.PathLike, source: str | None = None,
                 fetch: Callable[[str], str] | None = None, unlink: bool = False):
        self.path = str(path)
        self.source = str(source or self.path)
        self._fetch = fetch
        self._fd: int | None = None
        self._fingerprint: str | None = None
        self._open(self.path, unlink)
        try:
            self._load_index()
        except BaseException:
            self.close()
            raise

    # -- opening
    def _open(self, path: str, unlink: bool) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if unlink:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._fd = fd

    def _reopen(self) -> None:
        """In a process that got this object by pickling: open the file again (fetched again from ``source``
        when it was a temporary copy) and check it is the same file."""
        if self._fetch is not None:
            self._open(self._fetch(self.source), unlink=True)
        else:
            self._open(self.source, unlink=False)
        if self._header_fingerprint() != self._fingerprint:
            os.close(self._fd)
            self._fd = None
            raise CacheFormatError(f"{self.source}: the cache file changed since it was opened")

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._reopen()
        return self._fd

    def _header(self) -> tuple[int, bytes]:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise CacheFormatError(f"{size} bytes: too short for a header")
        (n,) = struct.unpack("<Q", _read_exact(self._fd, 8, 0))
        if not 2 <= n <= min(_HEADER_MAX, size - 8):
            raise CacheFormatError(f"header length {n} does not fit a {size}-byte file")
        return size, _read_exact(self._fd, n, 8)

    def _header_fingerprint(self) -> str:
        size, raw = self._header()
        return hashlib.sha256(raw + str(size).encode()).hexdigest()

    def _load_index(self) -> None:
        size, raw = self._header()
        self._fingerprint = hashlib.sha256(raw + str(size).encode()).hexdigest()
        try:
            header = json.loads(raw)
            meta = header.pop("__metadata__")
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise CacheFormatError(f"format {meta.get('format')!r} version {meta.get('version')!r}, not "
                                       f"{FORMAT!r} version {VERSION!r}")
            count, fields = int(meta["count"]), json.loads(meta["fields"])
            base = 8 + len(raw)
            end = 0
            for name, info in header.items():
                begin, stop = info["data_offsets"]
                itemsize = torch.empty(0, dtype=_BY_CODE[info["dtype"]]).element_size()
                want = int(np.prod(info["shape"], dtype=np.int64)) * itemsize
                if stop - begin != want or begin < 0:
                    raise CacheFormatError(f"`{name}`: {stop - begin} bytes for shape {info['shape']}")
                end = max(end, stop)
            if base + end != size:
                raise CacheFormatError(f"the header describes {base + end} bytes, the file has {size}")
            self.count = count
            self.fields = fields
            self._columns = [self._column(header, base, key, count) for key in fields]
        except CacheFormatError:
            raise
        except (ValueError, KeyError, TypeError) as err:  # malformed JSON or header entries
            raise CacheFormatError(f"not an examples cache header ({type(err).__name__}: {err})") from None

    def _array(self, header: dict, base: int, name: str, dtype) -> np.ndarray:
        info = header[name]
        begin, stop = info["data_offsets"]
        return np.frombuffer(_read_exact(self._fd, stop - begin, base + begin), dtype=dtype).reshape(info["shape"])

    def _column(self, header: dict, base: int, key: str, count: int) -> _Column:
        shapes = self._array(header, base, f"{key}/shapes", np.int64)
        present = self._array(header, base, f"{key}/present", np.bool_) if f"{key}/present" in header else None
        if present is None and len(shapes) != count:
            raise CacheFormatError(f"`{key}`: {len(shapes)} shapes for {count} examples")
        data = header[f"{key}/data"]
        column = _Column(key, _BY_CODE[data["dtype"]], base + data["data_offsets"][0], shapes, present, count)
        if int(column.starts[-1]) != int(data["shape"][0]):
            raise CacheFormatError(f"`{key}`: the shapes hold {int(column.starts[-1])} elements, the data "
                                   f"{data['shape'][0]}")
        return column

    # -- reading
    def __len__(self) -> int:
        return self.count

    def read(self, i: int) -> dict[str, torch.Tensor]:
        """Example ``i`` (0 <= i < count): a dict of fresh tensors, as it was written."""
        fd, out = self.fd, {}
        for col in self._columns:
            j = i if col.slot is None else int(col.slot[i])
            if j < 0:
                continue
            a, b = int(col.starts[j]), int(col.starts[j + 1])
            buf = torch.empty((b - a) * col.itemsize, dtype=torch.uint8)
            if b > a:
                _read_into(fd, buf, col.offset + a * col.itemsize)
            value = buf.view(col.dtype)
            if col.shapes is not None:
                value = value.view(tuple(int(s) for s in col.shapes[j]))
            out[col.key] = value
        return out

    def lengths(self, key: str = "input_ids") -> np.ndarray:
        """Every example's element count of ``key`` (its token count for ``input_ids``) from the index alone."""
        for col in self._columns:
            if col.key == key:
                if col.slot is not None or col.ndim != 1:
                    raise ValueError(f"lengths: `{key}` is not a 1-D field every example has")
                return np.diff(col.starts)
        raise KeyError(key)

    def index_bytes(self) -> int:
        """The memory the index takes (the arrays an open file keeps)."""
        return sum(col.nbytes() for col in self._columns)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None  # reopened where it is unpickled (CacheFile.fd)
        return state

    def __repr__(self) -> str:
        return f"CacheFile({self.source!r}, {self.count} examples)"


# ---------------------------------------------------------------- sequences
class Examples(Sequence):
    """A read-only sequence of examples (dicts of tensors) read from a :class:`CacheFile` on access.

    ``len(ds)``, ``ds[i]`` (negative too; each access reads the example again, into fresh tensors), ``ds[a:b:c]``
    (a view: an ``Examples`` over the same file, nothing read), iteration (one example at a time), ``take(idx)``
    (a view of the given positions), ``lengths()`` (token counts from the index, nothing read) and
    ``materialize()`` (a list: everything read, for small sets). Picklable: the file is reopened where it lands.
    """

    __slots__ = ("_file", "_index")

    def __init__(self, file: CacheFile, index: range | np.ndarray | None = None):
        self._file = file
        self._index = range(len(file)) if index is None else index

    @property
    def file(self) -> CacheFile:
        return self._file

    @property
    def indices(self) -> range | np.ndarray:
        """The positions in the file this view reads, in order."""
        return self._index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return Examples(self._file, self._index[key])
        if isinstance(key, (bool, np.bool_)):
            raise TypeError("Examples indices must be integers or slices, not bool")
        try:
            i = operator.index(key)
        except TypeError:
            raise TypeError(f"Examples indices must be integers or slices, not {type(key).__name__}") from None
        n = len(self._index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example index {key} out of range for {n} examples")
        return self._file.read(int(self._index[i]))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for j in self._index:
            yield self._file.read(int(j))

    def take(self, positions: Iterable[int] | np.ndarray | torch.Tensor) -> "Examples":
        """A view of this sequence's examples at ``positions`` (in that order)."""
        if isinstance(positions, torch.Tensor):
            positions = positions.numpy()
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        n = len(self._index)
        if positions.size and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"take: a position out of range for {n} examples")
        return Examples(self._file, self._positions()[positions])

    def _positions(self) -> np.ndarray:
        if isinstance(self._index, range):
            r = self._index
            return np.arange(r.start, r.stop, r.step, dtype=np.int64)
        return self._index

    def lengths(self, key: str = "input_ids") -> np.ndarray:
        """Each example's token count (the element count of ``key``), from the file's index: nothing is read."""
        return self._file.lengths(key)[self._positions()]

    def materialize(self) -> list[dict[str, torch.Tensor]]:
        return list(self)

    def __repr__(self) -> str:
        return f"Examples({len(self)} of {self._file.count} in {self._file.source})"

    def __getstate__(self):
        return {"file": self._file, "index": self._index}

    def __setstate__(self, state) -> None:
        self._file, self._index = state["file"], state["index"]


def write_examples(examples: Iterable[dict[str, torch.Tensor]], path: str | os.PathLike) -> int:
    """Writes ``examples`` as a cache file at ``path`` (not atomically: a helper for tests and tools); returns
    how many were written."""
    writer = CacheWriter(Path(path).parent)
    try:
        for ex in examples:
            writer.add(ex)
        with open(path, "wb") as fh:
            writer.write(fh)
    finally:
        writer.close()
    return writer.count
