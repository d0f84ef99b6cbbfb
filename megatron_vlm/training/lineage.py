"""Lineage: what made a checkpoint, recorded with it, the chain of its ancestors included.

Every checkpoint the training loop saves carries a ``lineage`` record in its common.json:

* ``run``: the run's name and output directory; ``checkpoint``: this checkpoint's step and
  fraction of the run's schedule;
* ``stage``: ``text``, ``image_text`` or ``finetune``, derived from the config
  (:func:`stage_of`; ``stage_basis`` says from what);
* ``parent``: the checkpoint the run started from (``checkpoint.load``; None from scratch):
  its path, the sha256 of its common.json (``fingerprint``, the same file
  tools/evaluate_vlm.py fingerprints), its step and fraction; ``branch_fraction`` is that
  fraction (0.8 for an image-text run from the text run's 80% checkpoint);
* ``config_sha256``: the hash of the resolved config (the config itself is in common.json);
* ``data``: the data kind, the blend's ratios and seed, the sha256 of every source's manifest
  (a text corpus's ``PREFIX.manifest.json``, a shard directory's ``index.json``, each listing
  its files' hashes) and of the tokenizer, and the blend index's key (``blend-<hash of every
  input>``, docs/blend.md);
* ``code``: the git commit of the checkout (and whether it had uncommitted changes to tracked
  files) when the package runs from one, and the package version;
* ``ledger``: the run's token ledger at this checkpoint (:mod:`megatron_vlm.training.ledger`);
* ``parent_lineage``: the parent checkpoint's own lineage record, so one file gives the whole
  chain (text run -> image-text run -> fine-tuning run).

Every evaluation's results.json records the lineage of the checkpoint it scored
(:func:`checkpoint_lineage`); ``tools/lineage.py`` draws the tree of a run or sweep directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

LINEAGE_FORMAT = 1
"""Bumped when a field changes meaning."""
STAGES = ("text", "image_text", "finetune")
_NEXT_STAGE = {"text": "image_text", "image_text": "finetune",
               "finetune": "finetune"}
_REPO = Path(__file__).resolve().parents[2]


def file_sha256(path: str | os.PathLike) -> Optional[str]:
    """Hex sha256 of a file, or None when there is no such file."""
    from megatron_vlm.fsutil import sha256_file

    return sha256_file(path) if os.path.isfile(path) else None


def checkpoint_sha256(directory: str | os.PathLike) -> str:
    """The sha256 of a checkpoint's common.json: what names it in a child's lineage (an
    evaluation's results.json keeps its first 16 characters)."""
    from megatron_vlm.training.checkpoint_names import COMMON

    return file_sha256(Path(directory) / COMMON) or ""


def config_sha256(config: dict) -> str:
    """A hash of a resolved config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def stage_of(cfg, parent_lineage: Optional[dict]) -> tuple[str, str]:
    """(stage, what it was derived from). A blend names its stage by its sources: text alone
    is ``text``, instructions alone ``finetune``, any image data with text or captions
    ``image_text``. Random batches have no sources to tell by: ``text`` from scratch, else the
    stage after the parent's (``text`` -> ``image_text`` -> ``finetune``; a parent that keeps
    no lineage, such as a converted checkpoint, counts as ``text``)."""
    if cfg.data.kind == "blend":
        sources = sorted(cfg.data.ratios)
        listed = "data.ratios: " + ", ".join(sources)
        if sources == ["text"]:
            return "text", listed
        if sources == ["instructions"]:
            return "finetune", listed
        return "image_text", listed
    kind = f"data.kind={cfg.data.kind}"
    if not cfg.checkpoint.load:
        return "text", f"{kind}, from scratch"
    if parent_lineage is None:  # e.g. a converted DCLM checkpoint: a text model
        return "image_text", f"{kind}: the stage after a parent that keeps no lineage (taken " \
                             "as a text checkpoint)"
    parent_stage = parent_lineage.get("stage")
    return (_NEXT_STAGE.get(parent_stage, "finetune"),
            f"{kind}: the stage after the parent's ({parent_stage})")


def _data_files(data) -> dict[str, str]:
    """The manifest file of every data input the run reads, by what it is."""
    from megatron_vlm.data.shard_io import INDEX_NAME
    from megatron_vlm.data.text_shards import text_manifest_path

    sources = set(data.ratios)
    files = {}
    if data.tokenizer:
        files["tokenizer"] = data.tokenizer
    if "text" in sources or ("captions" in sources and data.caption_fill == "text"):
        files["text"] = text_manifest_path(data.text)
    if "captions" in sources:
        files["captions"] = os.path.join(data.captions, INDEX_NAME)
    if "instructions" in sources:
        files["instructions"] = os.path.join(data.instructions, INDEX_NAME)
        files["instruction_images"] = os.path.join(data.instruction_images, INDEX_NAME)
    return files


def data_fingerprint(cfg, blend_index_path: Optional[str]) -> dict:
    """The run's data: kind, ratios, seed, each input's manifest and its sha256, the blend
    index's key (``blend_index_path``: where the index is cached, None without a blend)."""
    data = cfg.data
    if data.kind != "blend":
        return {"kind": data.kind, "seed": data.seed}
    return {"kind": data.kind, "ratios": dict(data.ratios), "seed": data.seed,
            "caption_fill": data.caption_fill,
            "files": {what: {"path": path, "sha256": file_sha256(path)}
                      for what, path in _data_files(data).items()},
            "blend_index": Path(blend_index_path).name if blend_index_path else None}


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung: the version suffices
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict:
    """The git commit of the checkout the package runs from (None when it is installed, not
    checked out, or git is missing), whether tracked files had uncommitted changes, and the
    package version."""
    from importlib import metadata

    try:
        version = metadata.version("megatron-vlm")
    except metadata.PackageNotFoundError:
        version = None
    commit = dirty = None
    if (_REPO / ".git").exists():  # a checkout, not a copy installed into site-packages
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
        dirty = bool(status) if status is not None else None
    return {"git_commit": commit, "git_dirty": dirty, "package_version": version}


