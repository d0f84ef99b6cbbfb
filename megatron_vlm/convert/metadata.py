"""What a converted checkpoint records besides weights: its place in the source schedule, and the
tokenizer check.

Schedule metadata (:class:`~megatron_vlm.training.schedule.ScheduleMetadata`) is what
``schedule.mode=continue`` reads from ``checkpoint.load``: the source run's step, total steps,
warmup, peak and final LR and decay style. An OpenLM checkpoint stores its step (and
``stats_K.pt`` the share of data seen) but not the schedule's shape, so the converter asks for
it and refuses to guess.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from megatron_vlm.training.schedule import DECAY_STYLES, ScheduleMetadata

logger = logging.getLogger("megatron_vlm")

# The DCLM recipe ends every document with <|endoftext|>, id 0 in the GPT-NeoX-20B BPE.
NEOX_EOS_TOKEN = "<|endoftext|>"
NEOX_EOS_ID = 0


@dataclass
class ScheduleArgs:
    """The source run's schedule as given on the converter's command line."""

    step: Optional[int] = None
    total_steps: Optional[int] = None
    fraction: Optional[float] = None
    warmup_steps: Optional[int] = None
    peak_lr: Optional[float] = None
    final_lr: Optional[float] = None
    decay_style: str = "cosine"
    tokens_per_step: Optional[int] = None


def schedule_metadata(args: ScheduleArgs, checkpoint_step: Optional[int] = None,
                      data_seen: Optional[float] = None) -> ScheduleMetadata:
    """The source run's schedule metadata at the converted checkpoint.

    The step comes from ``args.step``, else the checkpoint's own step, else
    ``round(fraction * total_steps)``; the total from ``args.total_steps``, else
    ``round(step / fraction)``. Warmup, peak and final LR must be given. Anything missing raises
    one ValueError listing every missing item; a fraction that contradicts step / total_steps
    raises too. ``data_seen`` (stats_K.pt's percentage_of_data_seen) is only reported.
    """
    step = args.step if args.step is not None else checkpoint_step
    total = args.total_steps
    fraction = args.fraction
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--schedule-fraction={fraction} must be in [0, 1]")
    if step is None and total is not None and fraction is not None:
        step = round(fraction * total)
    if total is None and step is not None and fraction:
        total = round(step / fraction)
    missing = []
    if step is None:
        missing.append("the step (--step; the checkpoint records none)")
    if total is None:
        hint = "" if data_seen is None else (
            f"; the checkpoint's stats say percentage_of_data_seen={data_seen:g}")
        missing.append(f"the schedule length (--total-steps, or --schedule-fraction{hint})")
    for name, value in (("--warmup-steps", args.warmup_steps), ("--peak-lr", args.peak_lr),
                        ("--final-lr", args.final_lr)):
        if value is None:
            missing.append(name)
    if missing:
        raise ValueError("cannot write schedule metadata (schedule.mode=continue needs it): "
                         "missing " + ", ".join(missing) + ". Give them, or --no-schedule for a "
                         "checkpoint that only schedule.mode=rewarmup or from_scratch can start")
    if fraction is not None and total and abs(step / total - fraction) > 1.0 / total:
        raise ValueError(f"--schedule-fraction={fraction} disagrees with step {step} of "
                         f"--total-steps={total} ({step / total:.4f})")
    if args.decay_style not in DECAY_STYLES:
        raise ValueError(f"--decay-style must be one of {', '.join(DECAY_STYLES)}; "
                         f"got {args.decay_style!r}")
    tokens_seen = step * args.tokens_per_step if args.tokens_per_step else 0
    meta = ScheduleMetadata(step=step, total_steps=total, warmup_steps=args.warmup_steps,
                            peak_lr=args.peak_lr, final_lr=args.final_lr,
                            decay_style=args.decay_style, tokens_seen=tokens_seen,
                            tokens_per_step=args.tokens_per_step, mode="warmup_cosine")
    if step > total:
        raise ValueError(f"step {step} is past the end of a {total}-step schedule")
    if data_seen is not None:
        share = meta.fraction
        if not (abs(data_seen - share) < 0.02 or abs(data_seen / 100 - share) < 0.02):
            logger.warning("schedule: step %d/%d is %.1f%% of the schedule but the checkpoint's "
                           "stats say percentage_of_data_seen=%g; check --total-steps",
                           step, total, 100 * share, data_seen)
    return meta


@dataclass
class TokenizerCheck:
    path: str
    vocab_size: int
    eos_id: int
    eos_token: str

    def to_dict(self) -> dict:
        return {"path": self.path, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "eos_token": self.eos_token}


def check_tokenizer(path: str, embedding_rows: int, eos_token: Optional[str] = None,
                    allow_other_eos: bool = False) -> TokenizerCheck:
    """Loads a local tokenizer file and checks it against a checkpoint with ``embedding_rows``.

    The tokenizer's vocabulary (added tokens included) must fit in the embedding: more tokens
    than rows raises a ValueError naming ``tok_embeddings.weight``. DCLM checkpoints end
    documents with ``<|endoftext|>`` = id 0; another EOS id raises unless ``allow_other_eos``
    (then it is a warning).
    """
    from megatron_vlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path, eos_token)
    result = TokenizerCheck(str(tok.path), int(tok.vocab_size), int(tok.eos_id),
                            str(getattr(tok, "eos_token", "")))
    logger.info("tokenizer %s: vocabulary %d, EOS %r = id %d; the checkpoint has %d embedding "
                "rows", result.path, result.vocab_size, result.eos_token, result.eos_id,
                embedding_rows)
    if result.vocab_size > embedding_rows:
        raise ValueError(f"OpenLM checkpoint key 'tok_embeddings.weight' has {embedding_rows} "
                         f"rows but the tokenizer {result.path} has {result.vocab_size} tokens: "
                         "this is not the checkpoint's tokenizer")
    if result.eos_id != NEOX_EOS_ID:
        message = (f"the tokenizer's EOS {result.eos_token!r} is id {result.eos_id}, but DCLM/"
                   f"OpenLM checkpoints were trained with {NEOX_EOS_TOKEN!r} = id {NEOX_EOS_ID} "
                   "ending each document (GPT-NeoX BPE)")
        if not allow_other_eos:
            raise ValueError(message + "; pass --allow-other-eos to convert anyway")
        logger.warning("%s (allowed by --allow-other-eos)", message)
    return result
