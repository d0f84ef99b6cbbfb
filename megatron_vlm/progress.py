"""Progress of long loops that a person can read, on a terminal and in a piped log.

On a terminal (stderr is a TTY) :class:`Progress` is a tqdm bar, and log lines written while it
is open go through ``tqdm.write`` (tqdm's logging redirect), so they print above the bar instead
of being cut into it. When stderr is piped (CI, SLURM logs, ``| tee``) a bar would write a
``\\r``-frame into the file every 0.1 s, so there is no bar: a log line at each tenth of the
work, at most one per ``every_s`` seconds (with no known total, one per ``every_s``). Work that
finishes sooner prints nothing here; the caller's own summary line says it is done.

Every progress display of the project goes through this module: the training loop, the data
tools, ShapesWorld and the evaluation runner.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

logger = logging.getLogger("megatron_vlm")

_now = time.monotonic  # tests substitute a clock


def interactive(stream=None) -> bool:
    """True when ``stream`` (stderr by default) is a terminal a bar can redraw in place."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced by something without isatty
        return False


def _bars_turned_off() -> bool:
    """TQDM_DISABLE set by the user: lines instead of a bar (tqdm itself would show nothing)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


class Progress:
    """A bar on a terminal, a few log lines when piped, nothing when ``enabled`` is false (other
    ranks, ``--no-progress``). Use as a context manager, or call :meth:`close`."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it", *,
                 enabled: bool = True, initial: int = 0, every_s: float = 30.0,
                 lines: bool = True, leave: bool = True):
        """``lines``: log piped progress lines (off where the caller logs its own per-step lines,
        as the training loop does); ``leave``: keep the finished bar on the terminal."""
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self.every_s = every_s
        self.note = ""
        self._lines = enabled and lines
        self._start = self._last_line = _now()
        self._next_tenth = self._tenth_after(initial)
        self._bar = None
        self._redirect: Optional[contextlib.ExitStack] = None
        if enabled and interactive() and not _bars_turned_off():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                             dynamic_ncols=True, disable=False)
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm())

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def _tenth_after(self, done: int) -> int:
        return math.floor(done / self.total * 10) + 1 if self.total else 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines:
            self._maybe_log()

    def set_note(self, note: str) -> None:
        """What the work is doing now (a stage name): the bar's postfix, or part of the next
        piped line."""
        self.note = note
        if self._bar is not None:
            self._bar.set_postfix_str(note)

    def _maybe_log(self) -> None:
        now = _now()
        if now - self._last_line < self.every_s:
            return
        if self.total:
            if self.done * 10 < self._next_tenth * self.total or self.done >= self.total:
                return  # not at the next tenth yet; at the end the caller's summary says it
            self._next_tenth = self._tenth_after(self.done)
        self._last_line = now
        rate = self.done / max(now - self._start, 1e-9)
        of = (f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
              if self.total else f" {self.unit}")
        logger.info("%s: %s%s, %.1f %s/s%s", self.desc, f"{self.done:,}", of, rate, self.unit,
                    f" ({self.note})" if self.note else "")

    def elapsed(self) -> float:
        return _now() - self._start

    def close(self) -> float:
        """Closes the bar (and its logging redirect); returns the seconds since the start."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
        return self.elapsed()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], total: Optional[int], desc: str, unit: str = "it", *,
          enabled: bool = True) -> Iterator[T]:
    """``items``, shown as :class:`Progress` while they are consumed."""
    with Progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


def quiet_third_party_bars() -> None:
    """Turns off the bars of libraries (lm-eval's request building, ``datasets``' split
    generation) when stderr is piped. tqdm and ``datasets`` read these variables when they are
    imported, so this runs before them (:func:`megatron_vlm.logs.configure_logging`); a bar the
    caller enables explicitly, as :class:`Progress` does on a terminal, is not affected."""
    if not interactive():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
