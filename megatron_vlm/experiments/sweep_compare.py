"""Every evaluated arm of a sweep against one baseline arm (``tools/sweep.py SWEEP.yaml
--compare RUN``): a paired comparison per grid point (:mod:`megatron_vlm.evaluation.compare`),
Holm-adjusted over all their rows together, written beside the sweep's results table as
``OUTPUT_ROOT/comparison.md``, ``comparison.json`` and ``comparison.png``."""

from __future__ import annotations

from pathlib import Path

from megatron_vlm.experiments.plan import GridPoint, Plan


def baseline_point(plan: Plan, name: str) -> GridPoint:
    """The grid point named ``name`` (its run name, the ``run`` column of results.csv)."""
    for point in plan.points:
        if point.name == name:
            return point
    raise ValueError(f"--compare {name!r}: not a grid point of sweep {plan.spec.name} (its grid "
                     f"points: {', '.join(p.name for p in plan.points)})")


def _evaluation_dir(plan: Plan, point: GridPoint):
    path = point.results_path(plan)
    return path.parent if path is not None and path.is_file() else None


def compare_sweep(plan: Plan, baseline: str, resamples: int, seed: int) -> tuple[list[Path],
                                                                                 list[str]]:
    """Writes the comparison of every evaluated grid point with ``baseline``; returns (the
    files written, the grid points left out for want of an evaluation)."""
    from megatron_vlm.evaluation.compare import apply_holm, compare, load_arm, write_comparison

    base = baseline_point(plan, baseline)
    base_dir = _evaluation_dir(plan, base)
    if base_dir is None:
        raise ValueError(f"--compare {baseline}: grid point {baseline} has no evaluation yet "
                         f"({base.results_path(plan)}); run the sweep first")
    a = load_arm(base_dir, label=base.name)
    comparisons, skipped = [], []
    for point in plan.points:
        if point is base:
            continue
        directory = _evaluation_dir(plan, point)
        if directory is None:
            skipped.append(point.name)
            continue
        comparisons.append(compare(a, load_arm(directory, label=point.name),
                                   resamples=resamples, seed=seed))
    if not comparisons:
        raise ValueError(f"--compare {baseline}: no other grid point of sweep {plan.spec.name} "
                         "is evaluated yet")
    apply_holm(comparisons)  # one family: every row of every arm
    files = write_comparison(comparisons, plan.spec.output_root,
                             f"sweep {plan.spec.name}: every arm against {base.name}",
                             several=True)
    return files, skipped
