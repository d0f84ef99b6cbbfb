"""Blend sources: what each sequence of a source fills, from arguments or from shards on disk.

A :class:`BlendSource` names a source, its number of sequences (one epoch) and the positions each
sequence fills for its own source (the blend index's "tokens"); :func:`source_from_shards`
counts them for the shard kinds of this project. :func:`normalized_fractions` checks a blend's
fractions against its sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

FRACTION_SUM_TOLERANCE = 1e-6
"""How far the blend fractions may sum away from 1."""

PerSequence = Union[int, np.ndarray]


def _per_sequence(value: Any, num_sequences: int, source: str, what: str, minimum: int,
                  maximum: Optional[int] = None) -> PerSequence:
    """``value`` as a constant int or a 1-D integer array of ``num_sequences`` entries."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = int(value)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise ValueError(f"blend source {source!r}: {what}={value} must be {bound}")
        return value
    arr = np.asarray(value)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"blend source {source!r}: {what} must be an int or a 1-D integer "
                         f"array, got {arr.dtype} with shape {arr.shape}")
    if arr.shape[0] != num_sequences:
        raise ValueError(f"blend source {source!r}: {what} has {arr.shape[0]} entries but the "
                         f"source has num_sequences={num_sequences}")
    low = int(arr.min())
    if low < minimum:
        at = int(np.argmax(arr < minimum))
        raise ValueError(f"blend source {source!r}: {what}[{at}]={int(arr[at])} must be "
                         f">= {minimum}")
    if maximum is not None:
        high = int(arr.max())
        if high > maximum:
            at = int(np.argmax(arr > maximum))
            raise ValueError(f"blend source {source!r}: {what}[{at}]={int(arr[at])} must be "
                             f"<= {maximum}")
    return arr


