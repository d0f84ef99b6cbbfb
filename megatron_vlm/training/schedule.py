"""Learning-rate schedules of every training stage, and where a checkpoint sits in one.

The recipe has three kinds of schedule (docs/schedules.md has the formulas and a plot):

* ``warmup_cosine`` -- text pre-training, image-text pre-training from scratch: linear warmup
  from 0 to the peak, then cosine (or linear) decay to the final LR at ``total_steps``;
* ``continue`` -- image-text continued pre-training from an x% text checkpoint that keeps the
  text run's schedule: the rest of the text run's curve, from the checkpoint's step to the text
  run's end, squeezed or stretched onto the new run's steps (a cooldown from the checkpoint's LR
  to the final LR);
* ``rewarmup`` -- a fresh linear warmup to a new peak then cosine (used from 0% and 100% text
  checkpoints, where the text run's LR is 0 or already at its final value), and its fine-tuning
  variant ``warmup_fraction`` whose warmup is a fraction of the run (0.05).

Step convention: ``lr(k)`` is the learning rate of the optimizer update that takes the run from
``k`` completed steps to ``k + 1``, so a run of ``total_steps`` updates uses ``lr(0)`` ...
``lr(total_steps - 1)`` and ``lr(total_steps)`` is the value the schedule ends at (the final LR).
With a warmup, ``lr(0) == 0``. A checkpoint written after ``s`` updates records ``step = s``; a
run resumed or continued from it uses ``lr(s)`` (or the continued schedule's ``lr(0)``, which is
the same number) for its next update.

Everything here is plain Python (no torch), deterministic, and JSON-friendly:
:class:`ScheduleMetadata` is what a checkpoint records, and :meth:`LRSchedule.from_metadata`
rebuilds the exact schedule from it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Union

__all__ = [
    "DECAY_STYLES",
    "MODES",
    "ScheduleMetadata",
    "LRSchedule",
    "apply_lr",
    "checkpoint_steps",
]

DECAY_STYLES = ("cosine", "linear", "constant")
"""How the LR falls from the peak to the final LR after the warmup ("constant" stays at the peak)."""

MODES = ("warmup_cosine", "rewarmup", "warmup_fraction", "continue")
"""How a schedule was built (:class:`LRSchedule` constructor names)."""

_INT_FIELDS = ("step", "total_steps", "warmup_steps", "tokens_seen")
_OPT_INT_FIELDS = ("tokens_per_step", "parent_start_step")
_FLOAT_FIELDS = ("peak_lr", "final_lr")
_STR_FIELDS = ("decay_style", "mode")
_REQUIRED_KEYS = _INT_FIELDS + _FLOAT_FIELDS + _STR_FIELDS
_OPTIONAL_KEYS = ("tokens_per_step", "parent", "parent_start_step")


# ----------------------------------------------------------------------------- validation helpers

def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_float(name: str, value: Any, *, positive: bool) -> float:
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_decay_style(name: str, value: Any) -> str:
    if value not in DECAY_STYLES:
        raise ValueError(f"{name} must be one of {', '.join(DECAY_STYLES)}; got {value!r}")
    return value


def _check_shape(prefix: str, total_steps, warmup_steps, peak_lr, final_lr, decay_style):
    """Validates and normalizes the arguments every schedule shape shares."""
    total_steps = _check_int(f"{prefix}total_steps", total_steps, 1)
    warmup_steps = _check_int(f"{prefix}warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(f"{prefix}warmup_steps={warmup_steps} is larger than "
                         f"{prefix}total_steps={total_steps}")
    peak_lr = _check_float(f"{prefix}peak_lr", peak_lr, positive=True)
    final_lr = _check_float(f"{prefix}final_lr", final_lr, positive=False)
    if final_lr > peak_lr:
        raise ValueError(f"{prefix}final_lr={final_lr:g} is larger than {prefix}peak_lr={peak_lr:g}")
    decay_style = _check_decay_style(f"{prefix}decay_style", decay_style)
    return total_steps, warmup_steps, peak_lr, final_lr, decay_style


def _shape_lr(x: float, total: int, warmup: int, peak: float, final: float, style: str) -> float:
    """LR of a warmup + decay curve at a (possibly fractional) step ``x >= 0``.

    Exact at the corners: ``0`` at ``x = 0`` (with a warmup), ``peak`` at ``x = warmup`` and
    ``final`` at ``x >= total``. With ``warmup == total`` there is no decay phase and the curve
    ends at the peak; with ``style == "constant"`` it stays at the peak after the warmup.
    """
    if x < warmup:
        return peak * x / warmup
    if style == "constant" or total == warmup or x == warmup:
        return peak
    if x >= total:
        return final
    progress = (x - warmup) / (total - warmup)
    if style == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return final + (peak - final) * (1.0 - progress)


# ----------------------------------------------------------------------------- metadata

@dataclass
class ScheduleMetadata:
    """Where a checkpoint sits in its LR schedule; enough to rebuild the schedule exactly.

    For a ``continue`` schedule ``parent`` is the metadata of the checkpoint it continued (the
    text run at its x% step) and ``parent_start_step`` that step; a ``rewarmup`` schedule may
    record the checkpoint it started from the same way, for provenance (its LR does not depend on
    it). ``peak_lr``, ``final_lr`` and ``decay_style`` of a ``continue`` schedule are the
    parent's; its ``warmup_steps`` counts its own steps still inside the parent's warmup (0 from
    a checkpoint past the warmup).
    """

    step: int
    """Optimizer updates completed (the schedule position of the next update)."""
    total_steps: int
    """Updates in the whole schedule."""
    warmup_steps: int
    """Steps of linear warmup from 0 at the start of the schedule."""
    peak_lr: float
    """LR at the end of the warmup."""
    final_lr: float
    """LR at ``total_steps`` (and after)."""
    decay_style: str
    """"cosine" | "linear" | "constant": the curve from peak to final."""
    tokens_seen: int = 0
    """Training tokens consumed by this run up to ``step``."""
    tokens_per_step: Optional[int] = None
    """Tokens per optimizer update (global batch x sequence length), if known."""
    mode: str = "warmup_cosine"
    """How the schedule was built: one of MODES."""
    parent: Optional["ScheduleMetadata"] = None
    """The checkpoint this schedule started from (``continue``; optional for ``rewarmup``)."""
    parent_start_step: Optional[int] = None
    """The parent's step this schedule started at (``parent.step``)."""

    def __post_init__(self) -> None:
        self._validate("")

    def _validate(self, prefix: str) -> None:
        (self.total_steps, self.warmup_steps, self.peak_lr, self.final_lr,
         self.decay_style) = _check_shape(prefix, self.total_steps, self.warmup_steps,
                                          self.peak_lr, self.final_lr, self.decay_style)
        self.step = _check_int(f"{prefix}step", self.step, 0)
        self.tokens_seen = _check_int(f"{prefix}tokens_seen", self.tokens_seen, 0)
        if self.tokens_per_step is not None:
            self.tokens_per_step = _check_int(f"{prefix}tokens_per_step", self.tokens_per_step, 1)
        if self.mode not in MODES:
            raise ValueError(f"{prefix}mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.parent is not None and not isinstance(self.parent, ScheduleMetadata):
            raise ValueError(f"{prefix}parent must be a ScheduleMetadata or None, "
                             f"got {type(self.parent).__name__}")
        if self.parent_start_step is not None:
            self.parent_start_step = _check_int(f"{prefix}parent_start_step",
                                                self.parent_start_step, 0)
        if self.mode == "continue" and (self.parent is None or self.parent_start_step is None):
            raise ValueError(f"{prefix}mode='continue' needs parent and parent_start_step "
                             "(the schedule metadata of the checkpoint it continues)")
        if self.mode in ("warmup_cosine", "warmup_fraction") and self.parent is not None:
            raise ValueError(f"{prefix}parent must be None for mode={self.mode!r}")
        if (self.parent is None) != (self.parent_start_step is None):
            raise ValueError(f"{prefix}parent and parent_start_step must be given together")
        if self.parent is not None and self.parent_start_step != self.parent.step:
            raise ValueError(f"{prefix}parent_start_step={self.parent_start_step} differs from "
                             f"{prefix}parent.step={self.parent.step}")

    @property
    def fraction(self) -> float:
        """``step / total_steps``: how far through its schedule the checkpoint is."""
        return self.step / self.total_steps

    @property
    def lr(self) -> float:
        """The LR at ``step`` (the LR of the next update)."""
        return LRSchedule.from_metadata(self).lr(self.step)

    def to_dict(self) -> Dict[str, Any]:
        """A plain, JSON-able dict (``parent`` nested as a dict or None)."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "peak_lr": self.peak_lr,
            "final_lr": self.final_lr,
            "decay_style": self.decay_style,
            "tokens_seen": self.tokens_seen,
            "tokens_per_step": self.tokens_per_step,
            "mode": self.mode,
            "parent": None if self.parent is None else self.parent.to_dict(),
            "parent_start_step": self.parent_start_step,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], _prefix: str = "") -> "ScheduleMetadata":
        """Inverse of :meth:`to_dict`. A missing, unknown or wrongly typed key raises a
        ``ValueError`` naming it (dotted for nested parents, e.g. ``parent.peak_lr``).
        ``tokens_per_step``, ``parent`` and ``parent_start_step`` may be absent (None)."""
        where = _prefix or "schedule metadata"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(data).__name__}")
        for key in _REQUIRED_KEYS:
            if key not in data:
                raise ValueError(f"schedule metadata key {_prefix}{key} is missing")
        unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise ValueError(f"schedule metadata has unknown key(s): "
                             f"{', '.join(_prefix + k for k in unknown)}")
        values: Dict[str, Any] = {}
        for key in _INT_FIELDS:
            if not _is_int(data[key]):
                raise ValueError(f"schedule metadata key {_prefix}{key} must be an integer, "
                                 f"got {data[key]!r}")
            values[key] = int(data[key])
        for key in _OPT_INT_FIELDS:
            value = data.get(key)
            if value is not None and not _is_int(value):
                raise ValueError(f"schedule metadata key {_prefix}{key} must be an integer or "
                                 f"null, got {value!r}")
            values[key] = None if value is None else int(value)
        for key in _FLOAT_FIELDS:
            if not _is_real(data[key]):
                raise ValueError(f"schedule metadata key {_prefix}{key} must be a number, "
                                 f"got {data[key]!r}")
            values[key] = float(data[key])
        for key in _STR_FIELDS:
            if not isinstance(data[key], str):
                raise ValueError(f"schedule metadata key {_prefix}{key} must be a string, "
                                 f"got {data[key]!r}")
            values[key] = data[key]
        parent = data.get("parent")
        if parent is not None:
            if not isinstance(parent, Mapping):
                raise ValueError(f"schedule metadata key {_prefix}parent must be a dict or "
                                 f"null, got {type(parent).__name__}")
            parent = cls.from_dict(parent, _prefix=f"{_prefix}parent.")
        values["parent"] = parent
        meta = cls.__new__(cls)
        for key, value in values.items():
            setattr(meta, key, value)
        # Same checks as construction, with the nested key prefix in the messages.
        meta._validate(_prefix)
        return meta


# ----------------------------------------------------------------------------- schedules

def warmup_steps_from_fraction(warmup_fraction: float, total_steps: int) -> int:
    """``ceil(warmup_fraction * total_steps)``, the warmup of a run whose warmup is a fraction of
    it; every schedule built from a fraction takes its warmup from here. ``warmup_fraction``
    must be in [0, 1]."""
    if not _is_real(warmup_fraction) or not math.isfinite(float(warmup_fraction)):
        raise ValueError(f"warmup_fraction must be a finite number, got {warmup_fraction!r}")
    warmup_fraction = float(warmup_fraction)
    if not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
    # round() first so that e.g. 0.07 * 100 = 7.000000000000001 does not ceil to 8.
    return min(total_steps, math.ceil(round(warmup_fraction * total_steps, 9)))


class LRSchedule:
    """A learning-rate schedule over ``total_steps`` optimizer updates (see the module doc).

    Build one with :meth:`warmup_cosine`, :meth:`rewarmup`, :meth:`warmup_cosine_fraction`
    (alias :meth:`from_fraction`), :meth:`continue_from` or :meth:`from_metadata`.
    """

    def __init__(self, *, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float,
                 decay_style: str = "cosine", mode: str = "warmup_cosine",
                 tokens_per_step: Optional[int] = None,
                 parent: Optional[ScheduleMetadata] = None) -> None:
        (self.total_steps, self.warmup_steps, self.peak_lr, self.final_lr,
         self.decay_style) = _check_shape("", total_steps, warmup_steps, peak_lr, final_lr,
                                          decay_style)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.mode = mode
        self.tokens_per_step = (None if tokens_per_step is None
                                else _check_int("tokens_per_step", tokens_per_step, 1))
        if parent is not None and not isinstance(parent, ScheduleMetadata):
            raise ValueError(f"parent must be a ScheduleMetadata, got {type(parent).__name__}")
        if parent is not None and mode not in ("continue", "rewarmup"):
            raise ValueError(f"parent is only recorded for modes continue and rewarmup, "
                             f"not {mode!r}")
        self.parent = parent
        self._parent_schedule: Optional[LRSchedule] = None
        if mode == "continue":
            if parent is None:
                raise ValueError("mode='continue' needs the parent checkpoint's schedule metadata")
            self._parent_schedule = LRSchedule.from_metadata(parent)

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def warmup_cosine(cls, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float,
                      decay_style: str = "cosine", *,
                      tokens_per_step: Optional[int] = None) -> "LRSchedule":
        """Linear warmup ``lr(k) = peak_lr * k / warmup_steps`` for ``k < warmup_steps`` (so
        ``lr(0) = 0``), then ``decay_style`` from ``peak_lr`` at ``warmup_steps`` to
        ``final_lr`` at ``total_steps``; ``final_lr`` after. The text run's schedule."""
        return cls(total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                   final_lr=final_lr, decay_style=decay_style, mode="warmup_cosine",
                   tokens_per_step=tokens_per_step)

    @classmethod
    def rewarmup(cls, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float,
                 decay_style: str = "cosine", *, tokens_per_step: Optional[int] = None,
                 parent: Optional[Union[ScheduleMetadata, Mapping]] = None) -> "LRSchedule":
        """A fresh warmup to a new peak, then cosine to ``final_lr`` (same curve as
        :meth:`warmup_cosine`). The paper's choice from 0% and 100% checkpoints. ``parent``
        (the checkpoint's metadata) is only recorded, for provenance and plots."""
        if isinstance(parent, Mapping):
            parent = ScheduleMetadata.from_dict(parent)
        return cls(total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                   final_lr=final_lr, decay_style=decay_style, mode="rewarmup",
                   tokens_per_step=tokens_per_step, parent=parent)

    @classmethod
    def warmup_cosine_fraction(cls, total_steps: int, warmup_fraction: float, peak_lr: float,
                               final_lr: float, decay_style: str = "cosine", *,
                               tokens_per_step: Optional[int] = None) -> "LRSchedule":
        """:meth:`warmup_cosine` with ``warmup_steps = ceil(warmup_fraction * total_steps)``
        (fine-tuning: ``warmup_fraction=0.05``). ``warmup_fraction`` must be in [0, 1]."""
        total_steps = _check_int("total_steps", total_steps, 1)
        warmup_steps = warmup_steps_from_fraction(warmup_fraction, total_steps)
        return cls(total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                   final_lr=final_lr, decay_style=decay_style, mode="warmup_fraction",
                   tokens_per_step=tokens_per_step)

    from_fraction = warmup_cosine_fraction

    @classmethod
    def continue_from(cls, parent: Optional[Union[ScheduleMetadata, Mapping]], total_steps: int,
                      *, tokens_per_step: Optional[int] = None) -> "LRSchedule":
        """Keep the parent run's schedule from its checkpoint step ``s0`` to its end ``T``,
        mapped onto ``total_steps`` new updates::

            lr_new(k) = parent_lr(s0 + (T - s0) * k / total_steps)

        so ``lr_new(0)`` is the parent's LR at the checkpoint and ``lr_new(total_steps)`` the
        parent's final LR. From a checkpoint still inside the parent's warmup the remainder
        includes the rest of the warmup (the LR first rises to the peak). A checkpoint at or
        past the parent's end has nothing left to continue: use :meth:`rewarmup`.
        """
        if parent is None:
            raise ValueError("schedule mode 'continue' needs the checkpoint's schedule metadata, "
                             "and the checkpoint has none (use rewarmup, or a checkpoint saved "
                             "with schedule metadata)")
        if isinstance(parent, Mapping):
            parent = ScheduleMetadata.from_dict(parent)
        if not isinstance(parent, ScheduleMetadata):
            raise ValueError(f"parent must be a ScheduleMetadata, got {type(parent).__name__}")
        if parent.step >= parent.total_steps:
            raise ValueError(
                f"cannot continue the schedule of a checkpoint at step {parent.step} of "
                f"{parent.total_steps} ({100 * parent.fraction:.1f}% of its schedule): nothing "
                "is left of it; use schedule mode 'rewarmup' instead")
        return cls(total_steps=total_steps, warmup_steps=0, peak_lr=parent.peak_lr,
                   final_lr=parent.final_lr, decay_style=parent.decay_style, mode="continue",
                   tokens_per_step=tokens_per_step, parent=parent)._set_continue_warmup()

    def _set_continue_warmup(self) -> "LRSchedule":
        # Own steps that map strictly inside the parent's warmup (informational).
        parent_sched = self._parent_schedule
        s0, span = self.parent.step, parent_sched.total_steps - self.parent.step
        remaining = parent_sched.warmup_steps - s0
        if remaining > 0:
            self.warmup_steps = min(self.total_steps, math.ceil(remaining * self.total_steps / span))
        return self

    @classmethod
    def from_metadata(cls, meta: Union[ScheduleMetadata, Mapping]) -> "LRSchedule":
        """The schedule a checkpoint's metadata describes (recursively for ``continue``)."""
        if isinstance(meta, Mapping):
            meta = ScheduleMetadata.from_dict(meta)
        if meta.mode == "continue":
            sched = cls.continue_from(meta.parent, meta.total_steps,
                                      tokens_per_step=meta.tokens_per_step)
            if sched.warmup_steps != meta.warmup_steps:
                raise ValueError(f"schedule metadata warmup_steps={meta.warmup_steps} does not "
                                 f"match its continued parent ({sched.warmup_steps})")
            return sched
        return cls(total_steps=meta.total_steps, warmup_steps=meta.warmup_steps,
                   peak_lr=meta.peak_lr, final_lr=meta.final_lr, decay_style=meta.decay_style,
                   mode=meta.mode, tokens_per_step=meta.tokens_per_step, parent=meta.parent)

    # --- queries ------------------------------------------------------------------------------

    def lr(self, step: Union[int, float]) -> float:
        """The LR of the update at ``step`` (0-based); the final value for ``step >=
        total_steps``. Fractional steps are allowed (continued schedules use them)."""
        if not _is_real(step) or math.isnan(float(step)):
            raise ValueError(f"step must be a number, got {step!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._parent_schedule is None:
            return _shape_lr(step, self.total_steps, self.warmup_steps, self.peak_lr,
                             self.final_lr, self.decay_style)
        s0 = self.parent.step
        end = self._parent_schedule.total_steps
        if step >= self.total_steps:
            return self._parent_schedule.lr(end)
        # Integer arithmetic first: exact at k = 0 (s0) and k = total_steps (end).
        return self._parent_schedule.lr(s0 + (end - s0) * step / self.total_steps)

    def __call__(self, step: Union[int, float]) -> float:
        return self.lr(step)

    @property
    def first_lr(self) -> float:
        return self.lr(0)

    @property
    def last_lr(self) -> float:
        return self.lr(self.total_steps)

    def metadata(self, step: int, tokens_seen: Optional[int] = None, *,
                 tokens_per_step: Optional[int] = None) -> ScheduleMetadata:
        """What a checkpoint after ``step`` updates records. ``tokens_seen`` defaults to
        ``step * tokens_per_step`` when the tokens per step are known, else 0."""
        step = _check_int("step", step, 0)
        tps = self.tokens_per_step if tokens_per_step is None else tokens_per_step
        if tokens_seen is None:
            tokens_seen = step * tps if tps is not None else 0
        return ScheduleMetadata(
            step=step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
            peak_lr=self.peak_lr, final_lr=self.final_lr, decay_style=self.decay_style,
            tokens_seen=tokens_seen, tokens_per_step=tps, mode=self.mode, parent=self.parent,
            parent_start_step=None if self.parent is None else self.parent.step)

    def describe(self) -> str:
        """One line for the start-of-run log."""
        head = (f"LR schedule: mode={self.mode} steps={self.total_steps} "
                f"warmup={self.warmup_steps} peak={self.peak_lr:.4g} final={self.final_lr:.4g} "
                f"decay={self.decay_style}")
        if self.mode == "continue":
            p = self.parent
            head += (f" continuing {p.mode} run from its step {p.step}/{p.total_steps} "
                     f"({100 * p.fraction:.1f}%): first_lr={self.first_lr:.4g} "
                     f"last_lr={self.last_lr:.4g}")
        elif self.parent is not None:
            p = self.parent
            head += (f" started from a {p.mode} checkpoint at step {p.step}/{p.total_steps} "
                     f"({100 * p.fraction:.1f}%)")
        return head

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


# ----------------------------------------------------------------------------- helpers

def apply_lr(optimizer, lr: float) -> int:
    """Sets ``lr`` on every param group of ``optimizer``; returns how many groups were set.

    Works for ``torch.optim`` optimizers and megatron-core's: ``MegatronOptimizer`` (FP32,
    mixed precision, distributed) forwards ``param_groups`` to the torch optimizer it wraps, and
    ``ChainedOptimizer.param_groups`` lists the (same) group dicts of every optimizer it chains,
    so writing ``group["lr"]`` reaches the optimizer that steps.
    """
    lr = _check_float("lr", lr, positive=False)
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise TypeError(f"{type(optimizer).__name__} has no param_groups")
    count = 0
    for group in groups:
        # megatron-core's parameter groups may scale the LR (``lr_mult``); torch's have none.
        group["lr"] = lr * group.get("lr_mult", 1.0)
        count += 1
    return count


def checkpoint_steps(total_steps: int, fractions: Iterable[float]) -> Dict[int, float]:
    """The steps at which to save for the requested schedule fractions, ``{step: fraction}``.

    ``step = floor(f * total_steps + 0.5)`` (round half up), at least 1. Fractions must be in
    (0, 1]; fractions that land on the same step are merged (the smallest is kept). Sorted by
    step; ``1.0`` maps to ``total_steps``.
    """
    total_steps = _check_int("total_steps", total_steps, 1)
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Iterable):
        fractions = [fractions]
    out: Dict[int, float] = {}
    for f in fractions:
        if not _is_real(f) or not math.isfinite(float(f)) or not 0.0 < float(f) <= 1.0:
            raise ValueError(f"checkpoint fraction {f!r} is outside (0, 1]")
        f = float(f)
        step = max(1, min(total_steps, math.floor(f * total_steps + 0.5)))
        if step not in out or f < out[step]:
            out[step] = f
    return dict(sorted(out.items()))
