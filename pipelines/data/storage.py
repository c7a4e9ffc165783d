"""Local folders and filesystem URIs alike: ``/shared/runs``, ``s3://bucket/runs``, ``gs://bucket/cache``.

Ray keeps checkpoints wherever ``pyarrow.fs.FileSystem.from_uri`` can write, so the project checks,
creates, reads and writes its own files there through the same call: a URI is never turned into a local
path (``Path("s3://b/runs")`` is the local folder ``s3:/b/runs``). A URI may carry pyarrow's options in
its query (``s3://bucket/runs?endpoint_override=host:9000&scheme=http``): ``join`` keeps the query at the
end, so every path built from it opens with the same options. Credentials and an endpoint can also come
from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from pipelines.config.paths import is_uri

# stores where an upload appears whole or not at all (an object is visible once its PUT or multipart upload
# completes) and a move would be a copy: written in place
OBJECT_STORES = ("s3", "gcs", "abfs")


# schemes whose filesystem path is the URI's host (the bucket) and path: the rest are asked of pyarrow
BUCKET_SCHEMES = ("s3", "gs", "gcs")


class StorageError(ValueError):
    """A storage location pyarrow cannot open or write."""

    user_facing = True


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(base: str) -> pafs.FileSystem:
    """One filesystem per scheme, bucket and options: ``from_uri`` asks S3 for the bucket's region."""
    return pafs.FileSystem.from_uri(base)[0]


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``path`` and the path on it (a local path: absolute, ``~`` expanded)."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        parts = urlsplit(path)
        if parts.scheme.lower() in BUCKET_SCHEMES:
            fs = _bucket_filesystem(urlunsplit((parts.scheme, parts.netloc, "", parts.query, "")))
            return fs, (parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")
        return pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise StorageError(f"{path}: not a location pyarrow can open ({err}); use a local folder or a URI such "
                           "as s3://bucket/prefix or gs://bucket/prefix.") from None


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...``; on a URI the parts go into its path and its query stays at the end."""
    base = str(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    s = urlsplit(base)
    path = "/".join([s.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((s.scheme, s.netloc, path, s.query, s.fragment))


def uri_of(root: str | os.PathLike, fs_path: str) -> str:
    """The location under ``root`` (a folder or URI) of ``fs_path``, a path on ``root``'s filesystem (what
    Ray's ``Checkpoint.path`` is: no scheme, no options)."""
    root = str(root)
    if not is_uri(root):
        return fs_path
    _, root_fs_path = filesystem(root)
    rel = posixpath.relpath(fs_path, root_fs_path)
    if rel == ".":
        return root
    if rel.startswith(".."):
        raise StorageError(f"{fs_path} is not under {root}")
    return join(root, rel)


def _info(path: str | os.PathLike) -> pafs.FileInfo:
    fs, fs_path = filesystem(path)
    return fs.get_file_info(fs_path)


def exists(path: str | os.PathLike) -> bool:
    """A file or folder (on an object store: an object, or a prefix with objects under it) at ``path``."""
    if not is_uri(str(path)):
        return os.path.exists(os.path.expanduser(str(path)))
    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: str | os.PathLike) -> bool:
    if not is_uri(str(path)):
        return os.path.isdir(os.path.expanduser(str(path)))
    return _info(path).type == pafs.FileType.Directory


def is_file(path: str | os.PathLike) -> bool:
    if not is_uri(str(path)):
        return os.path.isfile(os.path.expanduser(str(path)))
    return _info(path).type == pafs.FileType.File


def list_dirs(path: str | os.PathLike) -> list[str]:
    """The folders directly in ``path`` (a folder or a URI), as paths or URIs like ``path``; [] when it is none."""
    fs, fs_path = filesystem(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True))
    except (OSError, NotADirectoryError):
        return []
    return [join(path, info.base_name) for info in found if info.type == pafs.FileType.Directory]


def mkdir(path: str | os.PathLike) -> None:
    """Create the folder ``path`` and its parents (on an object store: a folder marker; the bucket must exist)."""
    if not is_uri(str(path)):
        Path(path).expanduser().mkdir(parents=True, exist_ok=True)
        return
    fs, fs_path = filesystem(path)
    fs.create_dir(fs_path, recursive=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_uri(str(path)):
        return Path(path).expanduser().read_bytes()
    fs, fs_path = filesystem(path)
    with fs.open_input_stream(fs_path) as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    _write(path, lambda f: f.write(data))


def upload(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the local file ``local`` to ``path`` (a local path or a URI), streamed in chunks (never the whole
    file in memory), with ``write_bytes``' guarantee: a reader sees the old file or the whole new one."""
    with open(local, "rb") as src:
        _write(path, lambda f: _copy(src.read, f.write))


def download(path: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy the file at ``path`` (a local path or a URI) to the local file ``local``, streamed in chunks."""
    fs, fs_path = filesystem(path)
    with fs.open_input_stream(fs_path) as src, open(local, "wb") as dst:
        _copy(src.read, dst.write)


CHUNK = 8 << 20


def _copy(read, write) -> None:
    while True:
        chunk = read(CHUNK)
        if not chunk:
            return
        write(chunk)


def _write(path: str | os.PathLike, fill) -> None:
    """Opens ``path`` for writing, lets ``fill(stream)`` write it, and makes it visible whole."""
    fs, fs_path = filesystem(path)
    parent = posixpath.dirname(fs_path) if is_uri(str(path)) else os.path.dirname(fs_path)
    if fs.type_name in OBJECT_STORES:
        with fs.open_output_stream(fs_path) as f:  # visible only once the upload completes
            fill(f)
        return
    fs.create_dir(parent, recursive=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(fs_path)}")
    try:
        with fs.open_output_stream(tmp) as f:
            fill(f)
        fs.move(tmp, fs_path)  # a rename on a filesystem
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def remove(path: str | os.PathLike) -> None:
    """Delete the file at ``path`` (nothing when there is none)."""
    fs, fs_path = filesystem(path)
    if fs.get_file_info(fs_path).type == pafs.FileType.File:
        fs.delete_file(fs_path)
