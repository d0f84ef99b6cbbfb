"""What each source put into one global batch: sequences, real tokens, padding, images.

Counted on the host from what the loader already knows before the batch reaches the model, so
the train step waits for nothing: for a blend, the index's (source, sequence) of every slot
and each source's per-sequence positions (the same figures the index balances,
:mod:`megatron_vlm.data.blend_sources`); for random batches, the host tensors the batch was
made of. The counts cover the whole global batch (every data-parallel rank's rows), so every
rank gets the same figures without a collective.

A *real token* is a sequence position its source fills (text, image positions, separator,
caption, conversation, EOS); *padding* is the rest of the sequence slot. With
``data.caption_fill: text`` a caption sequence is packed full with text documents, which the
blend counts for the caption source, so its slots hold no padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence

import numpy as np

from megatron_vlm.data.blend_sources import BlendSource, PerSequence

RANDOM_SOURCE = "random"
"""The one source of ``data.kind=random`` batches."""


@dataclass
class SourceTally:
    """What one source has put into the batches counted."""

    sequences: int = 0
    """Sequence slots the source filled."""
    real_tokens: int = 0
    """Positions its sequences fill (image positions included), padding excluded."""
    padding_tokens: int = 0
    """Positions of its slots that hold padding."""
    image_positions: int = 0
    """Positions that carry an image's encoder output."""
    images: int = 0
    """Images seen (sequences with image positions: one image each)."""

    def add(self, other: "SourceTally") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, where: str) -> "SourceTally":
        """From :meth:`to_dict`; ValueError naming ``where`` when a count is missing or not
        a whole number."""
        counts = {}
        for f in fields(cls):
            value = saved.get(f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}: {f.name}={value!r} is not a count")
            counts[f.name] = value
        return cls(**counts)


def _total(per_sequence: Optional[PerSequence], ids: np.ndarray) -> int:
    """Sum of a per-sequence figure (a constant or an array) over the sequences ``ids``."""
    if per_sequence is None:
        return 0
    if isinstance(per_sequence, int):
        return per_sequence * int(ids.size)
    return int(per_sequence[ids].sum(dtype=np.int64))


def _with_image(image_positions: Optional[PerSequence], ids: np.ndarray) -> int:
    if image_positions is None:
        return 0
    if isinstance(image_positions, int):
        return int(ids.size) if image_positions > 0 else 0
    return int(np.count_nonzero(image_positions[ids]))


class BlendTally:
    """Counts a global batch of a blend from its index alone (no batch is built).

    ``sources`` are the :class:`BlendSource` objects the index was built from (their
    ``image_positions`` too: an index read from its cache keeps only the positions)."""

    def __init__(self, index, sources: Sequence[BlendSource]):
        by_name = {s.name: s for s in sources}
        missing = [n for n in index.source_names if n not in by_name]
        if missing:
            raise ValueError(f"blend tally: no source description for {', '.join(missing)}")
        self.index = index
        self.sources = [by_name[n] for n in index.source_names]
        self.seq_length = index.seq_length
        self.epoch_tokens: dict[str, Optional[int]] = {s.name: s.epoch_tokens
                                                       for s in self.sources}
        """Real tokens of one whole epoch of each source (the unit of its epochs)."""

    def __call__(self, batch: int) -> dict[str, SourceTally]:
        """Per source, what global batch ``batch`` holds of it."""
        labels, ids = self.index.batch(batch)
        ids = np.asarray(ids, dtype=np.int64)
        out = {}
        for c, source in enumerate(self.sources):
            mine = ids[labels == c]
            real = _total(source.tokens_per_sequence, mine)
            out[source.name] = SourceTally(
                sequences=int(mine.size), real_tokens=real,
                padding_tokens=int(mine.size) * self.seq_length - real,
                image_positions=_total(source.image_positions, mine),
                images=_with_image(source.image_positions, mine))
        return out


def random_batch_tally(batch: dict) -> dict[str, SourceTally]:
    """The counts of a whole random global batch (:func:`megatron_vlm.data.batch.random_batch`,
    host tensors): every position is real, an image row holds one image."""
    rows, seq_length = batch["tokens"].shape
    image_mask = batch["image_mask"]
    return {RANDOM_SOURCE: SourceTally(
        sequences=int(rows), real_tokens=int(rows) * int(seq_length), padding_tokens=0,
        image_positions=int(image_mask.sum()), images=int(image_mask.any(dim=1).sum()))}
