"""The crash-safe shard directory shared by the image-embedding, image and instruction formats.

A shard directory holds numbered shards (``shard_00000.*``, ...) and an ``index.json`` that
lists every finished shard with its files' sizes and sha256 and names the directory's kind
(``format``, read alone by :func:`shard_format`). :class:`ShardWriter` and
:class:`ShardReader` are the base classes of the per-kind writers and readers
(:mod:`megatron_vlm.data.embedding_shards`, :mod:`megatron_vlm.data.image_shards`,
:mod:`megatron_vlm.data.instruction_shards`): a
subclass names its per-shard files and writes or reads each record's bytes; this module opens
temp files, finishes shards, keeps the index and the set of written keys, resumes after the
shards an earlier run finished, checks sizes (and, on request, hashes) when reading, maps the
files lazily and locates rows and keys. Byte layouts: docs/data.md.

Crash safety: every shard file is written under a ``.tmp`` name, fsync'd and renamed into place,
and only then is the shard entered into the directory's index (itself replaced atomically). A
shard is complete exactly when the index lists it; anything else found on disk is left over
from an interrupted run and is removed or rewritten when a writer opens the directory again.

The formats are little-endian and read by memory-mapping, so importing this module on a
big-endian host fails. torch is not imported here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from typing import Any, Optional

import numpy as np

from megatron_vlm.fsutil import TMP_SUFFIX, raise_naming, sha256_file, write_json_atomic
from megatron_vlm.fsutil import fsync_dir as _fsync_dir

if sys.byteorder != "little":  # the formats are little-endian and read by memory-mapping
    raise ImportError("megatron_vlm.data.shard_io needs a little-endian host")

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
_LOCK_NAME = ".writer.lock"


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------

def read_json(path: str) -> Any:
    """The JSON value in ``path``; ValueError naming the file if it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


