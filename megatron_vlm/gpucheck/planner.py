"""Which batch (copy) each wheelhouse file goes to, and the size of what travels with a copy.

A command on the GPU machine carries the repository's working tree plus the paths it names, at
most 64 MiB in all, so one copy (a ``batchNN/`` folder, plus manifest.json for the first) must
leave room for the tree. The first copy holds the ``core`` group and every package that several
groups share, then as much of the following groups as fits; a later group's own files go into
the first copy or into copies of that group alone. So every group needs the first copy and its
own copies, and no other group's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_vlm.fsutil import sha256_file
from megatron_vlm.gpucheck.manifest import FORMAT, MANIFEST, MANIFEST_RESERVE, MIB, split_file

FIRST = ""  # the section of the first copy: core and what several groups share
# Skipped by the walk that measures a tree without git: caches and outputs that .gitignore
# keeps from travelling.
_UNTRACKED_NAMES = {"__pycache__", "wheelhouse", "wheelhouse.building", "gpu_check_out",
                    "runs", "build", "dist"}


def working_tree_bytes(repo: Path) -> Tuple[int, str]:
    """The bytes of the checkout that travel with every command: the git-tracked files and the
    untracked ones git does not ignore (``git ls-files -co --exclude-standard``). Without git,
    a walk that skips dot-folders, egg-info and the usual ignored outputs. Returns (bytes, how
    it was measured)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo,
                                capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        listed = None
    if listed is not None and listed.returncode == 0:
        total = 0
        for name in listed.stdout.split(b"\0"):
            if name:
                try:  # a tracked file deleted in the work tree does not travel
                    total += os.lstat(repo / os.fsdecode(name)).st_size
                except OSError:
                    pass
        return total, "git ls-files"
    total = 0
    for root, dirs, files in os.walk(repo):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _UNTRACKED_NAMES
                   and not d.endswith(".egg-info")]
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total, "a walk of the folder (no git)"


def sections(groups: Sequence[dict]) -> Dict[str, str]:
    """package -> the section its files are packed with: FIRST for core's packages and for those
    several groups list, else the one group that lists it."""
    listed_by: Dict[str, List[str]] = {}
    for entry in groups:
        for package in entry["packages"]:
            listed_by.setdefault(package, []).append(entry["name"])
    return {package: FIRST if len(names) > 1 or names[0] == groups[0]["name"] else names[0]
            for package, names in listed_by.items()}


def plan_copies(pieces: Dict[str, Tuple[int, str]], order: Sequence[str], capacity: int,
                reserve_first: int = MANIFEST_RESERVE) -> List[List[str]]:
    """Packs pieces (name -> (bytes, section)) into batches of at most ``capacity`` bytes; the
    first batch has ``reserve_first`` bytes less room (for the manifest). Sections are packed in
    ``order`` (FIRST first), each largest piece first, first fit into the first batch or a batch
    opened for the same section. Deterministic. Returns the batches' piece names, sorted."""
    if not pieces:
        return []
    rooms: List[int] = [capacity - reserve_first]
    owners: List[str] = [FIRST]
    batches: List[List[str]] = [[]]
    rank = {name: i for i, name in enumerate([FIRST, *order])}
    for name in sorted(pieces, key=lambda n: (rank[pieces[n][1]], -pieces[n][0], n)):
        size, section = pieces[name]
        if size > capacity:
            raise ValueError(f"{name} ({size} bytes) is larger than a copy ({capacity} bytes); "
                             f"split it into smaller parts first")
        for i, room in enumerate(rooms):
            if size <= room and (i == 0 or owners[i] == section):
                batches[i].append(name)
                rooms[i] -= size
                break
        else:
            batches.append([name])
            rooms.append(capacity - size)
            owners.append(section)
    return [sorted(b) for b in batches if b]


def pieces_of(files: Dict[str, Tuple[int, str]], groups: Sequence[dict],
              part_bytes: int) -> Dict[str, Tuple[int, str]]:
    """What gets packed: file name -> (bytes, package) becomes piece name -> (bytes, section),
    a file over ``part_bytes`` as the parts ``NAME.part000``, ... that split_file makes."""
    section_of = sections(groups)
    pieces = {}
    for name, (size, package) in files.items():
        if size > part_bytes:
            sizes = [part_bytes] * (size // part_bytes) + ([size % part_bytes]
                                                            if size % part_bytes else [])
            for index, part in enumerate(sizes):
                pieces[f"{name}.part{index:03d}"] = (part, section_of[package])
        else:
            pieces[name] = (size, section_of[package])
    return pieces


