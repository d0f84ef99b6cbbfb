"""The wheelhouse's manifest.json: what it lists, and verifying and joining a group's files.

A wheelhouse is a folder of ``batchNN/`` folders (one per copy to the GPU machine) and
``manifest.json``. The manifest lists every file (a wheel or sdist) with its size, sha256, the
package it holds and the group that brought it; files over the part size are split into
``NAME.part000``, ``NAME.part001``, ... Each group (``core``, ``encoder``, ``train``, ``te``)
lists its requirements, the packages they resolve to and the batches holding those packages'
files, so the check verifies and installs a group from only the copies that group needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from megatron_vlm.fsutil import sha256_file  # standard library only

MIB = 1 << 20
MANIFEST = "manifest.json"
# 2: the groups; a format-1 wheelhouse (one flat requirement list) must be rebuilt.
FORMAT = 2
# Room kept in the first batch for manifest.json, which travels with it.
MANIFEST_RESERVE = 1 * MIB
JOINED = "assembled"  # WHEELHOUSE/assembled/: split files joined again

# The groups in the order they are packed. The first copy holds core and whatever several
# groups share, then as much of the next groups as fits.
GROUPS = ("core", "encoder", "train", "te")
GROUP_ABOUT = {
    "core": "megatron-core, what the GPU tests and the benchmark import, the test tools and "
            "the project's build tools",
    "encoder": "the online vision encoder: open_clip_torch, timm and torchvision",
    "train": "what training on real data adds: the data formats' readers, the tokenizers "
             "and TensorBoard",
    "te": "Transformer Engine: its core wheel, the torch extension's sdist, their "
          "requirements and build tools",
    "extra": "the requirements given with --extra",
}
# What the check's install stage installs unless told otherwise: the tests and the benchmark
# of the first check need these two, and both fit the first copy.
CHECK_GROUPS = ("core", "encoder")


class WheelhouseError(ValueError):
    """A wheelhouse that is missing, incomplete or corrupt; the message is one line."""


def canonical(name: str) -> str:
    """A distribution name in its normalized form (lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_file(path: Path, part_bytes: int) -> List[dict]:
    """Splits ``path`` into ``NAME.part000``, ``NAME.part001``, ... beside it, each at most
    ``part_bytes``, removes the original, and returns one ``{"path", "size", "sha256"}`` per part
    (paths are file names)."""
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    parts = []
    with open(path, "rb") as src:
        index = 0
        while True:
            block = src.read(part_bytes)
            if not block and index > 0:
                break
            part = path.with_name(f"{path.name}.part{index:03d}")
            part.write_bytes(block)
            parts.append({"path": part.name, "size": len(block),
                          "sha256": hashlib.sha256(block).hexdigest()})
            index += 1
            if len(block) < part_bytes:
                break
    path.unlink()
    return parts


def load_manifest(wheelhouse: Path) -> dict:
    """The wheelhouse's manifest.json, checked for the fields the check needs."""
    path = wheelhouse / MANIFEST
    if not path.is_file():
        raise WheelhouseError(f"{path} not found: build the wheelhouse with `make wheelhouse` "
                              f"and carry {path} with the first copy")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WheelhouseError(f"{path} is not readable JSON ({err}); copy it again") from None
    if manifest.get("format") != FORMAT:
        raise WheelhouseError(f"{path}: format {manifest.get('format')!r}, this tool reads "
                              f"format {FORMAT}; rebuild the wheelhouse with this checkout")
    for key in ("files", "batches", "groups", "python_version", "torch"):
        if key not in manifest:
            raise WheelhouseError(f"{path}: field {key!r} is missing; rebuild the wheelhouse")
    return manifest


def group(manifest: dict, name: str) -> dict:
    """The manifest's entry for group ``name``; a WheelhouseError naming the groups it has."""
    for entry in manifest["groups"]:
        if entry["name"] == name:
            return entry
    have = ", ".join(g["name"] for g in manifest["groups"]) or "none"
    hint = " (built with TE=none)" if name == "te" else ""
    raise WheelhouseError(f"the wheelhouse has no group {name!r}{hint}; it has: {have}")


def batches_for(manifest: dict, names: Iterable[str]) -> List[str]:
    """The batch folders the groups ``names`` need, in order."""
    needed = {b for n in names for b in group(manifest, n)["batches"]}
    return [b["dir"] for b in manifest["batches"] if b["dir"] in needed]


def files_for(manifest: dict, names: Iterable[str]) -> List[dict]:
    """The manifest's file entries holding the packages of the groups ``names``."""
    packages = {p for n in names for p in group(manifest, n)["packages"]}
    return [f for f in manifest["files"] if f["package"] in packages]


def _check_piece(wheelhouse: Path, rel: str, size: int, sha: str) -> Path:
    path = wheelhouse / rel
    copy_hint = f"copy {Path(rel).parent.as_posix()}/ again"
    if not path.is_file():
        raise WheelhouseError(f"missing {path}: {copy_hint}")
    actual = path.stat().st_size
    if actual != size:
        raise WheelhouseError(f"corrupt {path}: {actual} bytes, the manifest says {size}; "
                              f"{copy_hint}")
    if sha256_file(path) != sha:
        raise WheelhouseError(f"corrupt {path}: sha256 differs from the manifest; {copy_hint}")
    return path


def verify_files(wheelhouse: Path, files: List[dict], dest: Optional[Path] = None) -> List[Path]:
    """Verifies each listed file, or each of its parts, against the manifest (size and sha256)
    and joins split files into ``dest`` (default WHEELHOUSE/assembled), reusing a joined file
    that already verifies. Returns the folders pip should find the files in. Raises
    WheelhouseError naming the first missing or corrupt file or part and its batch."""
    dest = dest or wheelhouse / JOINED
    folders = set()
    for entry in files:
        if "parts" not in entry:
            folders.add(_check_piece(wheelhouse, entry["path"], entry["size"],
                                     entry["sha256"]).parent)
            continue
        folders.add(dest)
        target = dest / entry["name"]
        if target.is_file() and target.stat().st_size == entry["size"] \
                and sha256_file(target) == entry["sha256"]:
            continue
        parts = [_check_piece(wheelhouse, p["path"], p["size"], p["sha256"])
                 for p in entry["parts"]]
        dest.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".joining")
        with open(partial, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 4 * MIB)
        if sha256_file(partial) != entry["sha256"]:
            partial.unlink()
            raise WheelhouseError(f"joined {entry['name']} from its {len(parts)} parts but its "
                                  f"sha256 differs from the manifest; rebuild the wheelhouse")
        partial.replace(target)
    return sorted(folders)


def verify_groups(wheelhouse: Path, manifest: dict, names: Iterable[str],
                  dest: Optional[Path] = None) -> List[Path]:
    """Verifies (and joins) only the files of the groups ``names``; see :func:`verify_files`.
    A batch the groups need that is absent altogether is named with the groups in one line."""
    names = list(names)
    absent = [b for b in batches_for(manifest, names) if not (wheelhouse / b).is_dir()]
    if absent:
        paths = " ".join(f"{wheelhouse}/{b}" for b in absent)
        raise WheelhouseError(f"group{'s' if len(names) > 1 else ''} {', '.join(names)} "
                              f"need{'' if len(names) > 1 else 's'} {paths}, which is not "
                              f"here: carry it")
    return verify_files(wheelhouse, files_for(manifest, names), dest)
