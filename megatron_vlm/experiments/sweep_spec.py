"""The sweep file: which stage configs a sweep of the paper's experiments uses, and its grid.

A sweep file (YAML; every field in docs/experiments.md) names a base config per training
stage, how to evaluate, and a grid over the paper's axes::

    name: fig4_checkpoint_pct_1b
    scale: 1b
    output_root: runs/sweeps/fig4_checkpoint_pct_1b
    stages:
      text: {config: ../1b/text.yaml}
      image_text: {config: ../1b/image_text.yaml, rewarmup_config: ../1b/image_text_rewarmup.yaml}
      finetune: {config: ../1b/finetune.yaml, steps_per_epoch: 2598}
      evaluate: {suite: paper}
    grid:
      text_checkpoint: [20, 40, 60, 80, 100]

:func:`load_sweep` reads and checks it and returns a :class:`SweepSpec`. Config paths are
relative to the sweep file (as ``base:`` in a stage config) and may hold ``{scale}``; every
other path (``output_root``, ``data.creates``, paths inside the stage configs) is relative to
the working directory the sweep runs in (the repository root, as for examples/*/run.sh). Every
problem is one ``ValueError`` naming the file and the field. What each axis does to the stage
configs is in :mod:`megatron_vlm.experiments.plan`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from megatron_vlm.config import PROJECTOR_TYPES

TRAINING_STAGES = ("text", "image_text", "finetune")
"""The training stages of the recipe, in dependency order."""
STAGES = (*TRAINING_STAGES, "evaluate")
ENCODER_CHOICES = ("frozen", "unfrozen")
SCALE_PLACEHOLDER = "{scale}"

DEFAULT_THROUGHPUT: dict[str, float] = {
    # Training tokens per second per GPU, for the GPU-hours estimate of --dry-run only.
    # ESTIMATES, not measurements on this project's stack (no GPU figures exist yet:
    # bench/RESULTS.md). GPU scales: model FLOPs per token from megatron_vlm.training.flops
    # (1b: 9.2e9 at seq 2048, 8.6e9 at 1024) at about 37% MFU of an H100's 989 TFLOP/s bf16
    # peak (Megatron-LM reports 41-48% at scale); 7b about 35% MFU (torchtitan's Llama3.1-8B on
    # 8 x H100: 5,762-8,532 tokens/s/GPU); 79m about 17% (small models keep GPUs less busy).
    # tiny_cpu: one CPU process, the megatron local spec in bench/RESULTS.md (21,258 tokens/s).
    "tiny_cpu": 20_000.0,
    "79m": 400_000.0,
    "1b": 40_000.0,
    "7b": 8_000.0,
}


class SweepError(ValueError):
    """A problem in a sweep file: names the file and the field."""


def _fmt_number(value: Union[int, float]) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


# ---------------------------------------------------------------------------------------------
# Axes


def _number(low: float, high: float, integer: bool = False) -> Callable[[Any], Any]:
    def parse(value: Any) -> Union[int, float]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")
        if integer and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        if integer or (high > 1 and float(value).is_integer()):
            value = int(value)  # 80.0 and 80 name the same run
        elif high <= 1:
            value = float(value)  # shares: 0 and 0.0 name the same run
        if not low <= value <= high:
            raise ValueError(f"{value!r} is outside [{_fmt_number(low)}, {_fmt_number(high)}]")
        return value
    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _scale(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"{value!r} is not a scale name (letters, digits, '_', '.', '-')")
    return value


@dataclass(frozen=True)
class Axis:
    """One of the paper's axes: the first stage it changes (every later stage follows it, every
    earlier one is shared across its values) and how its values are checked and named."""

    name: str
    stage: str
    label: str
    doc: str
    parse: Callable[[Any], Any]
    prefix: str

    def tag(self, value: Any) -> str:
        """The value's part of a run name, e.g. ``ckpt80`` or ``img0.1``."""
        text = _fmt_number(value) if isinstance(value, (int, float)) else str(value)
        return f"{self.prefix}{text}"


