"""On-disk shard formats: image embeddings, instruction conversations and the text corpus.

Three formats, all memory-mapped when read and all written crash-safely (see docs/data.md for the
byte layouts):

* **Image-embedding shards** (:class:`EmbeddingShardWriter`, :class:`EmbeddingDataset`): a
  directory of shards holding precomputed encoder outputs ``[n_img, d_enc]`` per record, stored
  as bf16 bit patterns or as fp8 e4m3 bytes with one fp32 scale per patch row, plus the record's
  key and its tokenized caption.
* **Instruction shards** (:class:`InstructionShardWriter`, :class:`InstructionDataset`):
  tokenized conversations with a per-token loss mask and the key of the record's image in an
  embedding directory (or none).
* **Text**: megatron-core ``IndexedDataset`` files (``.bin``/``.idx``, int32 tokens, one
  megatron document per corpus document) written with megatron-core's builder
  (:func:`write_text_dataset`, :class:`TextShardWriter`), read with :func:`open_text_dataset`,
  cut into packed training windows by :class:`PackedTextWindows`, and produced from JSONL or
  parquet by :func:`preprocess_text` (the logic behind ``tools/preprocess_text.py``).

Crash safety: every shard file is written under a ``.tmp`` name, fsync'd and renamed into place,
and only then is the shard entered into the directory's index (itself replaced atomically). A
shard is complete exactly when the index lists it; anything else found on disk is left over
from an interrupted run and is removed or rewritten when a writer opens the directory again.

torch and megatron-core are imported only by the functions that need them.
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field as dc_field
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from megatron_vlm.fsutil import TMP_SUFFIX, sha256_file, write_json_atomic
from megatron_vlm.fsutil import fsync_dir as _fsync_dir

logger = logging.getLogger("megatron_vlm.data.formats")

if sys.byteorder != "little":  # the formats are little-endian and read by memory-mapping
    raise ImportError("megatron_vlm.data.formats needs a little-endian host")

INDEX_NAME = "index.json"
EMBEDDING_FORMAT = "megatron-vlm-embeddings"
INSTRUCTION_FORMAT = "megatron-vlm-instructions"
TEXT_FORMAT = "megatron-vlm-text"
FORMAT_VERSION = 1
EMBEDDING_DTYPES = ("bf16", "fp8")
# Largest finite float8 e4m3fn value; per-row scales map each row's absolute maximum onto it.
FP8_E4M3_MAX = 448.0
_LOCK_NAME = ".writer.lock"


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------

def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: str) -> Any:
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
        self._f.write(data)
        self._hash.update(data)
        self.nbytes += len(data)

    def commit(self) -> dict:
        """fsync, rename into place; returns the file's index entry."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp_path, self.final_path)
        return {"file": os.path.basename(self.final_path), "bytes": self.nbytes,
                "sha256": self._hash.hexdigest()}

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def _as_float_tensor(key: str, value: Any, expected_shape: tuple[int, ...]):
    """``value`` as a float32 torch tensor of ``expected_shape``, or ValueError naming ``key``."""
    import torch

    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.floating)):
            raise ValueError(f"record {key!r}: embedding dtype {value.dtype} is not a floating "
                             f"point type (expected float32/float16/bfloat16/float64)")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"record {key!r}: embedding dtype {value.dtype} is not a floating "
                             f"point type (expected float32/float16/bfloat16/float64)")
        tensor = value.detach().to("cpu")
    else:
        raise ValueError(f"record {key!r}: embedding must be a numpy array or torch tensor, "
                         f"got {type(value).__name__}")
    if tuple(tensor.shape) != expected_shape:
        raise ValueError(f"record {key!r}: embedding shape {tuple(tensor.shape)} does not match "
                         f"the expected shape {expected_shape} (n_img, d_enc)")
    return tensor


def _as_int_array(key: str, name: str, value: Any, dtype, low: int, high: int) -> np.ndarray:
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


