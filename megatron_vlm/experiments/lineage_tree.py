"""The lineage tree of a run or sweep directory: runs, the checkpoints they branch from, and
the evaluations of their checkpoints, read from what is on disk.

:func:`scan` finds every checkpoint (``*/checkpoints/step_NNNNNNN/common.json``) and every
evaluation (``results.json`` naming the checkpoint it scored) under a directory. Checkpoints
are grouped into runs by their run directory; a run hangs under the checkpoint its lineage
names as parent (matched by the sha256 of that checkpoint's common.json, so a moved directory
still matches), and an evaluation under the checkpoint whose fingerprint it recorded. A run
whose parent is not under the directory (or was pruned) is a root that names its parent; an
evaluation of a checkpoint that is not there is listed apart. :func:`tree_text` writes the
tree as text, each run with its steps and real tokens per source, each evaluation with its
stable scores.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

STABLE_KINDS = ("vision", "text")


@dataclass
class Evaluation:
    """One results.json."""

    path: Path
    """The results.json file."""
    step: Optional[int]
    """The step of the checkpoint it scored."""
    fingerprint: str
    """The scored checkpoint's fingerprint as results.json records it (a sha256 prefix)."""
    checkpoint: Optional[str]
    """The scored checkpoint's path as results.json records it."""
    scores: dict[str, Optional[float]]
    """The vision and text stable scores (None where the suite had no such task)."""


@dataclass
class Checkpoint:
    """One checkpoint, with what hangs under it."""

    path: Path
    """The checkpoint directory."""
    step: int
    """Its training step."""
    fraction: Optional[float]
    """Its fraction of the run's schedule."""
    sha256: str
    """The sha256 of its common.json (what a child's lineage names it by)."""
    lineage: Optional[dict]
    """Its lineage record (None when written before lineage was kept)."""
    evaluations: list[Evaluation] = field(default_factory=list)
    """The evaluations of this checkpoint."""
    branches: list["Run"] = field(default_factory=list)
    """The runs that started from this checkpoint."""


@dataclass
class Run:
    """One run directory and its checkpoints."""

    directory: Path
    """The run's output directory."""
    checkpoints: list[Checkpoint]
    """Its checkpoints, by step."""

    @property
    def newest(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def lineage(self) -> Optional[dict]:
        return self.newest.lineage

    @property
    def stage(self) -> str:
        return (self.lineage or {}).get("stage") or "unknown stage"

    @property
    def name(self) -> Optional[str]:
        return ((self.lineage or {}).get("run") or {}).get("name")

    @property
    def parent(self) -> Optional[dict]:
        """The lineage's parent entry (path, fingerprint, step, fraction), None from scratch."""
        return (self.lineage or {}).get("parent")

    @property
    def real_tokens(self) -> dict[str, int]:
        """Real tokens per source of this run alone, at its newest checkpoint, in the config's
        source order (common.json stores them sorted by name)."""
        from megatron_vlm.config import DATA_SOURCES

        sources = (((self.lineage or {}).get("ledger") or {}).get("sources") or {})
        order = sorted(sources, key=lambda n: (DATA_SOURCES.index(n) if n in DATA_SOURCES
                                               else len(DATA_SOURCES), n))
        return {name: sources[name].get("real_tokens", 0) for name in order}


@dataclass
class LineageTree:
    """Everything :func:`scan` found under ``root``."""

    root: Path
    """The directory scanned."""
    runs: list[Run]
    """Every run, by directory."""
    roots: list[Run]
    """Runs whose parent is not under ``root`` (or that have none)."""
    unmatched: list[Evaluation]
    """Evaluations of checkpoints that are not under ``root``."""

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root)) or "."
        except ValueError:
            return str(path)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds {type(value).__name__}, not a JSON object")
    return value


def _checkpoint_files(root: Path) -> Iterator[Path]:
    from megatron_vlm.training.checkpoint_names import COMMON, STEP_DIR

    for path in sorted(root.rglob(COMMON)):
        if STEP_DIR.match(path.parent.name) and path.parent.parent.name == "checkpoints":
            yield path


def _checkpoint(path: Path) -> Checkpoint:
    from megatron_vlm.fsutil import sha256_file
    from megatron_vlm.training.lineage import check_lineage

    common = _read_json(path)
    lineage = common.get("lineage")
    if lineage is not None:
        check_lineage(lineage, str(path))
    step = common.get("step")
    if not isinstance(step, int):
        raise ValueError(f"{path}: step {step!r} is not a step number")
    return Checkpoint(path.parent, step, common.get("fraction"), sha256_file(path), lineage)


def _evaluation(path: Path) -> Optional[Evaluation]:
    """The evaluation in ``path``; None for a results.json of another kind (no checkpoint)."""
    from megatron_vlm.training.lineage import check_lineage

    results = _read_json(path)
    checkpoint = results.get("checkpoint")
    if not isinstance(checkpoint, dict) or "tasks" not in results:
        return None
    if results.get("lineage") is not None:
        check_lineage(results["lineage"], str(path))
    stable = results.get("stable_score") or {}
    scores = {kind: (stable.get(kind) or {}).get("score") for kind in STABLE_KINDS}
    return Evaluation(path, checkpoint.get("step"), str(checkpoint.get("fingerprint") or ""),
                      checkpoint.get("path"), scores)


