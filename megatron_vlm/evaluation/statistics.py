"""Uncertainty of evaluation scores: percentile bootstrap intervals over items, paired
comparisons of two arms scored on the same items, McNemar's exact test and Holm's correction.

Everything works on per-item scores (one value per benchmark example, in [0, 1]: VQA soft
accuracy, exact match 0/1, ...). A task's value is the mean of its items' scores, or, where the
task reports the unweighted mean of its parts (POPE's three splits, AGIEval LSAT's three
sections), the mean of the parts' means: give each item's part as ``groups`` and the bootstrap
resamples within each part (a stratified bootstrap, keeping every part's size), so the resampled
statistic is the one reported.

Defaults (:data:`RESAMPLES`, :data:`SEED`, :data:`LEVEL`): 10,000 resamples, seed 0, 95%
intervals. The percentile interval of B resamples is ``np.quantile(values, [a/2, 1 - a/2])``
with linear interpolation, as scipy.stats.bootstrap's ``method="percentile"``; given the same
generator both draw the same indices, so their intervals are equal.

* :func:`task_draws`: the bootstrap values of one task's value; :func:`bootstrap_ci`: its
  interval.
* :func:`stable_score_ci`: interval of a stable score (the mean over tasks of value - chance):
  each task's items are resampled independently of the others', and the score recomputed
  (:func:`stable_score_draws`, from the tasks' own draws, which an evaluation draws once).
* :func:`paired_bootstrap`: the difference B - A between two arms scored on the same items
  (aligned by the caller: item i of ``a`` and of ``b`` is the same example). Every resample
  draws one set of item indices and applies it to both arms, so the variation the arms share
  (hard and easy items) cancels. Its two-sided p-value is that of the bootstrap distribution
  shifted to the null (Hall & Wilson 1991): ``(1 + #{|d* - d| >= |d|}) / (1 + B)`` where d is
  the observed difference and d* a resampled one; comparing an arm with itself gives 1.
* :func:`paired_stable_score`: the same for a stable score (chance cancels in the difference).
* :func:`mcnemar_exact`: McNemar's exact test for right/wrong items: under the null the
  discordant pairs split 50/50, so the count won by B is Binomial(discordant, 1/2)
  (``scipy.stats.binomtest``, two-sided).
* :func:`holm`: Holm's step-down adjustment of a family of p-values (valid under any
  dependence between them).

Each task's resampling stream is seeded by (seed, task name) (:func:`task_rng`), so a task's
interval does not depend on which other tasks are present or in what order, and the stable
score's resamples of a task are the ones of that task's own interval.

Resampling is vectorised: each part's indices are drawn as a (chunk, n) matrix, chunks sized to
keep about :data:`CHUNK_ELEMENTS` indices in memory; 10,000 resamples of a few thousand items
take a fraction of a second.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
CHUNK_ELEMENTS = 1 << 21
"""Indices drawn at once (2M int32: 8 MB): a chunk of resamples is this many over n rows."""
METHOD = "percentile bootstrap over items"


@dataclass(frozen=True)
class Paired:
    """A paired comparison of arm B against arm A."""

    a: float
    """A's value on the compared items."""
    b: float
    """B's value on the compared items."""
    difference: float
    """b - a."""
    ci: tuple[float, float]
    """Percentile bootstrap interval of the difference."""
    p_value: float
    """Two-sided p-value of "no difference"."""
    test: str
    """``paired bootstrap`` or ``McNemar exact``."""


def task_rng(seed: int, task: str) -> np.random.Generator:
    """The resampling stream of one task: seeded by ``seed`` and the task's name (crc32, not
    Python's salted ``hash``), so it is the same in every process and every run."""
    return np.random.default_rng([int(seed), zlib.crc32(task.encode("utf-8"))])


def _as_scores(values, name: str = "scores") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty list of numbers, got shape {array.shape}")
    return array


