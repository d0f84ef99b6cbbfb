"""File helpers shared by shard writers, checkpoints, the converter and the wheelhouse tool:
crash-safe writes (write a temp file, fsync it, rename it over the target, fsync the directory)
and file digests. Standard library only: tools/wheelhouse.py uses it before anything is
installed."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

TMP_SUFFIX = ".tmp"
_HASH_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flushes a directory entry (a rename) to disk; filesystems that refuse are skipped."""
    try:
        fd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` via a fsync'd temp file and ``os.replace``."""
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """Writes ``obj`` as indented JSON (plus a newline) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, **dumps_kwargs) + "\n")