class _ShardWriter:
    """Writes records into numbered shards of a directory with a crash-safe ``index.json``.

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
            self._index = _read_json(self._index_path)
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


def _read_records(directory: str, entry: dict) -> list[dict]:
    path = os.path.join(directory, entry["files"]["records"]["file"])
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != entry["rows"]:
        raise ValueError(f"{path}: {len(lines)} records, index says {entry['rows']}")
    return json.loads("[" + ",".join(lines) + "]") if lines else []


class _ShardReader:
    """Reads a shard directory: checks the index, maps files lazily, locates rows and keys."""

    FORMAT = ""

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"no {INDEX_NAME} in {self.directory} (not a shard directory, "
                                    f"or its writer never finished a shard)")
        self.index = _read_json(index_path)
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


# --------------------------------------------------------------------------------------------
# Image-embedding shards
# --------------------------------------------------------------------------------------------

class EmbeddingShardWriter(_ShardWriter):
    """Writes precomputed image embeddings, keys and caption tokens into shards of a directory.

    ``dtype="bf16"`` stores the bf16 rounding of each value (its 16-bit pattern);
    ``dtype="fp8"`` stores float8 e4m3 values and one fp32 scale per patch row (per
    ``[d_enc]`` vector: scale = row amax / 448, 1.0 for an all-zero row).

    Opening a directory that already holds finished shards continues after them (same n_img,
    d_enc and dtype required); :meth:`finished_shards`, :meth:`written_keys` and
    :meth:`shard_meta` tell a resuming tool what is done. Adding a key that is already written
    raises ValueError.
    """

    FORMAT = EMBEDDING_FORMAT

    def __init__(self, directory: str | os.PathLike, n_img: int, d_enc: int, dtype: str = "bf16",
                 rows_per_shard: int = 4096):
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {EMBEDDING_DTYPES}")
        if n_img < 1 or d_enc < 1:
            raise ValueError(f"n_img={n_img} and d_enc={d_enc} must be positive")
        self.n_img, self.d_enc, self.dtype = int(n_img), int(d_enc), dtype
        self.FILE_KINDS = {"embeddings": ".emb", "captions": ".cap", "offsets": ".capoff",
                           "records": ".records.jsonl"}
        if dtype == "fp8":
            self.FILE_KINDS = {**self.FILE_KINDS, "scales": ".scale"}
        super().__init__(directory, rows_per_shard,
                         {"n_img": self.n_img, "d_enc": self.d_enc, "dtype": dtype})
        self._cap_end = 0

    def _start_shard(self, files):
        self._cap_end = 0
        files["offsets"].write(np.zeros(1, dtype="<i8").tobytes())

    def add(self, key: str, embedding, caption_tokens: Optional[Sequence[int]] = None) -> None:
        """Adds one record; ``embedding`` is a float array/tensor of shape [n_img, d_enc]."""
        import torch

        key = self._check_new_key(key)
        tensor = _as_float_tensor(key, embedding, (self.n_img, self.d_enc))
        tokens = (np.zeros(0, dtype="<i4") if caption_tokens is None else
                  _as_int_array(key, "caption_tokens", caption_tokens, "<i4", 0, 2**31))
        if self.dtype == "bf16":
            bits = tensor.to(torch.bfloat16)
            if not torch.isfinite(bits).all():
                raise ValueError(f"record {key!r}: embedding has non-finite values (in bf16)")
            payload = [("embeddings", bits.contiguous().view(torch.int16).numpy().tobytes())]
        else:
            q, scale = quantize_fp8(tensor, key=key)
            payload = [("embeddings", q.tobytes()), ("scales", scale.tobytes())]
        files = self._begin_row(key)
        for kind, data in payload:
            files[kind].write(data)
        files["captions"].write(tokens.tobytes())
        self._cap_end += tokens.size
        files["offsets"].write(np.array([self._cap_end], dtype="<i8").tobytes())
        self._end_row(key, {"key": key})


def quantize_fp8(embedding, key: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """fp8 e4m3 bytes (uint8 [n, d]) and fp32 scales [n] of a float [n, d] tensor/array.

    Each row is divided by its scale = amax / 448 (1.0 for an all-zero row) before the cast.
    """
    import torch

    x = torch.as_tensor(embedding).detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"record {key!r}: embedding has non-finite values")
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (x / scale.unsqueeze(-1)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.contiguous().view(torch.uint8).numpy(),
            scale.contiguous().numpy().astype("<f4", copy=False))


def dequantize_fp8(q: np.ndarray, scale: np.ndarray):
    """float32 torch tensor [n, d] from fp8 bytes [n, d] and per-row scales [n]."""
    import torch

    values = torch.from_numpy(np.array(q, dtype=np.uint8)).view(torch.float8_e4m3fn)
    return values.to(torch.float32) * torch.from_numpy(np.array(scale, dtype=np.float32)).unsqueeze(-1)


class EmbeddingDataset(_ShardReader):
    """All records of an image-embedding directory, memory-mapped.

    ``verify=True`` recomputes the sha256 of every file and raises ValueError naming the first
    file that does not match the index. File sizes are always checked.
    """

    FORMAT = EMBEDDING_FORMAT

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        super().__init__(directory, verify)
        self.n_img = int(self.index["n_img"])
        self.d_enc = int(self.index["d_enc"])
        self.dtype = self.index["dtype"]
        if self.dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"{self.directory}: unknown embedding dtype {self.dtype!r}")

    def raw_embedding(self, i: int) -> np.memmap:
        """The stored row of record ``i`` as a memory-mapped view: uint16 bf16 bit patterns
        ([n_img, d_enc]) or uint8 fp8 e4m3 bytes; nothing is read until it is used."""
        shard, row = self._locate(i)
        dtype = "<u2" if self.dtype == "bf16" else "u1"
        return self._map(shard, "embeddings", dtype, (self.n_img, self.d_enc))[row]

    def raw_scale(self, i: int) -> np.ndarray:
        """The fp32 scales [n_img] of an fp8 record (memory-mapped view)."""
        if self.dtype != "fp8":
            raise ValueError(f"{self.directory}: dtype {self.dtype} has no scales")
        shard, row = self._locate(i)
        return self._map(shard, "scales", "<f4", (self.n_img,))[row]

    def embedding(self, i: int):
        """Record ``i``'s embedding as a bfloat16 tensor [n_img, d_enc]."""
        import torch

        raw = self.raw_embedding(i)
        if self.dtype == "bf16":
            return torch.from_numpy(np.array(raw).view(np.int16)).view(torch.bfloat16)
        return dequantize_fp8(raw, self.raw_scale(i)).to(torch.bfloat16)

    def embeddings(self, indices: Sequence[int]):
        """A bfloat16 tensor [len(indices), n_img, d_enc] of several records."""
        import torch

        if len(indices) == 0:
            return torch.zeros(0, self.n_img, self.d_enc, dtype=torch.bfloat16)
        return torch.stack([self.embedding(int(i)) for i in indices])

    def caption_tokens(self, i: int) -> np.ndarray:
        """Record ``i``'s caption tokens (int32; empty when it was written without a caption)."""
        shard, row = self._locate(i)
        off = self._offsets(shard)
        return np.array(self._map(shard, "captions", "<i4")[off[row]:off[row + 1]], dtype=np.int32)

    def caption_lengths(self) -> np.ndarray:
        """Caption token count of every record (int64 [len])."""
        return self._lengths()


