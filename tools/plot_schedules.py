"""Draw learning-rate schedules to a PNG: a text run and the runs branched from its checkpoints.

Each ``--schedule`` is ``NAME:MODE:key=value,key=value,...``; MODE and its keys:

    warmup_cosine    total, warmup, peak, final [, decay]      text run / from scratch
    rewarmup         total, warmup, peak, final [, decay, parent]
    warmup_fraction  total, warmup_fraction, peak, final [, decay]    fine-tuning (0.05)
    continue         parent, total                              keep the parent's schedule

``parent`` is ``OTHER@STEP`` or ``OTHER@PCT%`` (a checkpoint of the schedule named OTHER), ``decay``
one of cosine | linear | constant, and every mode also takes ``tokens_per_step``. Counts accept
``5000``, ``5e3`` or ``5k``. A branched schedule is drawn from its parent's step, as in the
paper's Figure 3, with a dot at the branch point.

Text run (warmup 500, peak 1e-2, final 1e-5) with continued branches from its 20/40/60/80%
checkpoints and re-warmed branches from its 0% and 100% checkpoints:

    python tools/plot_schedules.py --output schedules.png \\
        --schedule text:warmup_cosine:total=5000,warmup=500,peak=1e-2,final=1e-5 \\
        --schedule cont20:continue:parent=text@20%,total=1000 \\
        --schedule cont40:continue:parent=text@40%,total=1000 \\
        --schedule cont60:continue:parent=text@60%,total=1000 \\
        --schedule cont80:continue:parent=text@4000,total=1000 \\
        --schedule rewarm0:rewarmup:parent=text@0,total=1000,warmup=100,peak=3e-3,final=1e-5 \\
        --schedule rewarm100:rewarmup:parent=text@100%,total=1000,warmup=100,peak=3e-3,final=1e-5

From training configs (what pretrain_vlm.py / finetune_vlm.py would run), a run started from
another's checkpoint drawn as its branch:

    python tools/plot_schedules.py --output examples.png \\
        --config examples/1b/text.yaml examples/1b/image_text.yaml examples/1b/finetune.yaml

From schedule metadata saved with checkpoints (a JSON file holding ScheduleMetadata.to_dict(),
bare or under a "schedule" key); their parents are drawn too, dashed:

    python tools/plot_schedules.py --output runs.png \\
        --from-metadata cont80=runs/cont80/schedule.json runs/ft/schedule.json

``--tokens-per-step N`` (or per schedule ``tokens_per_step=N``; ``--x-axis tokens`` uses the
metadata's own) puts tokens on the x axis instead of steps; ``--log-y`` uses a log LR axis.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_vlm.cli import is_user_error
from megatron_vlm.training.schedule import DECAY_STYLES, LRSchedule, ScheduleMetadata

PROG = "plot-schedules"
_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_MODE_KEYS = {
    "warmup_cosine": ({"total", "warmup", "peak", "final"}, {"decay", "tokens_per_step"}),
    "rewarmup": ({"total", "warmup", "peak", "final"}, {"decay", "tokens_per_step", "parent"}),
    "warmup_fraction": ({"total", "warmup_fraction", "peak", "final"},
                        {"decay", "tokens_per_step"}),
    "continue": ({"parent", "total"}, {"tokens_per_step"}),
}
_NAME = re.compile(r"^[A-Za-z0-9_.\-+%]+$")


@dataclass
class Curve:
    """One schedule to draw: offset is where its step 0 sits on the parent's axis."""

    name: str
    schedule: LRSchedule
    offset_steps: int = 0
    offset_tokens: Optional[int] = None
    tokens_per_step: Optional[int] = None
    marker_steps: List[int] = field(default_factory=list)  # checkpoint positions to mark
    dashed: bool = False
    branch: bool = False
    children: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- parsing