def scan(root: str | Path) -> LineageTree:
    """The tree under ``root``. FileNotFoundError when ``root`` does not exist, ValueError
    naming the file when a common.json or results.json is corrupt or holds a malformed
    lineage, and when nothing is found at all."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    by_run: dict[Path, list[Checkpoint]] = {}
    for path in _checkpoint_files(root):
        checkpoint = _checkpoint(path)
        by_run.setdefault(checkpoint.path.parent.parent, []).append(checkpoint)
    runs = [Run(d, sorted(cs, key=lambda c: c.step)) for d, cs in sorted(by_run.items())]
    evaluations = [e for p in sorted(root.rglob("results.json")) if (e := _evaluation(p))]
    if not runs and not evaluations:
        raise ValueError(f"{root}: no checkpoints (RUN/checkpoints/step_NNNNNNN/common.json) and "
                         "no evaluations (results.json) under it: not a run or sweep directory")
    checkpoints = [c for run in runs for c in run.checkpoints]
    roots = []
    for run in runs:
        sha = (run.parent or {}).get("fingerprint")
        parent = _pick([c for c in checkpoints if c.sha256 == sha], (run.parent or {}).get("path"),
                       run.directory)
        if parent is None:
            roots.append(run)
        else:
            parent.branches.append(run)
    unmatched = []
    for evaluation in evaluations:
        # results.json keeps a prefix of the checkpoint's sha256.
        scored = _pick([c for c in checkpoints if evaluation.fingerprint
                        and c.sha256.startswith(evaluation.fingerprint)],
                       evaluation.checkpoint, evaluation.path)
        (scored.evaluations if scored else unmatched).append(evaluation)
    return LineageTree(root, runs, roots, unmatched)


def _pick(same: list[Checkpoint], recorded: Optional[str], near: Path) -> Optional[Checkpoint]:
    """Of checkpoints with one fingerprint (several when a directory was copied): the one at
    the path recorded, else the one whose run directory holds ``near``, else the first."""
    for checkpoint in same:
        if recorded and os.path.abspath(recorded) == os.path.abspath(checkpoint.path):
            return checkpoint
    near = Path(os.path.abspath(near))
    for checkpoint in same:
        if near.is_relative_to(os.path.abspath(checkpoint.path.parent.parent)):  # its run's
            return checkpoint
    return same[0] if same else None


def percent_text(fraction: Optional[float]) -> str:
    return "" if fraction is None else f" ({100 * fraction:.0f}%)"


def _tokens(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counts.items()) or "none counted"


def score_text(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_label(tree: LineageTree, run: Run) -> str:
    """One line about a run: stage, directory, name, steps, checkpoints, real tokens."""
    steps = ", ".join(str(c.step) for c in run.checkpoints)
    name = f" [{run.name}]" if run.name else ""
    return (f"{run.stage} run {tree.relative(run.directory)}{name}: checkpoints at steps "
            f"{steps}; real tokens {_tokens(run.real_tokens)}")


def evaluation_label(tree: LineageTree, evaluation: Evaluation) -> str:
    """One line about an evaluation: the step it scored and its stable scores."""
    return (f"eval of step {evaluation.step}: vision {score_text(evaluation.scores['vision'])}, "
            f"text {score_text(evaluation.scores['text'])} ({tree.relative(evaluation.path)})")


def parent_label(tree: LineageTree, run: Run) -> str:
    """Where a root run started: from scratch, or a parent checkpoint not under the root."""
    parent = run.parent
    if parent is None:
        return "from scratch" if run.lineage is not None else "parent unknown (no lineage)"
    return (f"from {tree.relative(Path(parent['path']))}, step {parent.get('step')}"
            f"{percent_text(parent.get('fraction'))} (not under {tree.root})")


def children(run: Run) -> list[tuple[Checkpoint, object]]:
    """What hangs under a run, by step: (checkpoint, an Evaluation or a branching Run)."""
    items: list[tuple[Checkpoint, object]] = []
    for checkpoint in run.checkpoints:
        items += [(checkpoint, e) for e in checkpoint.evaluations]
        items += [(checkpoint, r) for r in checkpoint.branches]
    return items


def tree_text(tree: LineageTree) -> str:
    """The tree as indented text, one line per run and per evaluation."""
    checkpoints = sum(len(r.checkpoints) for r in tree.runs)
    evaluations = sum(len(c.evaluations) for r in tree.runs for c in r.checkpoints)
    lines = [f"{tree.root}: {len(tree.runs)} runs, {checkpoints} checkpoints, "
             f"{evaluations + len(tree.unmatched)} evaluations"]

    def walk(run: Run, prefix: str) -> None:
        items = children(run)
        for i, (checkpoint, item) in enumerate(items):
            last = i == len(items) - 1
            branch, deeper = ("└─ ", "   ") if last else ("├─ ", "│  ")
            if isinstance(item, Run):
                lines.append(f"{prefix}{branch}step {checkpoint.step}"
                             f"{percent_text(checkpoint.fraction)} -> {run_label(tree, item)}")
                walk(item, prefix + deeper)
            else:
                lines.append(f"{prefix}{branch}{evaluation_label(tree, item)}")

    for run in tree.roots:
        lines.append(f"{run_label(tree, run)}; {parent_label(tree, run)}")
        walk(run, "")
    if tree.unmatched:
        lines.append(f"evaluations of checkpoints not under {tree.root}:")
        lines += [f"  {evaluation_label(tree, e)}" for e in tree.unmatched]
    return "\n".join(lines)
