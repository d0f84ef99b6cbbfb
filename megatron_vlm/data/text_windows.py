"""Packed training windows over megatron-core text datasets (the text source of a blend).

:class:`PackedTextWindows` concatenates the documents of one or more text datasets
(:mod:`megatron_vlm.data.text_shards`) into one token stream per epoch, in an order drawn from
``(seed, epoch)``, and cuts it into windows of ``seq_length + 1`` tokens; window ``i`` is a pure
function of (seed, epoch, i), so the loader reads any window directly and resumes exactly.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_vlm.data.text_shards import open_text_dataset


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