# --------------------------------------------------------------------------------------------
# Instruction shards
# --------------------------------------------------------------------------------------------

class InstructionShardWriter(_ShardWriter):
    """Writes tokenized conversations: tokens (int32), loss mask (uint8, same length) and the
    key of the conversation's image in an embedding directory (None for text-only ones).
    Resumes like :class:`EmbeddingShardWriter`."""

    FORMAT = INSTRUCTION_FORMAT
    FILE_KINDS = {"tokens": ".tok", "loss_mask": ".mask", "offsets": ".off",
                  "records": ".records.jsonl"}

    def __init__(self, directory: str | os.PathLike, rows_per_shard: int = 8192):
        super().__init__(directory, rows_per_shard, {})
        self._end = 0

    def _start_shard(self, files):
        self._end = 0
        files["offsets"].write(np.zeros(1, dtype="<i8").tobytes())

    def add(self, key: str, tokens: Sequence[int], loss_mask: Sequence[int],
            image_key: Optional[str] = None) -> None:
        key = self._check_new_key(key)
        toks = _as_int_array(key, "tokens", tokens, "<i4", 0, 2**31)
        mask = _as_int_array(key, "loss_mask", loss_mask, "u1", 0, 2)
        if toks.size != mask.size:
            raise ValueError(f"record {key!r}: loss_mask has {mask.size} entries, tokens "
                             f"has {toks.size}; they must have the same length")
        if toks.size == 0:
            raise ValueError(f"record {key!r}: empty conversation (no tokens)")
        if image_key is not None and (not isinstance(image_key, str) or not image_key):
            raise ValueError(f"record {key!r}: image_key must be a non-empty string or None, "
                             f"got {image_key!r}")
        files = self._begin_row(key)
        files["tokens"].write(toks.tobytes())
        files["loss_mask"].write(mask.tobytes())
        self._end += toks.size
        files["offsets"].write(np.array([self._end], dtype="<i8").tobytes())
        self._end_row(key, {"key": key, "image_key": image_key})