class _HashingFile:
    """A binary output file written under a temp name, hashed and counted as it is written."""

    def __init__(self, final_path: str):
        self.final_path = final_path
        self.tmp_path = final_path + TMP_SUFFIX
        self._f = open(self.tmp_path, "wb")
        self._hash = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as err:  # a full disk: the message names the file
            raise_naming(err, self.tmp_path)
        self._hash.update(data)
        self.nbytes += len(data)

    def commit(self) -> dict:
        """fsync, rename into place; returns the file's index entry."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as err:
            raise_naming(err, self.tmp_path)
        os.replace(self.tmp_path, self.final_path)
        return {"file": os.path.basename(self.final_path), "bytes": self.nbytes,
                "sha256": self._hash.hexdigest()}

    def abort(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # data a full disk did not take: the file is deleted anyway
                pass
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def as_int_array(key: str, name: str, value: Any, dtype, low: int, high: int) -> np.ndarray:
    """A 1-D integer array with values in [low, high), or ValueError naming key and field."""
    arr = np.asarray(value.cpu() if hasattr(value, "cpu") else value)
    if arr.size == 0:
        return np.zeros(0, dtype=dtype)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"record {key!r}: {name} must be a 1-D sequence of integers, got "
                         f"shape {arr.shape} dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < low or hi >= high:
        raise ValueError(f"record {key!r}: {name} values must lie in [{low}, {high}), "
                         f"found {lo if lo < low else hi}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"record key must be a non-empty string, got {key!r}")
    return key


# --------------------------------------------------------------------------------------------
# Shard directories: shared writer/reader machinery
# --------------------------------------------------------------------------------------------

def _shard_stem(index: int) -> str:
    return f"shard_{index:05d}"


class ShardWriter:
    """Base class: writes records into numbered shards of a directory with a crash-safe
    ``index.json``.

    Subclasses name their per-shard files (``FILE_KINDS``, suffix per kind) and write each
    record's bytes; this class opens temp files, finishes shards, maintains the index and the
    set of written keys, and resumes after the shards an earlier run finished.
    """

    FORMAT = ""
    FILE_KINDS: dict[str, str] = {}

    def __init__(self, directory: str | os.PathLike, rows_per_shard: int, header: dict):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard} must be at least 1")
        self.directory = os.fspath(directory)
        self.rows_per_shard = int(rows_per_shard)
        os.makedirs(self.directory, exist_ok=True)
        self._lock_file = open(os.path.join(self.directory, _LOCK_NAME), "w")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{self.directory}: another writer has this directory open") from None
        self.closed = False
        try:
            self._open_index(header)
        except BaseException:
            self._release()
            raise

    def _open_index(self, header: dict) -> None:
        self._index_path = os.path.join(self.directory, INDEX_NAME)
        if os.path.exists(self._index_path):
            self._index = read_json(self._index_path)
            _check_format(self._index, self.FORMAT, self._index_path)
            for name, value in header.items():
                if self._index.get(name) != value:
                    raise ValueError(f"{self._index_path}: existing shards have {name}="
                                     f"{self._index.get(name)!r}, this writer was opened with "
                                     f"{name}={value!r}; use another directory")
        else:
            self._index = {"format": self.FORMAT, "version": FORMAT_VERSION, **header,
                           "rows": 0, "shards": []}
        self._index["rows_per_shard"] = self.rows_per_shard
        self._remove_leftovers()
        self._keys: set[str] = set()
        for entry in self._index["shards"]:
            for rec in _read_records(self.directory, entry):
                self._keys.add(rec["key"])
        self._files: Optional[dict[str, _HashingFile]] = None
        self._shard_keys: list[str] = []
        write_json_atomic(self._index_path, self._index)

    # ---- resume information ----------------------------------------------------------------

    def finished_shards(self) -> set[int]:
        """Numbers of the shards that are complete (listed in index.json)."""
        return set(range(len(self._index["shards"])))

    def written_keys(self) -> set[str]:
        """Keys of all records in finished shards; a resuming tool skips these inputs."""
        done = set(self._keys)
        return done.difference(self._shard_keys)

    def shard_meta(self, shard: int) -> dict:
        """The ``meta`` dict a tool stored with a finished shard (see :meth:`flush_shard`)."""
        return dict(self._index["shards"][shard].get("meta", {}))

    @property
    def rows(self) -> int:
        """Rows in finished shards plus rows added to the current shard."""
        return int(self._index["rows"]) + len(self._shard_keys)

    # ---- writing ----------------------------------------------------------------------------

    def _remove_leftovers(self) -> None:
        """Deletes temp files and files of shards an interrupted run did not finish."""
        listed = {f["file"] for entry in self._index["shards"] for f in entry["files"].values()}
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(TMP_SUFFIX) or (name.startswith("shard_") and name not in listed):
                os.remove(path)

    def _check_new_key(self, key: str) -> str:
        if self.closed:
            raise ValueError(f"{self.directory}: writer is closed")
        key = _check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r}: already written to {self.directory}")
        return key

    def _begin_row(self, key: str) -> dict[str, _HashingFile]:
        if self._files is None:
            stem = os.path.join(self.directory, _shard_stem(len(self._index["shards"])))
            self._files = {kind: _HashingFile(stem + suffix)
                           for kind, suffix in self.FILE_KINDS.items()}
            self._start_shard(self._files)
        return self._files

    def _end_row(self, key: str, record: dict) -> None:
        self._files["records"].write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._keys.add(key)
        self._shard_keys.append(key)
        if len(self._shard_keys) >= self.rows_per_shard:
            self.flush_shard()

    def _start_shard(self, files: dict[str, _HashingFile]) -> None:
        """Hook: write per-shard headers (for example the first offset)."""

    def flush_shard(self, meta: Optional[dict] = None) -> Optional[int]:
        """Finishes the current shard now (even if not full) and records ``meta`` with it.

        Returns the finished shard's number, or None when the current shard is empty. A tool
        that maps each input file to its own output shard calls this after each input and
        stores the input's name in ``meta``; on resume :meth:`shard_meta` tells it what is done.
        """
        if self._files is None or not self._shard_keys:
            return None
        entry = {"name": _shard_stem(len(self._index["shards"])), "rows": len(self._shard_keys),
                 "files": {kind: f.commit() for kind, f in self._files.items()}}
        if meta:
            entry["meta"] = dict(meta)
        _fsync_dir(self.directory)
        self._index["shards"].append(entry)
        self._index["rows"] = int(self._index["rows"]) + entry["rows"]
        write_json_atomic(self._index_path, self._index)
        self._files = None
        self._shard_keys = []
        return len(self._index["shards"]) - 1

    def abort(self) -> None:
        """Drops the current unfinished shard (its rows are not written) and closes."""
        if self._files is not None:
            for f in self._files.values():
                f.abort()
        self._keys.difference_update(self._shard_keys)
        self._files = None
        self._shard_keys = []
        self._release()

    def close(self) -> None:
        """Finishes the current shard and the index."""
        if self.closed:
            return
        self.flush_shard()
        self._release()

    def _release(self) -> None:
        if not self.closed:
            self.closed = True
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error the unfinished shard is dropped, so it can never pass for a complete one.
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_format(index: dict, fmt: str, path: str) -> None:
    if index.get("format") != fmt:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {fmt!r}")
    if index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {index.get('version')!r}, this code reads "
                         f"version {FORMAT_VERSION}")


def shard_format(directory: str | os.PathLike) -> str:
    """The ``format`` named by a shard directory's ``index.json`` (which kind of shards it
    holds), without opening its shards; FileNotFoundError when there is no index."""
    index_path = os.path.join(os.fspath(directory), INDEX_NAME)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"no {INDEX_NAME} in {os.fspath(directory)} (not a shard "
                                f"directory, or its writer never finished a shard)")
    index = read_json(index_path)
    fmt = index.get("format") if isinstance(index, dict) else None
    if not isinstance(fmt, str):
        raise ValueError(f"{index_path}: no 'format' field (not a shard index)")
    return fmt


def _read_records(directory: str, entry: dict) -> list[dict]:
    path = os.path.join(directory, entry["files"]["records"]["file"])
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != entry["rows"]:
        raise ValueError(f"{path}: {len(lines)} records, index says {entry['rows']}")
    return json.loads("[" + ",".join(lines) + "]") if lines else []


class ShardReader:
    """Base class: reads a shard directory: checks the index, maps files lazily, locates rows
    and keys."""

    FORMAT = ""

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"no {INDEX_NAME} in {self.directory} (not a shard directory, "
                                    f"or its writer never finished a shard)")
        self.index = read_json(index_path)
        _check_format(self.index, self.FORMAT, index_path)
        self._shards = self.index["shards"]
        for entry in self._shards:
            for desc in entry["files"].values():
                path = os.path.join(self.directory, desc["file"])
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path}: listed in {index_path} but missing")
                size = os.path.getsize(path)
                if size != desc["bytes"]:
                    raise ValueError(f"{path}: {size} bytes, {INDEX_NAME} says {desc['bytes']} "
                                     f"(truncated or rewritten)")
                if verify:
                    digest = sha256_file(path)
                    if digest != desc["sha256"]:
                        raise ValueError(f"{path}: sha256 {digest} does not match "
                                         f"{INDEX_NAME} ({desc['sha256']}); the file is corrupt")
        self._records: list[dict] = []
        for entry in self._shards:
            self._records.extend(_read_records(self.directory, entry))
        self._key_to_index: dict[str, int] = {}
        for i, rec in enumerate(self._records):
            if self._key_to_index.setdefault(rec["key"], i) != i:
                raise ValueError(f"{self.directory}: duplicate key {rec['key']!r}")
        rows = np.array([e["rows"] for e in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __getstate__(self):
        # Memory maps are reopened lazily in each process instead of being pickled by value.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {self.directory} ({n} records)")
        i = int(i) % n if n else 0
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def _map(self, shard: int, kind: str, dtype, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
        cached = self._maps.get((shard, kind))
        if cached is not None:
            return cached
        desc = self._shards[shard]["files"][kind]
        path = os.path.join(self.directory, desc["file"])
        if desc["bytes"] == 0:
            arr = np.zeros((0, *shape_tail), dtype=dtype)
        else:
            arr = np.memmap(path, dtype=dtype, mode="r")
            if shape_tail:
                arr = arr.reshape(-1, *shape_tail)
        self._maps[(shard, kind)] = arr
        return arr

    def key(self, i: int) -> str:
        """The key of record ``i``."""
        self._locate(i)
        return self._records[int(i) % len(self)]["key"]

    def keys(self) -> list[str]:
        """All keys, in record order."""
        return [r["key"] for r in self._records]

    def index_of(self, key: str) -> int:
        """The record number of ``key``; KeyError naming the key and directory if absent."""
        try:
            return self._key_to_index[key]
        except KeyError:
            raise KeyError(f"key {key!r} not in {self.directory}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_index

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def _offsets(self, shard: int) -> np.ndarray:
        return self._map(shard, "offsets", np.int64)

    def _lengths(self) -> np.ndarray:
        """Token count of every record (from the offsets files, without reading tokens)."""
        if not self._shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(self._offsets(s)) for s in range(len(self._shards))])


class CaptionedShardReader(ShardReader):
    """A shard reader whose records carry caption tokens (embedding and image shards: the blend
    index counts caption positions from them alike)."""

    def caption_tokens(self, i: int) -> np.ndarray:
        """Record ``i``'s caption tokens (int32; empty when it was written without a caption)."""
        shard, row = self._locate(i)
        off = self._offsets(shard)
        return np.array(self._map(shard, "captions", "<i4")[off[row]:off[row + 1]], dtype=np.int32)

    def caption_lengths(self) -> np.ndarray:
        """Caption token count of every record (int64 [len])."""
        return self._lengths()