AXES: dict[str, Axis] = {axis.name: axis for axis in (
    Axis("scale", "text", "scale",
         "model scale: the {scale} in the stage config paths (e.g. tiny_cpu, 79m, 1b, 7b)",
         _scale, ""),
    Axis("text_checkpoint", "image_text", "text checkpoint (% of text pre-training)",
         "percent of the text run's schedule at which images come in: 0 (no text "
         "pre-training) to 100; 0 and 100 use image_text.rewarmup_config", _number(0, 100), "ckpt"),
    Axis("image_ratio", "image_text", "image tokens (share of pre-training tokens)",
         "share of the image-text stage's tokens that are image data (captions plus any "
         "instruction data), the rest text", _number(0.0, 1.0), "img"),
    Axis("instruction_fraction", "image_text", "instruction data (share of image tokens)",
         "share of the image data that is instruction (LLaVA) data instead of captions, in the "
         "image-text stage", _number(0.0, 1.0), "instr"),
    Axis("encoder", "image_text", "vision encoder",
         "frozen (precomputed embeddings) or unfrozen (model.encoder.mode=online, trained)",
         _choice(ENCODER_CHOICES), "enc"),
    Axis("projector", "image_text", "projector",
         "model.projector.type: mlp2 (2-layer MLP, the paper's default) or linear (1 layer)",
         _choice(PROJECTOR_TYPES), "proj"),
    Axis("finetune_epochs", "finetune", "fine-tuning epochs",
         "instruction fine-tuning epochs (train.train_iters = epochs x steps_per_epoch); 0 "
         "evaluates the image-text run itself", _number(0, 1000, integer=True), "ft"),
)}
"""The axes a grid may use, in the canonical order run names are built in."""


# ---------------------------------------------------------------------------------------------
# The file's sections


@dataclass(frozen=True)
class TrainingStageSpec:
    """A training stage: its base config and what the sweep adds to every run of it."""

    config: str
    overrides: tuple[str, ...] = ()
    rewarmup_config: Optional[str] = None
    """image_text only: the config for text checkpoints 0 and 100 (LR re-warmed)."""
    steps_per_epoch: Optional[int] = None
    """finetune only: steps of one epoch (default: the config's train.train_iters)."""


@dataclass(frozen=True)
class EvaluateSpec:
    """How every grid point's last checkpoint is evaluated (tools/evaluate_vlm.py)."""

    suite: str
    tasks: Optional[tuple[str, ...]] = None
    limit: Optional[int] = None
    overrides: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataSpec:
    """A command that prepares the data before any training stage."""

    command: str
    creates: Optional[str] = None


@dataclass(frozen=True)
class SlurmSpec:
    """Settings of the SLURM job scripts (tools/sweep.py --slurm)."""

    gpus_per_node: int = 8
    nodes: dict = field(default_factory=dict)
    sbatch_args: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()

    def nodes_for(self, stage: str) -> int:
        return int(self.nodes.get(stage, 1))


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep file."""

    path: Path
    name: str
    output_root: Path
    stages: dict[str, TrainingStageSpec]
    grid: dict[str, tuple]
    description: str = ""
    scale: Optional[str] = None
    throughput: Union[None, float, dict] = None
    overrides: tuple[str, ...] = ()
    online_data: tuple[str, ...] = ()
    """key=value overrides for the runs of the unfrozen-encoder arm: the image-shard directories
    its data comes from (data.captions, data.instruction_images), since an online encoder reads
    images, not precomputed embeddings."""
    data: Optional[DataSpec] = None
    evaluate: Optional[EvaluateSpec] = None
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    def config_path(self, template: str, scale: Optional[str]) -> Path:
        """A stage config path: ``{scale}`` filled in, relative to the sweep file."""
        text = template.replace(SCALE_PLACEHOLDER, scale) if scale is not None else template
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.path.parent / path

    def throughput_for(self, scale: Optional[str]) -> tuple[Optional[float], str]:
        """(tokens/s/GPU, where the figure comes from) for runs of ``scale``."""
        given = self.throughput
        if isinstance(given, dict):
            given = given.get(scale)
        if given is not None:
            return float(given), "the sweep file's throughput"
        if scale in DEFAULT_THROUGHPUT:
            return DEFAULT_THROUGHPUT[scale], f"the default estimate for scale {scale}"
        return None, f"no throughput for scale {scale!r}: set 'throughput' in the sweep file"


# ---------------------------------------------------------------------------------------------
# Reading and checking


_TOP = ("name", "description", "scale", "output_root", "throughput", "overrides", "online_data",
        "data", "stages", "grid", "slurm")
_STAGE_FIELDS = {"text": ("config", "overrides"),
                 "image_text": ("config", "rewarmup_config", "overrides"),
                 "finetune": ("config", "steps_per_epoch", "overrides"),
                 "evaluate": ("suite", "tasks", "limit", "overrides", "args")}
_DATA_FIELDS = ("command", "creates")
_SLURM_FIELDS = ("gpus_per_node", "nodes", "sbatch_args", "srun_args", "setup")


class _Reader:
    """Checks one sweep file; every error names the file and the dotted field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str) -> SweepError:
        return SweepError(f"{self.path}: {key}: {problem}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {value!r}")
        for name in value:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.fail(f"{key}.{name}" if key else str(name),
                                f"unknown field; {hint}fields: {', '.join(allowed)}")
        return value

    def string(self, value: Any, key: str, optional: bool = False) -> Optional[str]:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def overrides(self, value: Any, key: str) -> tuple[str, ...]:
        items = self.strings(value, key)
        for i, item in enumerate(items):
            if "=" not in item or not item.partition("=")[0].strip():
                raise self.fail(f"{key}[{i}]", f"{item!r} must look like dotted.key=value")
        return items

    def positive_int(self, value: Any, key: str, optional: bool = True) -> Optional[int]:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, f"must be a positive whole number, got {value!r}")
        return value

    def config(self, spec_dir: Path, value: Any, key: str, scales: list) -> str:
        template = self.string(value, key)
        for scale in scales:
            text = template.replace(SCALE_PLACEHOLDER, scale) if scale is not None else template
            if SCALE_PLACEHOLDER in text:
                raise self.fail(key, f"{template!r} holds {{scale}} but the sweep names no scale "
                                     "(set 'scale' or a grid.scale axis)")
            path = Path(text).expanduser()
            path = path if path.is_absolute() else spec_dir / path
            if not path.is_file():
                raise self.fail(key, f"no such config file {text!r} (looked for {path})")
        if len([s for s in scales if s is not None]) > 1 and SCALE_PLACEHOLDER not in template:
            raise self.fail(key, f"{template!r} has no {{scale}} placeholder, yet grid.scale "
                                 "varies: every scale would train the same config")
        return template