class InstructionDataset(_ShardReader):
    """All conversations of an instruction directory, memory-mapped."""

    FORMAT = INSTRUCTION_FORMAT

    def _span(self, i: int, kind: str, dtype) -> np.ndarray:
        shard, row = self._locate(i)
        off = self._offsets(shard)
        return np.array(self._map(shard, kind, dtype)[off[row]:off[row + 1]])

    def tokens(self, i: int) -> np.ndarray:
        """Conversation ``i``'s tokens (int32)."""
        return self._span(i, "tokens", "<i4").astype(np.int32, copy=False)

    def loss_mask(self, i: int) -> np.ndarray:
        """Conversation ``i``'s loss mask (uint8, 1 where the token is a training target)."""
        return self._span(i, "loss_mask", "u1")

    def image_key(self, i: int) -> Optional[str]:
        """The embedding key of conversation ``i``'s image, or None (text-only)."""
        self._locate(i)
        return self._records[int(i) % len(self)]["image_key"]

    def lengths(self) -> np.ndarray:
        """Token count of every conversation (int64 [len])."""
        return self._lengths()


# --------------------------------------------------------------------------------------------
# Text: megatron-core IndexedDataset
# --------------------------------------------------------------------------------------------

def _import_indexed_dataset():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class TextShardWriter:
    """One megatron-core IndexedDataset (``PREFIX.bin``/``PREFIX.idx``, int32 tokens) written
    with megatron-core's ``IndexedDatasetBuilder``; one megatron document per added document.

    Files go to temp names and are fsync'd and renamed by :meth:`commit`, which returns their
    sizes and sha256; :meth:`abort` removes them.
    """

    def __init__(self, path_prefix: str):
        self._mod = _import_indexed_dataset()
        self.path_prefix = path_prefix
        self.bin_path = self._mod.get_bin_path(path_prefix)
        self.idx_path = self._mod.get_idx_path(path_prefix)
        self._builder = self._mod.IndexedDatasetBuilder(self.bin_path + TMP_SUFFIX, dtype=np.int32)
        self._hash = hashlib.sha256()
        self.documents = 0
        self.tokens = 0
        self._done = False

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Adds one document (its tokens as given; append the EOS yourself)."""
        import torch

        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        self._builder.add_item(torch.from_numpy(arr))
        self._builder.end_document()
        self._hash.update(arr.tobytes())
        self.documents += 1
        self.tokens += int(arr.size)

    def commit(self) -> dict:
        """Finalizes and renames the files into place; returns {documents, tokens, files}."""
        if self.documents == 0:
            self.abort()
            raise ValueError(f"{self.path_prefix}: a text dataset needs at least one document")
        self._builder.finalize(self.idx_path + TMP_SUFFIX)
        self._done = True
        files = {}
        for kind, path in (("bin", self.bin_path), ("idx", self.idx_path)):
            _fsync_path(path + TMP_SUFFIX)
            os.replace(path + TMP_SUFFIX, path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.bin_path)))
        files["bin"] = {"file": os.path.basename(self.bin_path),
                        "bytes": os.path.getsize(self.bin_path), "sha256": self._hash.hexdigest()}
        files["idx"] = {"file": os.path.basename(self.idx_path),
                        "bytes": os.path.getsize(self.idx_path), "sha256": sha256_file(self.idx_path)}
        return {"documents": self.documents, "tokens": self.tokens, "files": files}

    def abort(self) -> None:
        if not self._done:
            self._builder.data_file.close()
            self._done = True
        for path in (self.bin_path, self.idx_path):
            if os.path.exists(path + TMP_SUFFIX):
                os.remove(path + TMP_SUFFIX)


def write_text_dataset(path_prefix: str, documents: Iterable[Sequence[int] | np.ndarray]) -> dict:
    """Writes ``documents`` (token lists, each stored as one megatron document exactly as
    given) to ``path_prefix.bin/.idx`` atomically; returns {documents, tokens, files}."""
    writer = TextShardWriter(path_prefix)
    try:
        for doc in documents:
            writer.add_document(doc)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def open_text_dataset(path_prefix: str):
    """megatron-core's ``IndexedDataset`` for ``path_prefix`` (.bin/.idx), memory-mapped."""
    mod = _import_indexed_dataset()
    for path in (mod.get_idx_path(path_prefix), mod.get_bin_path(path_prefix)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text dataset file not found: {path}")
    return mod.IndexedDataset(path_prefix, multimodal=False, mmap=True)


def text_manifest_path(output_prefix: str) -> str:
    """Where :func:`preprocess_text` keeps its manifest for ``output_prefix``."""
    return output_prefix + ".manifest.json"


def text_shard_prefixes(output_prefix: str) -> list[str]:
    """The shard prefixes (``PREFIX_00000`` ...) that :func:`preprocess_text` finished."""
    path = text_manifest_path(output_prefix)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no text manifest {path} (run tools/preprocess_text.py first)")
    manifest = _read_json(path)
    base = os.path.dirname(output_prefix)
    return [os.path.join(base, manifest["shards"][k]["prefix"])
            for k in sorted(manifest["shards"], key=int)]


class PackedTextWindows:
    """Packed training windows of ``seq_length + 1`` tokens over one or more text datasets.

    Per epoch the documents of all datasets are put in an order (a permutation drawn from
    ``(seed, epoch)`` when ``shuffle_documents``, else stored order) and concatenated into one
    token stream; window ``i`` is stream[i*L : i*L + L + 1], so consecutive windows overlap by
    one token and every stream token after the first is a target exactly once. Documents are
    stored with their EOS, so EOS separates documents inside a window. The number of windows,
    ``(total_tokens - 1) // L``, is the same in every epoch; a few tail tokens per epoch are
    left out. Random access and deterministic: the same (seed, epoch, i) gives the same window.
    """

    def __init__(self, datasets: Sequence[Any], seq_length: int, seed: int = 0,
                 shuffle_documents: bool = True):
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be positive")
        self.datasets = [open_text_dataset(d) if isinstance(d, (str, os.PathLike)) else d
                         for d in datasets]
        if not self.datasets:
            raise ValueError("PackedTextWindows needs at least one text dataset")
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.shuffle_documents = shuffle_documents
        lengths, owner, local = [], [], []
        for k, ds in enumerate(self.datasets):
            n = np.asarray(ds.sequence_lengths, dtype=np.int64)
            lengths.append(n)
            owner.append(np.full(n.size, k, dtype=np.int32))
            local.append(np.arange(n.size, dtype=np.int64))
        self._lengths = np.concatenate(lengths)
        self._owner = np.concatenate(owner)
        self._local = np.concatenate(local)
        self.total_tokens = int(self._lengths.sum())
        self.num_windows = max(0, (self.total_tokens - 1) // self.seq_length)
        self._layout: Optional[tuple[int, np.ndarray, np.ndarray]] = None

    def __len__(self) -> int:
        return self.num_windows

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._layout is None or self._layout[0] != epoch:
            n = self._lengths.size
            if self.shuffle_documents:
                order = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            else:
                order = np.arange(n)
            ends = np.cumsum(self._lengths[order])
            self._layout = (epoch, order, ends)
        return self._layout[1], self._layout[2]

    def window(self, i: int, epoch: int = 0) -> np.ndarray:
        """Window ``i`` of ``epoch``: int64 [seq_length + 1]."""
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range ({self.num_windows} windows)")
        order, ends = self._epoch_layout(epoch)
        start = i * self.seq_length
        stop = start + self.seq_length + 1
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        j = int(np.searchsorted(ends, start, side="right"))
        filled = 0
        while filled < out.size:
            doc = int(order[j])
            doc_start = int(ends[j] - self._lengths[doc])
            offset = start + filled - doc_start
            take = min(int(self._lengths[doc]) - offset, stop - (start + filled))
            ds = self.datasets[self._owner[doc]]
            out[filled:filled + take] = ds.get(int(self._local[doc]), offset=offset, length=take)
            filled += take
            j += 1
        return out

    def iter_windows(self, epoch: int = 0, start: int = 0) -> Iterator[np.ndarray]:
        """Yields the windows of ``epoch`` from ``start`` on, in order."""
        for i in range(start, self.num_windows):
            yield self.window(i, epoch)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iter_windows(0)


# --------------------------------------------------------------------------------------------
# Text corpus preprocessing (JSONL / parquet -> IndexedDataset shards)
# --------------------------------------------------------------------------------------------

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)


def expand_text_inputs(inputs: Sequence[str]) -> list[str]:
    """Input paths with each directory replaced by its JSONL/parquet files (recursively, sorted).

    A missing path raises FileNotFoundError; an explicit file of another type, ValueError.
    """
    files: list[str] = []
    for raw in inputs:
        path = os.fspath(raw)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path) for name in names
                if name.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES))
            if not found:
                raise ValueError(f"{path}: directory holds no .jsonl/.json(.gz/.zst) or .parquet files")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                raise ValueError(f"{path}: unsupported input type (expected .jsonl, .json, "
                                 f".jsonl.gz, .jsonl.zst or .parquet)")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def _open_binary(path: str):
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path}: reading .zst needs the 'zstandard' package "
                             f"(pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                                            closefd=True))
    return open(path, "rb")