@dataclass(eq=False)
class BlendSource:
    """One source of a blend: its sequences and the positions each of them fills."""

    name: str
    """The source's name, as the blend's fractions refer to it."""
    num_sequences: int
    """How many sequences the source holds (one epoch)."""
    tokens_per_sequence: PerSequence
    """Positions each sequence fills for its own source (padding excluded): one int for every
    sequence, or an integer array with one entry per sequence. Each must be in [1, seq_length]."""
    loss_tokens: Optional[PerSequence] = None
    """Optional positions per sequence that carry loss; only totalled in the summary."""
    image_positions: Optional[PerSequence] = None
    """Optional image positions per sequence; only totalled in the summary."""
    max_tokens: int = field(init=False)
    """Largest ``tokens_per_sequence`` of the source."""
    epoch_tokens: int = field(init=False)
    """Tokens of one whole epoch of the source."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"blend source name must be a non-empty string, got {self.name!r}")
        n = self.num_sequences
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"blend source {self.name!r}: num_sequences={self.num_sequences!r} "
                             "must be an int >= 1")
        self.num_sequences = int(self.num_sequences)
        self.tokens_per_sequence = _per_sequence(self.tokens_per_sequence, self.num_sequences,
                                                 self.name, "tokens_per_sequence", 1)
        if self.loss_tokens is not None:
            self.loss_tokens = _per_sequence(self.loss_tokens, self.num_sequences, self.name,
                                             "loss_tokens", 0)
        if self.image_positions is not None:
            self.image_positions = _per_sequence(self.image_positions, self.num_sequences,
                                                 self.name, "image_positions", 0)
        tps = self.tokens_per_sequence
        if isinstance(tps, int):
            self.max_tokens = tps
            self.epoch_tokens = tps * self.num_sequences
        else:
            self.max_tokens = int(tps.max())
            self.epoch_tokens = int(tps.sum(dtype=np.int64))

    @property
    def mean_tokens(self) -> float:
        """Average positions per sequence over one epoch."""
        return self.epoch_tokens / self.num_sequences


def normalized_fractions(sources: Sequence[BlendSource],
                         fractions: Mapping[str, float]) -> np.ndarray:
    """The fractions in source order, divided by their sum; a ValueError names every problem."""
    names = [s.name for s in sources]
    if not names:
        raise ValueError("a blend needs at least one source")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"blend source names must be unique; repeated: {', '.join(dups)}")
    unknown = [k for k in fractions if k not in names]
    if unknown:
        raise ValueError(f"blend fractions name unknown sources: {', '.join(map(str, unknown))} "
                         f"(sources: {', '.join(names)})")
    missing = [n for n in names if n not in fractions]
    if missing:
        raise ValueError(f"blend sources without a fraction: {', '.join(missing)}")
    values = []
    for n in names:
        try:
            v = float(fractions[n])
        except (TypeError, ValueError):
            raise ValueError(f"blend fraction {n}={fractions[n]!r} is not a number") from None
        values.append(v)
    listing = ", ".join(f"{n}={v!r}" for n, v in zip(names, values))
    bad = [f"{n}={v!r}" for n, v in zip(names, values) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"every blend fraction must be a finite number > 0: {', '.join(bad)}")
    total = math.fsum(values)
    if abs(total - 1.0) > FRACTION_SUM_TOLERANCE:
        raise ValueError(f"blend fractions must sum to 1 (within {FRACTION_SUM_TOLERANCE:g}) but "
                         f"sum to {total!r}: {listing}")
    return np.asarray(values, dtype=np.float64) / total


SHARD_KINDS = ("text", "caption", "instruction")


def source_from_shards(name: str, kind: str, path: Union[str, Sequence[str]], seq_length: int, *,
                       n_img: Optional[int] = None, eos_id: Optional[int] = None,
                       count_padding: bool = False, progress: bool = False,
                       rows: Optional[np.ndarray] = None) -> BlendSource:
    """A :class:`BlendSource` for shards on disk, counting what each sequence fills.

    * ``text``: megatron-core IndexedDataset prefix(es) (several joined with commas); one
      sequence per packed window, ``(tokens - 1) // seq_length`` windows, each filling and
      training all ``seq_length`` positions.
    * ``caption``: an image-embedding or image-shard directory; one sequence per record:
      ``[image x n_img][SEP][caption][EOS]`` (caption cut to fit), loss on the separator and
      the caption. ``eos_id`` given: a caption stored with a trailing EOS is not counted twice.
      Embedding shards know their ``n_img``; image shards need it given (the encoder's).
    * ``instruction``: an instruction directory; one sequence per conversation:
      ``[image x n_img if it has one][conversation][EOS]`` cut at ``seq_length``, loss on the
      targets of its loss mask (``n_img`` is then required when any conversation has an image).

    Padding counts for nobody unless ``count_padding``, which makes every sequence count all
    ``seq_length`` positions for its source. ``rows`` (instruction shards) restricts the source
    to those records, in that order (e.g. leaving out conversations whose image is missing)."""
    from megatron_vlm.progress import track

    from megatron_vlm.data.image_shards import ImageDataset, open_image_store
    from megatron_vlm.data.instruction_shards import InstructionDataset
    from megatron_vlm.data.text_shards import open_text_dataset

    L = int(seq_length)
    if kind == "text":
        prefixes = [path] if isinstance(path, str) else list(path)
        prefixes = [p for item in prefixes for p in str(item).split(",") if p]
        total = 0
        for prefix in prefixes:
            ds = open_text_dataset(prefix)
            total += int(np.asarray(ds.sequence_lengths, dtype=np.int64).sum())
        windows = max(0, (total - 1) // L)
        if windows < 1:
            raise ValueError(f"text source {name!r} ({', '.join(prefixes)}): {total} tokens make "
                             f"no window of seq_length={L} + 1 tokens")
        return BlendSource(name, windows, L, loss_tokens=L, image_positions=0)
    if kind == "caption":
        ds = open_image_store(str(path))
        if len(ds) == 0:
            raise ValueError(f"caption source {name!r} ({path}) holds no records")
        if isinstance(ds, ImageDataset):
            if n_img is None:
                raise ValueError(f"caption source {name!r} ({path}) holds images: give n_img "
                                 "(the image positions the encoder makes of each image)")
            n = int(n_img)
        else:
            n = ds.n_img
        if n + 2 > L:
            raise ValueError(f"caption source {name!r}: n_img={n} + separator + EOS exceed "
                             f"seq_length={L}")
        lengths = np.asarray(ds.caption_lengths(), dtype=np.int64)
        if eos_id is not None:
            ends_eos = np.fromiter(
                (lengths[i] > 0 and int(ds.caption_tokens(i)[-1]) == eos_id
                 for i in track(range(len(ds)), len(ds), f"{name}: captions", enabled=progress)),
                dtype=bool, count=len(ds))
            lengths = lengths - ends_eos
        caption = np.minimum(lengths, L - n - 2)
        positions = (np.full(len(ds), L, dtype=np.int32) if count_padding
                     else (n + 2 + caption).astype(np.int32))
        return BlendSource(name, len(ds), positions, loss_tokens=(1 + caption).astype(np.int32),
                           image_positions=n)
    if kind == "instruction":
        ds = InstructionDataset(str(path))
        count = len(ds)
        if count == 0:
            raise ValueError(f"instruction source {name!r} ({path}) holds no records")
        lengths = np.asarray(ds.lengths(), dtype=np.int64)
        images = np.zeros(count, dtype=np.int32)
        loss = np.zeros(count, dtype=np.int32)
        for i in track(range(count), count, f"{name}: conversations", enabled=progress):
            c = int(lengths[i])
            n = 0
            if ds.image_key(i) is not None:
                if n_img is None:
                    raise ValueError(f"instruction source {name!r}: record {ds.key(i)!r} has an "
                                     "image; give n_img (the image positions per image)")
                n = int(n_img)
            images[i] = n
            full = n + c + 1
            if full <= L:     # every target of turns 1.. plus the final EOS
                loss[i] = int(ds.loss_mask(i)[1:].sum()) + 1
            else:             # cut at L: targets up to conversation token L - n (EOS if L - n == c)
                loss[i] = int(ds.loss_mask(i)[1:max(1, min(c, L - n + 1))].sum()) + (L - n == c)
        positions = np.minimum(images.astype(np.int64) + lengths + 1, L).astype(np.int32)
        if count_padding:
            positions = np.full(count, L, dtype=np.int32)
        if int(images.max()) >= L:
            raise ValueError(f"instruction source {name!r}: n_img={int(images.max())} leaves no "
                             f"room in seq_length={L}")
        if rows is not None:
            positions, loss, images = positions[rows], loss[rows], images[rows]
            count = len(rows)
        return BlendSource(name, count, positions, loss_tokens=loss, image_positions=images)
    raise ValueError(f"source {name!r}: kind {kind!r} is not one of {', '.join(SHARD_KINDS)}")
