"""Instruction shards: tokenized conversations with a per-token loss mask and an image key.

A directory of shards (:mod:`megatron_vlm.data.shard_io`: crash-safe, resumable, indexed by
``index.json``) holding each conversation's tokens (int32), its loss mask (uint8, 1 where the
token is a training target) and the key of the conversation's image in an image-embedding
directory, or none for a text-only conversation (byte layout: docs/data.md).
:class:`InstructionShardWriter` writes them (:mod:`megatron_vlm.data.llava_preprocess`),
:class:`InstructionDataset` reads them memory-mapped (the loader and the blend index).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from megatron_vlm.data.shard_io import ShardReader, ShardWriter, as_int_array

INSTRUCTION_FORMAT = "megatron-vlm-instructions"


class InstructionShardWriter(ShardWriter):
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
        toks = as_int_array(key, "tokens", tokens, "<i4", 0, 2**31)
        mask = as_int_array(key, "loss_mask", loss_mask, "u1", 0, 2)
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


class InstructionDataset(ShardReader):
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