def iter_text_records(path: str, field: str = "text") -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    """Yields ``(where, text, problem)`` per record of a JSONL or parquet file.

    ``where`` is ``FILE:LINE`` (1-based) for JSONL and ``FILE:row N`` (0-based) for parquet;
    exactly one of ``text`` and ``problem`` is None. Blank JSONL lines are not records. A
    parquet file without the column raises ValueError naming the file and field.
    """
    if path.lower().endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path, field)
        return
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, None, f"invalid JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(obj, dict):
                yield where, None, f"not a JSON object (a {type(obj).__name__})"
            elif field not in obj:
                yield where, None, f"missing field {field!r}"
            elif not isinstance(obj[field], str):
                yield where, None, f"field {field!r} is {type(obj[field]).__name__}, not a string"
            else:
                yield where, obj[field], None


def _iter_parquet(path: str, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(names)})")
    col_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise ValueError(f"{path}: column {field!r} has type {col_type}, not a string type")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                yield f"{path}:row {row}", None, f"field {field!r} is null"
            else:
                yield f"{path}:row {row}", value, None
            row += 1


# Tokenizer worker processes (spawned) hold the tokenizer in this global.
_WORKER_TOKENIZER = None


def _worker_init(tokenizer_path: str, eos_token: Optional[str]) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    from megatron_vlm.data.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path, eos_token)