def _count(text: str, key: str, spec: str) -> int:
    raw = text.strip()
    mult = 1
    if raw and raw[-1].lower() in _SUFFIXES:
        mult, raw = _SUFFIXES[raw[-1].lower()], raw[:-1]
    try:
        value = float(raw) * mult
    except ValueError:
        raise ValueError(f"schedule spec {spec!r}: {key}={text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"schedule spec {spec!r}: {key}={text!r} is not a whole number")
    return int(value)


def _number(text: str, key: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"schedule spec {spec!r}: {key}={text!r} is not a number") from None


def parse_spec(spec: str) -> dict:
    """``NAME:MODE:k=v,...`` -> {"name", "mode", "keys": {k: raw v}} (checks the key set)."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise ValueError(f"schedule spec {spec!r} is not NAME:MODE:key=value,key=value,...")
    name, mode, body = parts
    if not _NAME.match(name):
        raise ValueError(f"schedule spec {spec!r}: name {name!r} may only use letters, digits "
                         "and _ . - + %")
    if mode not in _MODE_KEYS:
        raise ValueError(f"schedule spec {spec!r}: unknown mode {mode!r} (one of "
                         f"{', '.join(_MODE_KEYS)})")
    keys: Dict[str, str] = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in item:
            raise ValueError(f"schedule spec {spec!r}: {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key in keys:
            raise ValueError(f"schedule spec {spec!r}: key {key!r} given twice")
        keys[key] = value
    required, optional = _MODE_KEYS[mode]
    missing = sorted(required - set(keys))
    if missing:
        raise ValueError(f"schedule spec {spec!r}: mode {mode} needs {', '.join(missing)}")
    unknown = sorted(set(keys) - required - optional)
    if unknown:
        raise ValueError(f"schedule spec {spec!r}: unknown key(s) {', '.join(unknown)} for mode "
                         f"{mode} (takes {', '.join(sorted(required | optional))})")
    return {"name": name, "mode": mode, "keys": keys, "spec": spec}


def _parent_step(ref: str, parent: LRSchedule, spec: str) -> int:
    _, _, where = ref.partition("@")
    if where.endswith("%"):
        pct = _number(where[:-1], "parent", spec)
        if not 0.0 <= pct <= 100.0:
            raise ValueError(f"schedule spec {spec!r}: parent={ref!r} is outside 0-100%")
        return math.floor(pct / 100.0 * parent.total_steps + 0.5)
    step = _count(where, "parent", spec)
    if not 0 <= step <= parent.total_steps:
        raise ValueError(f"schedule spec {spec!r}: parent={ref!r} is outside the parent's "
                         f"0..{parent.total_steps} steps")
    return step


def build_from_specs(specs: Sequence[str]) -> Dict[str, Curve]:
    """Curves for the ``--schedule`` specs, parents resolved by name (in any order)."""
    parsed = [parse_spec(s) for s in specs]
    by_name: Dict[str, dict] = {}
    for p in parsed:
        if p["name"] in by_name:
            raise ValueError(f"schedule spec {p['spec']!r}: name {p['name']!r} is used twice")
        by_name[p["name"]] = p
    curves: Dict[str, Curve] = {}

    def build(name: str, chain: tuple) -> Curve:
        if name in curves:
            return curves[name]
        p = by_name[name]
        spec, keys, mode = p["spec"], p["keys"], p["mode"]
        try:
            return _build_one(name, spec, keys, mode, chain)
        except ValueError as err:
            if str(err).startswith("schedule spec"):
                raise
            raise ValueError(f"schedule spec {spec!r}: {err}") from None

    def _build_one(name, spec, keys, mode, chain) -> Curve:
        tps = _count(keys["tokens_per_step"], "tokens_per_step", spec) \
            if "tokens_per_step" in keys else None
        parent_curve, parent_meta = None, None
        if "parent" in keys:
            ref = keys["parent"]
            pname = ref.partition("@")[0]
            if "@" not in ref or pname not in by_name:
                raise ValueError(f"schedule spec {spec!r}: parent={ref!r} must be OTHER@STEP or "
                                 f"OTHER@PCT% naming another --schedule")
            if pname in chain:
                raise ValueError(f"schedule spec {spec!r}: parent chain loops through {pname!r}")
            parent_curve = build(pname, chain + (name,))
            pstep = _parent_step(ref, parent_curve.schedule, spec)
            parent_meta = parent_curve.schedule.metadata(pstep)
            parent_curve.children.append(name)
        decay = keys.get("decay", "cosine")
        if decay not in DECAY_STYLES:
            raise ValueError(f"schedule spec {spec!r}: decay={decay!r} is not one of "
                             f"{', '.join(DECAY_STYLES)}")
        total = _count(keys["total"], "total", spec)
        if mode == "continue":
            sched = LRSchedule.continue_from(parent_meta, total, tokens_per_step=tps)
        elif mode == "warmup_fraction":
            sched = LRSchedule.warmup_cosine_fraction(
                total, _number(keys["warmup_fraction"], "warmup_fraction", spec),
                _number(keys["peak"], "peak", spec), _number(keys["final"], "final", spec),
                decay, tokens_per_step=tps)
        else:
            args = (total, _count(keys["warmup"], "warmup", spec),
                    _number(keys["peak"], "peak", spec), _number(keys["final"], "final", spec),
                    decay)
            sched = (LRSchedule.rewarmup(*args, tokens_per_step=tps, parent=parent_meta)
                     if mode == "rewarmup" else LRSchedule.warmup_cosine(*args, tokens_per_step=tps))
        curve = Curve(name=name, schedule=sched, tokens_per_step=tps)
        if parent_curve is not None:
            _place_after(curve, parent_curve, parent_meta.step)
        curves[name] = curve
        return curve

    for p in parsed:
        build(p["name"], ())
    return {p["name"]: curves[p["name"]] for p in parsed}


def _place_after(curve: Curve, parent: Curve, parent_step: int) -> None:
    curve.branch = True
    curve.offset_steps = parent.offset_steps + parent_step
    if parent.offset_tokens is not None and parent.tokens_per_step is not None:
        curve.offset_tokens = parent.offset_tokens + parent_step * parent.tokens_per_step


def _shape_key(meta: ScheduleMetadata) -> str:
    d = meta.to_dict()
    d.pop("step"), d.pop("tokens_seen")
    return json.dumps(d, sort_keys=True)


def load_metadata_file(path: Path) -> ScheduleMetadata:
    if not path.is_file():
        raise FileNotFoundError(f"--from-metadata: no file {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--from-metadata {path}: not JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("schedule"), dict):
        data = data["schedule"]
    try:
        return ScheduleMetadata.from_dict(data)
    except ValueError as err:
        raise ValueError(f"--from-metadata {path}: {err}") from None


def build_from_metadata(items: Sequence[str], curves: Dict[str, Curve]) -> None:
    """Adds curves for ``[NAME=]PATH`` metadata files (and their ancestors) to ``curves``."""
    drawn: Dict[str, Curve] = {}

    def add(meta: ScheduleMetadata, name: str, own: bool) -> Curve:
        key = _shape_key(meta)
        if key in drawn:
            curve = drawn[key]
            if own:  # an explicit file of an already drawn schedule: mark this checkpoint too
                if curve.dashed:
                    curve.dashed = False
                curve.marker_steps.append(meta.step)
            return curve
        parent_curve = None
        if meta.parent is not None:
            parent_curve = add(meta.parent, f"{name} parent", False)
        unique, n = name, 2
        while unique in curves:
            unique, n = f"{name} #{n}", n + 1
        curve = Curve(name=unique, schedule=LRSchedule.from_metadata(meta),
                      tokens_per_step=meta.tokens_per_step, dashed=not own,
                      marker_steps=[meta.step] if own else [])
        if parent_curve is not None:
            _place_after(curve, parent_curve, meta.parent.step)
            parent_curve.children.append(unique)
        curves[unique] = curve
        drawn[key] = curve
        return curve

    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, Path(item).parent.name or Path(item).stem
        add(load_metadata_file(Path(path)), name, True)


_STEP_DIR = re.compile(r"step_(\d+)")


def build_from_configs(items: Sequence[str], curves: Dict[str, Curve]) -> None:
    """Adds a curve per ``[NAME=]CONFIG`` (a YAML file or recipe name), with the schedule the
    training loop would build from it. A config starting from ``checkpoint.load`` branches off
    the run that wrote that checkpoint: the checkpoint's own metadata when it exists, else
    another of the given configs whose ``output_dir`` holds it (``.../step_NNNNNNN``)."""
    from megatron_vlm.config import load_config
    from megatron_vlm.training.checkpointing import read_common
    from megatron_vlm.training.loop import build_schedule

    configs = []
    for item in items:
        name, sep, ref = item.partition("=")
        if not sep:
            name, ref = "", item
        cfg = load_config(ref)
        configs.append((name or cfg.name, ref, cfg))
    by_dir = {str(Path(cfg.output_dir)): name for name, _, cfg in configs}
    built: Dict[str, Curve] = {}

    def build(name: str, ref: str, cfg, chain: tuple) -> Curve:
        if name in built:
            return built[name]
        if name in chain:
            raise ValueError(f"--config {ref}: checkpoint.load chain loops through {name!r}")
        parent_curve, parent_common, parent_step = None, None, None
        load = cfg.checkpoint.load
        if load:
            run_dir = next((d for d in by_dir if str(Path(load)).startswith(d + "/")), None)
            step = _STEP_DIR.search(str(load))
            if Path(load).exists():  # a checkpoint on disk knows its own schedule
                parent_common = read_common(load)
                parent_step = parent_common.get("schedule", {}).get("step")
            if run_dir is not None and (step is not None or parent_step is not None):
                pname = by_dir[run_dir]
                pref, pcfg = next((r, c) for n, r, c in configs if n == pname)
                parent_curve = build(pname, pref, pcfg, chain + (name,))
                if parent_step is None:
                    parent_step = int(step.group(1))
                    parent_common = {"schedule":
                                     parent_curve.schedule.metadata(parent_step).to_dict()}
            elif parent_common is None and cfg.schedule.mode == "continue":
                raise ValueError(f"--config {ref}: checkpoint.load={load} does not exist and no "
                                 "given --config has that output_dir: cannot know what to continue")
        schedule = build_schedule(cfg, parent_common)
        curve = Curve(name=name, schedule=schedule, tokens_per_step=schedule.tokens_per_step)
        if parent_curve is not None:
            _place_after(curve, parent_curve, parent_step)
            parent_curve.children.append(name)
            parent_curve.marker_steps.append(parent_step)
        built[name] = curve
        curves[name] = curve
        return curve

    for name, ref, cfg in configs:
        build(name, ref, cfg, ())


# ----------------------------------------------------------------------------- drawing

def _sample_steps(sched: LRSchedule, points: int = 1200) -> List[float]:
    total = sched.total_steps
    n = min(total, points)
    xs = {total * i / n for i in range(n + 1)}
    xs.update({0.0, float(sched.warmup_steps), float(total)})
    if sched.warmup_steps:  # the corner at the end of the warmup
        xs.add(max(0.0, sched.warmup_steps - 1e-9 * total))
    return sorted(xs)


def plot(curves: Dict[str, Curve], output: Path, tokens_axis: bool,
         global_tps: Optional[int], log_y: bool, title: Optional[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Token offsets need every schedule's tokens per step (own, else the global one).
    if tokens_axis:
        for c in curves.values():
            if c.tokens_per_step is None:
                c.tokens_per_step = global_tps
            if c.tokens_per_step is None:
                raise ValueError(f"schedule {c.name!r} has no tokens_per_step: give "
                                 "--tokens-per-step or tokens_per_step=N in its spec")
        for c in curves.values():  # roots first: offsets flow from parents to children
            if not c.branch:
                c.offset_tokens = 0
        for _ in range(len(curves)):
            for c in curves.values():
                for child in c.children:
                    if c.offset_tokens is not None:
                        ch = curves[child]
                        ch.offset_tokens = c.offset_tokens + (
                            ch.offset_steps - c.offset_steps) * c.tokens_per_step
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ci = 0
    for c in curves.values():
        steps = _sample_steps(c.schedule)
        lrs = [c.schedule.lr(s) for s in steps]
        if tokens_axis:
            xs = [c.offset_tokens + s * c.tokens_per_step for s in steps]
        else:
            xs = [c.offset_steps + s for s in steps]
        if not c.branch and c.children:  # a run others branch from: black (dashed: grey)
            color = "black" if not c.dashed else "0.45"
        else:
            color, ci = colors[ci % len(colors)], ci + 1
        if log_y:
            pairs = [(x, y) for x, y in zip(xs, lrs) if y > 0]
            xs, lrs = [p[0] for p in pairs], [p[1] for p in pairs]
        label = f"{c.name} ({c.schedule.mode})"
        ax.plot(xs, lrs, color=color, lw=1.0 if c.dashed else 1.8,
                ls="--" if c.dashed else "-", label=label, zorder=3 if c.branch else 2)
        if c.branch:
            ax.plot([xs[0]], [c.schedule.lr(0)], "o", color=color, ms=5, zorder=4)
        for m in c.marker_steps:
            m = min(m, c.schedule.total_steps)
            mx = (c.offset_tokens + m * c.tokens_per_step) if tokens_axis else c.offset_steps + m
            ax.plot([mx], [c.schedule.lr(m)], "s", color=color, ms=6, zorder=5)
    ax.set_xlabel("tokens" if tokens_axis else "optimizer step")
    ax.set_ylabel("learning rate")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or "Learning-rate schedules")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", action="append", default=[], metavar="NAME:MODE:K=V,...",
                        help="a schedule to draw (repeatable)")
    parser.add_argument("--config", nargs="+", default=[], metavar="[NAME=]YAML",
                        help="training configs (YAML files or recipe names) to draw the "
                             "schedules of, branched from each other by checkpoint.load")
    parser.add_argument("--from-metadata", nargs="+", default=[], metavar="[NAME=]JSON",
                        help="schedule metadata JSON files to draw (name defaults to the file's "
                             "directory)")
    parser.add_argument("--output", required=True, metavar="PNG", help="image to write")
    parser.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                        help="tokens per optimizer step; puts tokens on the x axis")
    parser.add_argument("--x-axis", choices=("steps", "tokens"), default=None,
                        help="x axis (default: tokens if --tokens-per-step is given, else steps)")
    parser.add_argument("--log-y", action="store_true", help="logarithmic LR axis")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    if not args.schedule and not args.from_metadata and not args.config:
        parser.error("give at least one --config, --schedule or --from-metadata")
    if args.tokens_per_step is not None and args.tokens_per_step <= 0:
        raise ValueError(f"--tokens-per-step must be positive, got {args.tokens_per_step}")
    curves = build_from_specs(args.schedule)
    build_from_configs(args.config, curves)
    build_from_metadata(args.from_metadata, curves)
    tokens_axis = args.x_axis == "tokens" or (args.x_axis is None
                                              and args.tokens_per_step is not None)
    output = Path(args.output)
    plot(curves, output, tokens_axis, args.tokens_per_step, args.log_y, args.title)
    print(f"{PROG}: wrote {output} ({len(curves)} schedules)")
    for c in curves.values():
        print(f"  {c.name}: {c.schedule.describe()}")
    return 0


def _entry() -> None:
    # Like megatron_vlm.cli.run_main (one ``prog: error: ...`` line, status 2) but without its
    # process-group teardown, so a bad spec never imports torch or megatron.
    try:
        status = main()
    except (ValueError, FileNotFoundError) as err:
        if not is_user_error(err):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


if __name__ == "__main__":
    _entry()