def group_batches(plan: List[List[str]], files: Dict[str, Tuple[int, str]],
                  groups: Sequence[dict]) -> Dict[str, List[int]]:
    """group name -> the indexes of the batches holding its packages' files or parts
    (``files``: file name -> (bytes, package), as for :func:`pieces_of`)."""
    def package(piece: str) -> str:
        return files[piece if piece in files else piece.rsplit(".part", 1)[0]][1]

    held = [{package(name) for name in names} for names in plan]
    return {g["name"]: [i for i, packages in enumerate(held) if packages & set(g["packages"])]
            for g in groups}


def layout(directory: Path, packages: Dict[str, str], groups: List[dict], part_bytes: int,
           batch_bytes: int, meta: dict, reserve: int = MANIFEST_RESERVE) -> dict:
    """Turns a flat folder of downloaded files into the wheelhouse: splits files over
    ``part_bytes``, moves every file or part into ``batchNN/`` folders (:func:`plan_copies` of
    :func:`pieces_of`), records each group's batches, and writes manifest.json (``meta`` plus
    files, groups and batches). ``packages``: file name -> the package it holds; ``groups``: in
    packing order, each with its ``packages``. Returns the manifest."""
    first_group = {}
    for entry in groups:
        for package in entry["packages"]:
            first_group.setdefault(package, entry["name"])
    sizes = {p.name: (p.stat().st_size, packages[p.name])
             for p in sorted(directory.iterdir()) if p.is_file()}
    pieces = pieces_of(sizes, groups, part_bytes)
    plan = plan_copies(pieces, [g["name"] for g in groups], batch_bytes, reserve)
    files = []
    for name, (size, package) in sizes.items():
        entry = {"name": name, "package": package, "group": first_group[package], "size": size,
                 "sha256": sha256_file(directory / name)}
        if size > part_bytes:
            entry["parts"] = split_file(directory / name, part_bytes)
        else:
            entry["path"] = name
        files.append(entry)
    where, batches = {}, []
    for i, names in enumerate(plan):
        folder = directory / f"batch{i:02d}"
        folder.mkdir()
        for name in names:
            (directory / name).rename(folder / name)
            where[name] = f"{folder.name}/{name}"
        batches.append({"dir": folder.name, "size": sum(pieces[n][0] for n in names),
                        "files": [where[n] for n in names]})
    for entry in files:
        for piece in entry.get("parts", [entry]):
            piece["path"] = where[piece["path"]]
    needs = group_batches(plan, sizes, groups)
    out_groups = [dict(g, batches=[batches[i]["dir"] for i in needs[g["name"]]]) for g in groups]
    manifest = dict(meta, format=FORMAT, groups=out_groups, files=files, batches=batches,
                    total_size=sum(size for size, _ in pieces.values()))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def carried_bytes(manifest: dict, index: int, tree_bytes: int,
                  manifest_bytes: Optional[int] = None) -> int:
    """What command ``index`` carries for copy ``index``: the batch, the working tree, and for
    the first copy manifest.json (its reserve when its size is not given)."""
    extra = 0
    if index == 0:
        extra = MANIFEST_RESERVE if manifest_bytes is None else manifest_bytes
    return manifest["batches"][index]["size"] + tree_bytes + extra


def copy_lines(manifest: dict, root: str, tree_bytes: int, limit: int,
               manifest_bytes: Optional[int] = None) -> List[str]:
    """One line per copy: the paths to carry together, its size with the working tree (and the
    manifest) against the limit of one command, and the groups that need it."""
    lines = []
    count = len(manifest["batches"])
    for i, batch in enumerate(manifest["batches"]):
        paths = [f"{root}/{batch['dir']}"] + ([f"{root}/{MANIFEST}"] if i == 0 else [])
        users = [g["name"] for g in manifest["groups"] if batch["dir"] in g["batches"]]
        total = carried_bytes(manifest, i, tree_bytes, manifest_bytes)
        lines.append(f"copy {i + 1}/{count}: {' '.join(paths)}  ({batch['size'] / MIB:.1f} MiB, "
                     f"{len(batch['files'])} files; {total / MIB:.1f} MiB of {limit / MIB:.0f} "
                     f"with the working tree; for {', '.join(users)})")
    return lines


def group_lines(manifest: dict) -> List[str]:
    """One line per group: the copies it needs (numbered as in :func:`copy_lines`)."""
    index = {b["dir"]: i + 1 for i, b in enumerate(manifest["batches"])}
    lines = []
    for entry in manifest["groups"]:
        copies = [index[d] for d in entry["batches"]]
        size = sum(f["size"] for f in manifest["files"] if f["package"] in entry["packages"])
        lines.append(f"group {entry['name']}: {len(entry['packages'])} packages, "
                     f"{size / MIB:.1f} MiB, in cop{'y' if len(copies) == 1 else 'ies'} "
                     f"{', '.join(map(str, copies))}")
    return lines