def load_sweep(path: str | Path) -> SweepSpec:
    """Reads and checks a sweep file; SweepError (a ValueError) naming file and field, or
    FileNotFoundError when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML ({err})") from None
    return parse_sweep(raw, path)


def parse_sweep(raw: Any, path: Path) -> SweepSpec:
    """A SweepSpec from the parsed YAML of the file at ``path``."""
    r = _Reader(path)
    top = r.mapping(raw if raw is not None else {}, "", _TOP)
    name = r.string(top.get("name", path.stem), "name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise r.fail("name", f"{name!r} may hold only letters, digits, '_', '.' and '-'")
    grid = _grid(r, top.get("grid"))
    scale = None if top.get("scale") is None else _parse_value(r, "scale", top["scale"], "scale")
    if "scale" in grid and scale is not None:
        raise r.fail("scale", "give the scale either here or as grid.scale, not both")
    scales = list(grid.get("scale", (scale,)))

    stages_raw = r.mapping(top.get("stages"), "stages", STAGES) if "stages" in top else None
    if not stages_raw:
        raise r.fail("stages", "missing: name at least stages.image_text.config")
    stages: dict[str, TrainingStageSpec] = {}
    for stage in TRAINING_STAGES:
        if stage not in stages_raw:
            continue
        key = f"stages.{stage}"
        body = r.mapping(stages_raw[stage], key, _STAGE_FIELDS[stage])
        if "config" not in body:
            raise r.fail(f"{key}.config", "missing: the stage's base config YAML")
        rewarmup = body.get("rewarmup_config")
        stages[stage] = TrainingStageSpec(
            config=r.config(path.parent, body["config"], f"{key}.config", scales),
            overrides=r.overrides(body.get("overrides"), f"{key}.overrides"),
            rewarmup_config=None if rewarmup is None else r.config(
                path.parent, rewarmup, f"{key}.rewarmup_config", scales),
            steps_per_epoch=r.positive_int(body.get("steps_per_epoch"), f"{key}.steps_per_epoch"))
    if "image_text" not in stages:
        raise r.fail("stages.image_text", "missing: every sweep has an image-text stage")
    evaluate = _evaluate(r, stages_raw.get("evaluate")) if "evaluate" in stages_raw else None
    _check_stages_cover_grid(r, stages, grid)

    data = None
    if top.get("data") is not None:
        body = r.mapping(top["data"], "data", _DATA_FIELDS)
        data = DataSpec(command=r.string(body.get("command"), "data.command"),
                        creates=r.string(body.get("creates"), "data.creates", optional=True))
    output_root = r.string(top.get("output_root", f"runs/sweeps/{name}"), "output_root")
    return SweepSpec(
        path=path, name=name, output_root=Path(output_root), stages=stages, grid=grid,
        description=str(top.get("description") or "").strip(), scale=scale,
        throughput=_throughput(r, top.get("throughput")),
        overrides=r.overrides(top.get("overrides"), "overrides"),
        online_data=r.overrides(top.get("online_data"), "online_data"), data=data,
        evaluate=evaluate, slurm=_slurm(r, top.get("slurm")))


def _parse_value(r: _Reader, axis: str, value: Any, key: str) -> Any:
    try:
        return AXES[axis].parse(value)
    except ValueError as err:
        raise r.fail(key, f"{err} ({AXES[axis].doc})") from None


def _grid(r: _Reader, raw: Any) -> dict[str, tuple]:
    if raw is None or raw == {}:
        raise r.fail("grid", f"empty: give at least one axis with its values (axes: "
                             f"{', '.join(AXES)})")
    if not isinstance(raw, dict):
        raise r.fail("grid", f"must be a mapping of axis -> list of values, got {raw!r}")
    for name in raw:
        if name not in AXES:
            close = difflib.get_close_matches(str(name), AXES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise r.fail(f"grid.{name}", f"unknown axis; {hint}axes: {', '.join(AXES)}")
    grid: dict[str, tuple] = {}
    for name in AXES:  # canonical order
        if name not in raw:
            continue
        values = raw[name] if isinstance(raw[name], list) else [raw[name]]
        if not values:
            raise r.fail(f"grid.{name}", "empty list: give at least one value")
        parsed = [_parse_value(r, name, v, f"grid.{name}[{i}]") for i, v in enumerate(values)]
        if len(set(parsed)) != len(parsed):
            raise r.fail(f"grid.{name}", f"repeats a value: {parsed}")
        grid[name] = tuple(parsed)
    return grid


def _check_stages_cover_grid(r: _Reader, stages: dict, grid: dict) -> None:
    checkpoints = grid.get("text_checkpoint", ())
    if "text" in stages and "text_checkpoint" not in grid:
        raise r.fail("grid.text_checkpoint", "required with stages.text: which checkpoint of "
                                             "the text run (percent) feeds the image-text stage?")
    if any(c > 0 for c in checkpoints) and "text" not in stages:
        raise r.fail("stages.text", "missing: grid.text_checkpoint asks for text checkpoints "
                                    f"{[c for c in checkpoints if c > 0]}")
    edges = [c for c in checkpoints if c in (0, 100)]
    if edges and stages["image_text"].rewarmup_config is None:
        raise r.fail("stages.image_text.rewarmup_config",
                     f"missing: text checkpoints {edges} re-warm the LR (the text run's schedule "
                     "has nothing left at 100% and does not exist at 0%): name the re-warmup "
                     "config, e.g. image_text_rewarmup.yaml")
    if any(e > 0 for e in grid.get("finetune_epochs", ())) and "finetune" not in stages:
        raise r.fail("stages.finetune", "missing: grid.finetune_epochs asks for fine-tuning")


def _evaluate(r: _Reader, raw: Any) -> EvaluateSpec:
    from megatron_vlm.evaluation.runner import SUITES, select_tasks

    body = r.mapping(raw, "stages.evaluate", _STAGE_FIELDS["evaluate"])
    suite = r.string(body.get("suite"), "stages.evaluate.suite")
    if suite not in SUITES:
        raise r.fail("stages.evaluate.suite", f"unknown suite {suite!r}; suites: "
                                              f"{', '.join(SUITES)}")
    tasks = r.strings(body.get("tasks"), "stages.evaluate.tasks") or None
    try:
        select_tasks(suite, tasks)
    except ValueError as err:
        raise r.fail("stages.evaluate.tasks", str(err)) from None
    return EvaluateSpec(suite=suite, tasks=tasks,
                        limit=r.positive_int(body.get("limit"), "stages.evaluate.limit"),
                        overrides=r.overrides(body.get("overrides"), "stages.evaluate.overrides"),
                        args=r.strings(body.get("args"), "stages.evaluate.args"))


def _throughput(r: _Reader, raw: Any) -> Union[None, float, dict]:
    def number(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise r.fail(key, f"must be a positive number of tokens/s/GPU, got {value!r}")
        return float(value)

    if raw is None:
        return None
    if isinstance(raw, dict):
        return {str(k): number(v, f"throughput.{k}") for k, v in raw.items()}
    return number(raw, "throughput")


def _slurm(r: _Reader, raw: Any) -> SlurmSpec:
    if raw is None:
        return SlurmSpec()
    body = r.mapping(raw, "slurm", _SLURM_FIELDS)
    nodes = body.get("nodes", {})
    if isinstance(nodes, int) and not isinstance(nodes, bool):
        nodes = {stage: nodes for stage in ("data", *STAGES)}
    nodes = r.mapping(nodes, "slurm.nodes", ("data", *STAGES))
    for stage, count in nodes.items():
        r.positive_int(count, f"slurm.nodes.{stage}", optional=False)
    return SlurmSpec(
        gpus_per_node=r.positive_int(body.get("gpus_per_node", 8), "slurm.gpus_per_node",
                                     optional=False),
        nodes=dict(nodes), sbatch_args=r.strings(body.get("sbatch_args"), "slurm.sbatch_args"),
        srun_args=r.strings(body.get("srun_args"), "slurm.srun_args"),
        setup=r.strings(body.get("setup"), "slurm.setup"))
