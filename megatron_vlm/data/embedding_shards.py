"""Image-embedding shards: precomputed encoder outputs with each record's key and caption.

A directory of shards (:mod:`megatron_vlm.data.shard_io`: crash-safe, resumable, indexed by
``index.json``) holding precomputed encoder outputs ``[n_img, d_enc]`` per record, stored as
bf16 bit patterns or as fp8 e4m3 bytes with one fp32 scale per patch row, plus the record's key
and its tokenized caption (byte layout: docs/data.md). :class:`EmbeddingShardWriter` writes
them (the embedding precompute, :mod:`megatron_vlm.data.precompute`), :class:`EmbeddingDataset`
reads them memory-mapped (the loader, the blend index, the evaluation), and
:func:`quantize_fp8` / :func:`dequantize_fp8` convert the fp8 storage.

torch is imported only by the functions that need it.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from megatron_vlm.data.shard_io import CaptionedShardReader, ShardWriter, as_int_array

EMBEDDING_FORMAT = "megatron-vlm-embeddings"
EMBEDDING_DTYPES = ("bf16", "fp8")
# Largest finite float8 e4m3fn value; per-row scales map each row's absolute maximum onto it.
FP8_E4M3_MAX = 448.0


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


class EmbeddingShardWriter(ShardWriter):
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
                  as_int_array(key, "caption_tokens", caption_tokens, "<i4", 0, 2**31))
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


class EmbeddingDataset(CaptionedShardReader):
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
