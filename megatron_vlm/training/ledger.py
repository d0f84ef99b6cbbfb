"""The run's useful-token ledger: per data source, what the training has consumed so far.

Per source: sequences, real tokens (the positions its sequences fill) and padding apart, image
positions, images seen, and epochs (real tokens consumed / real tokens of one whole epoch of the
source). The loader counts every global batch on the host (:mod:`megatron_vlm.data.batch_tally`)
and the loop adds it here, so the train step gains no wait for the device. The ledger is saved
in every checkpoint's common.json (``ledger``) and a resumed run continues from it, so a run
killed and resumed ends with the counts of one that went straight through. A checkpoint
written before ledgers were kept has none: the counts then start at its step
(``counted_from_step``), said once in the log.

Each log step's metrics carry ``ledger/<source>/<count>`` and ``real_tokens_per_s``; the end
of training logs the whole ledger as a table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from megatron_vlm.data.batch_tally import SourceTally

logger = logging.getLogger("megatron_vlm")

LEDGER_FORMAT = 1
"""Bumped when the saved form changes meaning."""
METRIC_COUNTS = ("real_tokens", "padding_tokens", "images")
"""The counts every log step reports per source (with the epochs)."""


@dataclass
class TokenLedger:
    """What each source has put into this run's batches so far."""

    seq_length: int
    """Positions per sequence slot."""
    epoch_tokens: dict[str, Optional[int]]
    """Real tokens of one whole epoch of each source; None for a source without an end
    (random batches)."""
    sources: dict[str, SourceTally] = field(default_factory=dict)
    """The counts per source, in the blend's order."""
    steps: int = 0
    """Global batches counted."""
    counted_from_step: int = 0
    """The step the counts start after: 0, unless the run resumed from a checkpoint that kept
    no ledger."""

    def __post_init__(self) -> None:
        for name in self.epoch_tokens:
            self.sources.setdefault(name, SourceTally())

    def add(self, batch: dict[str, SourceTally]) -> None:
        """Adds one global batch's counts (:mod:`megatron_vlm.data.batch_tally`)."""
        for name, tally in batch.items():
            self.sources.setdefault(name, SourceTally()).add(tally)
        self.steps += 1

    @property
    def real_tokens(self) -> int:
        """Real tokens over every source."""
        return sum(t.real_tokens for t in self.sources.values())

    def epochs(self, name: str) -> Optional[float]:
        """Epochs of source ``name`` consumed (None when the source has no end)."""
        size = self.epoch_tokens.get(name)
        return self.sources[name].real_tokens / size if size else None

    def state_dict(self) -> dict:
        """The ledger as a checkpoint stores it (JSON)."""
        return {"format": LEDGER_FORMAT, "seq_length": self.seq_length, "steps": self.steps,
                "counted_from_step": self.counted_from_step,
                "epoch_tokens": dict(self.epoch_tokens),
                "sources": {name: t.to_dict() for name, t in self.sources.items()}}

    def resume_from(self, saved: Optional[dict], step: int, where: str) -> None:
        """Continues the counts a checkpoint at ``step`` saved (``saved``: its ``ledger``, None
        when it kept none). ValueError naming ``where`` when the saved ledger is malformed."""
        if saved is None:
            self.counted_from_step = step
            logger.warning("%s keeps no token ledger (written before ledgers were kept): the "
                           "ledger counts the steps after %d only", where, step)
            return
        if not isinstance(saved, dict) or saved.get("format") != LEDGER_FORMAT \
                or not isinstance(saved.get("sources"), dict):
            raise ValueError(f"{where}: ledger is not a token ledger of format {LEDGER_FORMAT}")
        for name, counts in saved["sources"].items():
            self.sources[name] = SourceTally.from_dict(counts or {},
                                                       f"{where}: ledger.sources.{name}")
        for name, size in (saved.get("epoch_tokens") or {}).items():
            self.epoch_tokens.setdefault(name, size)  # a source this run no longer draws from
        self.steps = int(saved.get("steps", 0))
        self.counted_from_step = int(saved.get("counted_from_step", 0))

    def summary(self) -> dict:
        """Per source: every count, its epochs and its share of the real tokens; and totals."""
        real = self.real_tokens
        per_source = {name: {**t.to_dict(), "epochs": self.epochs(name),
                             "share": t.real_tokens / real if real else 0.0}
                      for name, t in self.sources.items()}
        total = SourceTally()
        for t in self.sources.values():
            total.add(t)
        return {"steps": self.steps, "counted_from_step": self.counted_from_step,
                "sources": per_source, "total": total.to_dict()}

    def metrics(self) -> dict[str, float]:
        """``ledger/<source>/<count>`` and ``ledger/<source>/epochs`` for a log step (floats,
        which TensorBoard takes)."""
        out = {}
        for name, t in self.sources.items():
            for count in METRIC_COUNTS:
                out[f"ledger/{name}/{count}"] = float(getattr(t, count))
            epochs = self.epochs(name)
            if epochs is not None:
                out[f"ledger/{name}/epochs"] = epochs
        return out

    def table(self) -> str:
        """The ledger as the end of training logs it: a line per source and a total."""
        summary = self.summary()
        since = (f" (steps after {self.counted_from_step}: the checkpoint resumed from kept no "
                 "ledger)" if self.counted_from_step else "")
        lines = [f"token ledger after {self.steps} global batches{since}:",
                 f"  {'source':<13} {'real tokens':>14} {'share':>7} {'padding':>12} "
                 f"{'images':>9} {'epochs':>8}"]
        rows = [(name, s) for name, s in summary["sources"].items()]
        rows.append(("total", {**summary["total"], "share": 1.0 if self.real_tokens else 0.0,
                               "epochs": None}))
        for name, s in rows:
            epochs = "-" if s["epochs"] is None else f"{s['epochs']:.3f}"
            lines.append(f"  {name:<13} {s['real_tokens']:>14,} {s['share']:>7.2%} "
                         f"{s['padding_tokens']:>12,} {s['images']:>9,} {epochs:>8}")
        return "\n".join(lines)