def parent_of(load: str) -> tuple[dict, Optional[dict]]:
    """(the ``parent`` entry, the parent's own lineage) of a run started from ``load``
    (a checkpoint or a run directory, resolved as the loop resolves it)."""
    from megatron_vlm.training.checkpointing import read_common, resolve_checkpoint

    directory = resolve_checkpoint(load)
    common = read_common(directory)
    fraction = common.get("fraction")
    schedule = common.get("schedule") or {}
    if fraction is None and schedule.get("total_steps"):
        fraction = schedule["step"] / schedule["total_steps"]
    entry = {"path": os.path.abspath(directory), "fingerprint": checkpoint_sha256(directory),
             "step": common.get("step"), "fraction": fraction}
    return entry, common.get("lineage")


@dataclass
class RunLineage:
    """What every checkpoint of a run shares of its lineage, found once at the start."""

    run: dict
    """The run's name and absolute output directory."""
    stage: str
    """``text``, ``image_text`` or ``finetune``."""
    stage_basis: str
    """What the stage was derived from."""
    parent: Optional[dict]
    """The checkpoint the run started from (path, fingerprint, step, fraction); None from
    scratch."""
    parent_lineage: Optional[dict]
    """The parent checkpoint's lineage record (None from scratch or when it keeps none)."""
    config_sha256: str
    """Hash of the resolved config."""
    data: dict
    """The data fingerprint (:func:`data_fingerprint`)."""
    code: dict
    """The code version (:func:`code_version`)."""

    @classmethod
    def of_run(cls, cfg, blend_index_path: Optional[str]) -> "RunLineage":
        from megatron_vlm.config import config_to_dict

        parent, parent_lineage = parent_of(cfg.checkpoint.load) if cfg.checkpoint.load \
            else (None, None)
        stage, basis = stage_of(cfg, parent_lineage)
        return cls(run={"name": cfg.name, "output_dir": os.path.abspath(cfg.output_dir)},
                   stage=stage, stage_basis=basis, parent=parent, parent_lineage=parent_lineage,
                   config_sha256=config_sha256(config_to_dict(cfg)),
                   data=data_fingerprint(cfg, blend_index_path), code=code_version())

    def record(self, step: int, fraction: float, ledger: dict) -> dict:
        """The lineage record of this run's checkpoint at ``step`` (``ledger``: the token
        ledger's state there)."""
        return {"format": LINEAGE_FORMAT, "run": self.run,
                "checkpoint": {"step": step, "fraction": fraction},
                "stage": self.stage, "stage_basis": self.stage_basis, "parent": self.parent,
                "branch_fraction": (self.parent or {}).get("fraction"),
                "config_sha256": self.config_sha256, "data": self.data, "code": self.code,
                "ledger": ledger, "parent_lineage": self.parent_lineage}


def check_lineage(record: Any, where: str) -> dict:
    """``record`` when it is a lineage record (its ancestors too); ValueError naming ``where``
    and the first field that is not as :meth:`RunLineage.record` writes it."""
    field, node = "lineage", record
    while node is not None:
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {field} is {type(node).__name__}, not a lineage record")
        if node.get("format") != LINEAGE_FORMAT:
            raise ValueError(f"{where}: {field}.format is {node.get('format')!r}, not "
                             f"{LINEAGE_FORMAT}")
        if node.get("stage") not in STAGES:
            raise ValueError(f"{where}: {field}.stage is {node.get('stage')!r}, not one of "
                             f"{', '.join(STAGES)}")
        step = (node.get("checkpoint") or {}).get("step")
        if not isinstance(node.get("run"), dict) or not isinstance(step, int):
            raise ValueError(f"{where}: {field} names no run or no checkpoint step")
        parent = node.get("parent")
        if parent is not None and not (isinstance(parent, dict)
                                       and isinstance(parent.get("fingerprint"), str)):
            raise ValueError(f"{where}: {field}.parent has no fingerprint")
        field, node = field + ".parent_lineage", node.get("parent_lineage")
    return record


def checkpoint_lineage(checkpoint: str | os.PathLike) -> Optional[dict]:
    """The lineage record saved with a checkpoint (a checkpoint or run directory); None for a
    checkpoint written before lineage was kept, or not by the training loop (a converted one)."""
    from megatron_vlm.training.checkpointing import COMMON, read_common, resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    record = read_common(directory).get("lineage")
    return None if record is None else check_lineage(record, str(directory / COMMON))


def lineage_chain(record: Optional[dict]) -> list[dict]:
    """The records of a chain, the first ancestor first and ``record`` last."""
    chain = []
    while record is not None:
        chain.append(record)
        record = record.get("parent_lineage")
    return chain[::-1]


def chain_real_tokens(record: Optional[dict]) -> dict[str, int]:
    """Real tokens per source that went into a checkpoint along its whole chain: each
    ancestor's ledger up to the checkpoint its child started from, and this run's own."""
    totals: dict[str, int] = {}
    for node in lineage_chain(record):
        for name, counts in ((node.get("ledger") or {}).get("sources") or {}).items():
            totals[name] = totals.get(name, 0) + int(counts.get("real_tokens", 0))
    return totals