def _parts(n: int, groups: Optional[Sequence]) -> list[np.ndarray]:
    """The positions of each part (one part of all items when there are no groups), parts in
    first-seen order."""
    if groups is None:
        return [np.arange(n)]
    labels = list(groups)
    if len(labels) != n:
        raise ValueError(f"groups: {len(labels)} labels for {n} items")
    order: dict = {}
    for i, label in enumerate(labels):
        order.setdefault(label, []).append(i)
    return [np.asarray(positions) for positions in order.values()]


def grouped_mean(scores, groups: Optional[Sequence] = None) -> float:
    """A task's value: the mean of the scores, or the mean of the groups' means."""
    scores = _as_scores(scores)
    return float(np.mean([scores[p].mean() for p in _parts(len(scores), groups)]))


def resampled_means(arms: np.ndarray, groups: Optional[Sequence], resamples: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Bootstrap values of the (grouped) mean of each row of ``arms`` ([k, n]: k arms on the
    same n items), all rows resampled with the SAME indices: returns [k, resamples]. Each part
    is resampled within itself."""
    arms = np.atleast_2d(np.asarray(arms, dtype=np.float64))
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be at least 1")
    parts = _parts(arms.shape[1], groups)
    total = np.zeros((arms.shape[0], resamples))
    for positions in parts:
        values = arms[:, positions]
        n = len(positions)
        rows = max(1, CHUNK_ELEMENTS // n)
        for start in range(0, resamples, rows):
            stop = min(resamples, start + rows)
            # int32 indices draw about 3x faster than int64; one 1-D take per arm is ~25x
            # faster than fancy-indexing the [k, n] array with a 2-D index.
            index = rng.integers(0, n, size=(stop - start, n), dtype=np.int32)
            for arm in range(values.shape[0]):
                total[arm, start:stop] += np.take(values[arm], index).mean(axis=-1)
    return total / len(parts)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap values (linear interpolation)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must be in (0, 1)")
    alpha = 1.0 - level
    lo, hi = np.quantile(values, [alpha / 2, 1.0 - alpha / 2])
    return float(lo), float(hi)


def task_draws(scores, groups: Optional[Sequence] = None, resamples: int = RESAMPLES,
               seed: int = SEED, task: str = "",
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The bootstrap values of a task's value over its items ([resamples]) on the task's own
    stream (``rng`` overrides the one :func:`task_rng` gives ``seed`` and ``task``): what its
    interval and a stable score's interval are both made from."""
    scores = _as_scores(scores, task or "scores")
    rng = rng if rng is not None else task_rng(seed, task)
    return resampled_means(scores, groups, resamples, rng)[0]


def bootstrap_ci(scores, groups: Optional[Sequence] = None, resamples: int = RESAMPLES,
                 seed: int = SEED, level: float = LEVEL, task: str = "",
                 rng: Optional[np.random.Generator] = None) -> tuple[float, float]:
    """Percentile bootstrap interval of a task's value over its items (``rng`` overrides the
    stream :func:`task_rng` gives ``seed`` and ``task``)."""
    return percentile_interval(task_draws(scores, groups, resamples, seed, task, rng), level)


@dataclass(frozen=True)
class TaskScores:
    """One task's item scores for a stable score (and its chance level)."""

    scores: Sequence[float]
    chance: float = 0.0
    groups: Optional[Sequence] = None


def stable_score_ci(tasks: Mapping[str, TaskScores], resamples: int = RESAMPLES,
                    seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Interval of a stable score, the mean over ``tasks`` of (value - chance): every task's
    items resampled on their own (:func:`task_rng`), the score recomputed per resample."""
    draws = {name: task_draws(task.scores, task.groups, resamples, seed, name)
             for name, task in tasks.items()}
    return percentile_interval(
        stable_score_draws(draws, {name: task.chance for name, task in tasks.items()}), level)


def stable_score_draws(draws: Mapping[str, np.ndarray],
                       chance: Mapping[str, float]) -> np.ndarray:
    """A stable score's bootstrap values from its tasks' :func:`task_draws`: per resample, the
    mean over the tasks of (value - chance)."""
    if not draws:
        raise ValueError("a stable score needs at least one task")
    total = np.zeros(len(next(iter(draws.values()))))
    for name, values in draws.items():
        total += values
        total -= chance.get(name, 0.0)
    return total / len(draws)


def _shifted_p_value(differences: np.ndarray, observed: float) -> float:
    """Two-sided bootstrap p-value of "difference 0": the resampled differences shifted to the
    null, counted as extreme as the observed one (add-one, so never 0)."""
    # Differences of means of the same items carry rounding of a few ulps; without the slack
    # an exact 0 observed difference could count resamples as "more extreme" by 1e-17.
    slack = 1e-12
    extreme = np.abs(differences - observed) >= abs(observed) - slack
    return float((1 + np.count_nonzero(extreme)) / (1 + differences.size))


def _paired_draws(a, b, groups, resamples: int, rng) -> tuple[np.ndarray, float, float]:
    a, b = _as_scores(a, "arm A"), _as_scores(b, "arm B")
    if a.shape != b.shape:
        raise ValueError(f"paired arms must score the same items: {a.size} vs {b.size} scores")
    means = resampled_means(np.stack([a, b]), groups, resamples, rng)
    return means[1] - means[0], grouped_mean(a, groups), grouped_mean(b, groups)


def paired_bootstrap(a, b, groups: Optional[Sequence] = None, resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = LEVEL, task: str = "",
                     rng: Optional[np.random.Generator] = None) -> Paired:
    """B - A on the same items (aligned), with its paired bootstrap interval and p-value."""
    rng = rng if rng is not None else task_rng(seed, task)
    draws, value_a, value_b = _paired_draws(a, b, groups, resamples, rng)
    observed = value_b - value_a
    return Paired(value_a, value_b, observed, percentile_interval(draws, level),
                  _shifted_p_value(draws, observed), "paired bootstrap")


@dataclass(frozen=True)
class PairedTask:
    """One task's aligned item scores in arms A and B, for a paired stable score."""

    a: Sequence[float]
    b: Sequence[float]
    chance: float = 0.0
    groups: Optional[Sequence] = None


def paired_stable_score(tasks: Mapping[str, PairedTask], resamples: int = RESAMPLES,
                        seed: int = SEED, level: float = LEVEL) -> Paired:
    """B - A of a stable score over ``tasks`` (both arms on the same items of each task): each
    task resampled on its own stream, one index set for both arms."""
    if not tasks:
        raise ValueError("a stable score needs at least one task")
    draws = np.zeros(resamples)
    score_a = score_b = 0.0
    for name, task in tasks.items():
        d, value_a, value_b = _paired_draws(task.a, task.b, task.groups, resamples,
                                            task_rng(seed, name))
        draws += d
        score_a += value_a - task.chance
        score_b += value_b - task.chance
    draws /= len(tasks)
    score_a, score_b = score_a / len(tasks), score_b / len(tasks)
    observed = score_b - score_a
    return Paired(score_a, score_b, observed, percentile_interval(draws, level),
                  _shifted_p_value(draws, observed), "paired bootstrap")


def is_binary(scores) -> bool:
    """Whether every score is 0 or 1 (right/wrong items)."""
    scores = np.asarray(scores, dtype=np.float64)
    return bool(np.all((scores == 0.0) | (scores == 1.0)))


def mcnemar_exact(a, b) -> float:
    """McNemar's exact two-sided p-value for right/wrong items of two arms (aligned): the
    discordant pairs (right in one arm only) split 50/50 under the null. 1 without any."""
    from scipy.stats import binomtest

    a, b = _as_scores(a, "arm A"), _as_scores(b, "arm B")
    if a.shape != b.shape or not (is_binary(a) and is_binary(b)):
        raise ValueError("McNemar's test needs 0/1 scores of the same items in both arms")
    only_a = int(np.count_nonzero((a == 1) & (b == 0)))
    only_b = int(np.count_nonzero((a == 0) & (b == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_b, only_a + only_b, 0.5, alternative="two-sided").pvalue)


def holm(p_values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm-adjusted p-values, in the given order (None stays None and is not counted): the
    i-th smallest of m is multiplied by m - i + 1 (i from 1), made non-decreasing, capped at 1."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    adjusted: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