def _encode_with_eos(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated int32 tokens (EOS after each text) and per-text lengths."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for x in ids:
        flat[pos:pos + len(x)] = x
        pos += len(x)
        flat[pos] = tokenizer.eos_id
        pos += 1
    return flat, lengths


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_with_eos(_WORKER_TOKENIZER, texts)


@dataclass
class TextPreprocessSummary:
    """What :func:`preprocess_text` did (also stored in the manifest)."""

    output_prefix: str
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    skipped_records: list[str] = dc_field(default_factory=list)
    shards: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    tokens_written: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def tokens_per_second(self) -> float:
        """Tokens tokenized and written in this run per second."""
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [f"output: {self.output_prefix}_*.bin/.idx "
               f"(manifest {text_manifest_path(self.output_prefix)})",
               f"documents: {self.documents}",
               f"tokens: {self.tokens}",
               f"skipped: {self.skipped}"]
        out += [f"  skipped {r}" for r in self.skipped_records]
        out += [f"shards: {self.shards} ({self.shards_written} written, "
                f"{self.shards_reused} reused from an earlier run)"
                + (" -- stopped early, run again to finish" if self.stopped_early else ""),
                f"seconds: {self.seconds:.2f}",
                f"tokens/s: {self.tokens_per_second:,.0f} (tokens written in this run)"]
        return out


def _shard_ok(base: str, entry: dict) -> bool:
    for desc in entry["files"].values():
        path = os.path.join(base, desc["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != desc["bytes"]:
            return False
        if sha256_file(path) != desc["sha256"]:
            return False
    return True


def preprocess_text(inputs: Sequence[str], tokenizer_path: str, output_prefix: str,
                    docs_per_shard: int = 100_000, field: str = "text", workers: int = 1,
                    max_skips: int = 0, eos_token: Optional[str] = None,
                    overwrite: bool = False, progress: bool = True, chunk_size: int = 512,
                    stop_after_shards: Optional[int] = None) -> TextPreprocessSummary:
    """Tokenizes JSONL/parquet documents into IndexedDataset shards ``PREFIX_00000.bin/.idx``...

    Every document is tokenized without BOS and followed by the tokenizer's EOS. Valid
    documents are numbered in input order (files in the given order, directories expanded
    sorted) and document ``d`` goes to shard ``d // docs_per_shard``, so the shards depend only
    on the inputs, the tokenizer and ``docs_per_shard``. Malformed records (invalid JSON or
    UTF-8, missing or non-string field, null parquet value) are skipped and listed up to
    ``max_skips``; one more raises ValueError naming the record and field.

    Resume: ``PREFIX.manifest.json`` records the settings and, per finished shard, its files'
    sizes and sha256. A rerun with the same settings re-reads the inputs but skips tokenizing
    and writing every shard whose files are present and match; other shards are (re)written,
    byte-identical to an uninterrupted run. Different settings raise ValueError unless
    ``overwrite``, which deletes the shards the manifest lists and starts over.
    ``stop_after_shards`` ends the run after writing that many shards (a test hook that
    simulates an interruption).
    """
    from tqdm import tqdm

    from megatron_vlm.data.tokenizer import load_tokenizer

    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard={docs_per_shard} must be at least 1")
    if max_skips < 0:
        raise ValueError(f"max_skips={max_skips} must be >= 0")
    files = expand_text_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path, eos_token)
    _import_indexed_dataset()  # megatron-core's import (seconds) is not part of the timing
    t0 = time.perf_counter()
    base = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(base, exist_ok=True)
    stem = os.path.basename(output_prefix)
    if not stem:
        raise ValueError(f"output prefix {output_prefix!r} must end in a file name stem")
    settings = {
        "format": TEXT_FORMAT, "version": FORMAT_VERSION,
        "tokenizer_sha256": sha256_file(tokenizer.path), "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size, "dtype": "int32", "field": field,
        "docs_per_shard": int(docs_per_shard),
        "inputs": [{"path": os.path.realpath(p), "bytes": os.path.getsize(p)} for p in files],
    }
    manifest_path = text_manifest_path(output_prefix)
    manifest = {**settings, "shards": {}, "complete": False}
    if os.path.isfile(manifest_path):
        old = _read_json(manifest_path)
        differing = [k for k in settings if old.get(k) != settings[k]]
        if differing and not overwrite:
            raise ValueError(
                f"{manifest_path}: existing shards were made with different settings "
                f"({', '.join(differing)}); use another --output-prefix, or --overwrite")
        if overwrite:
            for entry in old.get("shards", {}).values():
                for desc in entry["files"].values():
                    path = os.path.join(base, desc["file"])
                    if os.path.exists(path):
                        os.remove(path)
        else:
            manifest["shards"] = {k: v for k, v in old.get("shards", {}).items()
                                  if _shard_ok(base, v)}
    for leftover in glob.glob(os.path.join(glob.escape(base), glob.escape(stem) + "_*" + TMP_SUFFIX)):
        os.remove(leftover)
    done = {int(k) for k in manifest["shards"]}
    write_json_atomic(manifest_path, manifest)

    summary = TextPreprocessSummary(output_prefix=output_prefix)
    summary.shards_reused = len(done)
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init,
                                             initargs=(tokenizer.path, eos_token))
    pending: deque = deque()
    max_pending = max(2, 4 * max(1, workers))
    current: dict[str, Any] = {"shard": None, "writer": None, "first": None}

    def finish_shard() -> None:
        writer = current["writer"]
        if writer is None:
            return
        entry = writer.commit()
        entry["prefix"] = f"{stem}_{current['shard']:05d}"
        entry["first_record"] = current["first"]
        manifest["shards"][str(current["shard"])] = entry
        write_json_atomic(manifest_path, manifest)
        summary.shards_written += 1
        summary.tokens_written += entry["tokens"]
        current["writer"] = None

    def write_result(shard: int, first: str, result) -> None:
        flat, lengths = result
        if current["shard"] != shard:
            finish_shard()
            current.update(shard=shard, first=first,
                           writer=TextShardWriter(os.path.join(base, f"{stem}_{shard:05d}")))
        ends = np.cumsum(lengths)
        for end, n in zip(ends, lengths):
            current["writer"].add_document(flat[end - n:end])

    def drain(limit: int) -> None:
        while len(pending) > limit:
            shard, first, res = pending.popleft()
            write_result(shard, first, res.get() if pool is not None else res)

    def submit(shard: int, first: str, texts: list[str]) -> None:
        if pool is not None:
            pending.append((shard, first, pool.apply_async(_worker_encode, (texts,))))
        else:
            pending.append((shard, first, _encode_with_eos(tokenizer, texts)))
        drain(max_pending)

    chunk: list[str] = []
    chunk_first: Optional[str] = None
    chunk_shard = -1
    doc = 0
    stop = False
    bar = tqdm(desc="preprocess_text", unit="doc", disable=not progress, dynamic_ncols=True)
    try:
        for path in files:
            for where, text, problem in iter_text_records(path, field):
                if problem is not None:
                    summary.skipped += 1
                    summary.skipped_records.append(f"{where}: {problem}")
                    if summary.skipped > max_skips:
                        raise ValueError(f"{where}: {problem} (field {field!r}); more than "
                                         f"--max-skips={max_skips} malformed records")
                    continue
                shard = doc // docs_per_shard
                if shard in done:
                    doc += 1
                    bar.update(1)
                    continue
                if shard != chunk_shard or len(chunk) >= chunk_size:
                    if chunk:
                        submit(chunk_shard, chunk_first, chunk)
                    if shard != chunk_shard and stop_after_shards is not None:
                        # Shards are written in order: once the previous ones are done, stop.
                        drain(0)
                        finish_shard()
                        if summary.shards_written >= stop_after_shards:
                            stop = True
                            break
                    chunk, chunk_first, chunk_shard = [], where, shard
                chunk.append(text)
                doc += 1
                bar.update(1)
            if stop:
                break
        if chunk and not stop:
            submit(chunk_shard, chunk_first, chunk)
        drain(0)
        finish_shard()
    except BaseException:
        if current["writer"] is not None:
            current["writer"].abort()
        if pool is not None:
            pool.terminate()
            pool = None
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    summary.stopped_early = stop
    total_shards = (doc + docs_per_shard - 1) // docs_per_shard
    if not stop:
        for k in sorted(done):
            expected = min(docs_per_shard, doc - k * docs_per_shard)
            if manifest["shards"][str(k)]["documents"] != expected:
                raise ValueError(
                    f"{manifest_path}: shard {k} holds {manifest['shards'][str(k)]['documents']} "
                    f"documents but the inputs now give {max(expected, 0)}; the inputs changed "
                    f"since it was written: use another --output-prefix, or --overwrite")
        summary.shards = total_shards
        manifest["complete"] = True
    else:
        summary.shards = len(manifest["shards"])
    summary.documents = doc
    summary.tokens = int(sum(e["tokens"] for e in manifest["shards"].values()))
    summary.seconds = time.perf_counter() - t0
    manifest["summary"] = {"documents": doc, "tokens": summary.tokens,
                           "skipped": summary.skipped, "skipped_records": summary.skipped_records,
                           "shards": summary.shards}
    write_json_atomic(manifest_path, manifest)
    return summary
