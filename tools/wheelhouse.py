#!/usr/bin/env python3
"""Builds the wheelhouse for an air-gapped CUDA machine (``make wheelhouse``), and holds the
manifest code that tools/gpu_check.py uses there to verify and reassemble it.

The wheelhouse holds every package the GPU path, the GPU tests and the online vision encoder
import, as wheels for the target Python and platform, except torch and what torch brings (its
CUDA libraries, triton, sympy, ...): the target machine already has its own CUDA torch, and those
downloads would be gigabytes. With ``--te VERSION`` it also holds Transformer Engine: the
``transformer_engine_cuNN`` core wheel, the ``transformer_engine`` meta-package, the
``transformer_engine_torch`` sdist (its torch extension is compiled on the GPU machine, against
that machine's torch) and the build tools the sdist needs offline. The project itself is not
packed: the GPU check installs it from the repository checkout it runs in.

Files over ``--part-mib`` are split into ``NAME.part000``, ``NAME.part001``, ... and removed, and
all files are laid out in ``batchNN/`` folders of at most ``--batch-mib`` each, so the wheelhouse
can be brought over in several size-limited copies. ``manifest.json`` lists every file and part
with its size and sha256.

    python tools/wheelhouse.py --out wheelhouse --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --torch 2.11.0 --te 2.11.0 --te-cuda 13

Only the standard library is imported at module level: gpu_check.py imports this module on a
machine where nothing has been installed yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# The checkout's own package, usable here before anything is installed (fsutil is standard
# library only).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_vlm.fsutil import sha256_file  # noqa: E402

MIB = 1 << 20
MANIFEST = "manifest.json"
FORMAT = 1
# Room kept in the first batch for manifest.json, which travels with it.
MANIFEST_RESERVE = 1 * MIB

# What the GPU path imports (training/loop.py, step.py, checkpointing.py, model/, runtime/,
# data/loader.py), with megatron-core's own imports on that path (einops, nvtx), TensorBoard for
# the metrics, the data formats' readers, and the test tools.
GPU_PATH_REQUIREMENTS = [
    "megatron-core==0.16.1", "numpy", "packaging", "pyyaml", "tqdm", "psutil", "safetensors",
    "tokenizers", "sentencepiece", "pillow", "pyarrow", "zstandard", "einops", "nvtx",
    "tensorboard", "pytest", "pytest-timeout", "hypothesis",
]
# The online vision encoder (its GPU test); torchvision is resolved against --torch.
ENCODER_REQUIREMENTS = ["open_clip_torch==3.3.0", "timm==1.0.31"]
# Installed first on the GPU machine: the project's editable install and the Transformer Engine
# sdist build run without build isolation (offline), so these must already be there. The sdist's
# setup.py imports setuptools, wheel (bdist_wheel) and packaging; ninja lets torch compile the
# extension in parallel (MAX_JOBS). pybind11 is not needed: torch ships its headers, and TE
# imports the pybind11 package only for its CMake core build, which the core wheel replaces.
BUILD_REQUIREMENTS = ["setuptools>=64", "wheel", "packaging", "ninja"]
# megatron-core 0.16.1 supports Transformer Engine 2.9 up to 2.11 (pyproject's gpu extra agrees).
TE_SUPPORTED = ((2, 9), (2, 12))
TE_SDIST = "transformer_engine_torch"


class WheelhouseError(ValueError):
    """A wheelhouse that is missing, incomplete or corrupt; the message is one line."""


def canonical(name: str) -> str:
    """A distribution name in its normalized form (lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------
# Parts, batches and the manifest (standard library only)
# ---------------------------------------------------------------------------------------------


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


def plan_batches(sizes: Dict[str, int], capacity: int, reserve_first: int = 0) -> List[List[str]]:
    """Packs the named items into batches of at most ``capacity`` bytes, first fit in decreasing
    size order (deterministic); the first batch has ``reserve_first`` bytes less room, kept for
    the manifest that travels with it."""
    if not sizes:
        return []
    batches: List[List[str]] = [[]]
    free = [capacity - reserve_first]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        size = sizes[name]
        if size > capacity:
            raise ValueError(f"{name} ({size} bytes) is larger than a batch ({capacity} bytes); "
                             f"split it into smaller parts first")
        for i, room in enumerate(free):
            if size <= room:
                batches[i].append(name)
                free[i] -= size
                break
        else:
            batches.append([name])
            free.append(capacity - size)
    return [sorted(b) for b in batches]


def layout(directory: Path, part_bytes: int, batch_bytes: int, meta: dict,
           reserve: int = MANIFEST_RESERVE) -> dict:
    """Turns a flat folder of downloaded files into the wheelhouse layout: splits files over
    ``part_bytes``, moves everything into ``batchNN/`` folders of at most ``batch_bytes`` (the
    first keeps ``reserve`` bytes free for manifest.json), and writes manifest.json (``meta``
    plus the file list and batches). Returns the manifest."""
    files = []
    pieces: Dict[str, int] = {}  # a file or part name -> its size, for the batch plan
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        entry = {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
        if entry["size"] > part_bytes:
            entry["parts"] = split_file(path, part_bytes)
            for part in entry["parts"]:
                pieces[part["path"]] = part["size"]
        else:
            entry["path"] = path.name
            pieces[path.name] = entry["size"]
        files.append(entry)
    plan = plan_batches(pieces, batch_bytes, reserve_first=reserve)
    where = {}
    batches = []
    for i, names in enumerate(plan):
        folder = directory / f"batch{i:02d}"
        folder.mkdir()
        for name in names:
            (directory / name).rename(folder / name)
            where[name] = f"{folder.name}/{name}"
        batches.append({"dir": folder.name, "size": sum(pieces[n] for n in names),
                        "files": [where[n] for n in names]})
    for entry in files:
        if "parts" in entry:
            for part in entry["parts"]:
                part["path"] = where[part["path"]]
        else:
            entry["path"] = where[entry["path"]]
    manifest = dict(meta, format=FORMAT, files=files, batches=batches,
                    total_size=sum(pieces.values()))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_manifest(wheelhouse: Path) -> dict:
    """The wheelhouse's manifest.json, checked for the fields gpu_check needs."""
    path = wheelhouse / MANIFEST
    if not path.is_file():
        raise WheelhouseError(f"{path} not found: build the wheelhouse with `make wheelhouse` "
                              f"and copy it (manifest.json and every batchNN/ folder)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WheelhouseError(f"{path} is not readable JSON ({err}); copy it again") from None
    if manifest.get("format") != FORMAT:
        raise WheelhouseError(f"{path}: format {manifest.get('format')!r}, this tool reads "
                              f"format {FORMAT}; rebuild the wheelhouse with this checkout")
    for key in ("files", "batches", "requirements", "build_requirements"):
        if key not in manifest:
            raise WheelhouseError(f"{path}: field {key!r} is missing; rebuild the wheelhouse")
    return manifest


def _check_piece(wheelhouse: Path, rel: str, size: int, sha: str, batch_of: Dict[str, str]) -> Path:
    path = wheelhouse / rel
    copy_hint = f"copy {batch_of.get(rel, Path(rel).parent.as_posix())}/ again"
    if not path.is_file():
        raise WheelhouseError(f"missing {path}: {copy_hint}")
    actual = path.stat().st_size
    if actual != size:
        raise WheelhouseError(f"corrupt {path}: {actual} bytes, the manifest says {size}; "
                              f"{copy_hint}")
    if sha256_file(path) != sha:
        raise WheelhouseError(f"corrupt {path}: sha256 differs from the manifest; {copy_hint}")
    return path


def assemble(wheelhouse: Path, manifest: dict, dest: Optional[Path] = None) -> List[Path]:
    """Verifies every file and part the manifest lists (size and sha256) and joins split files
    into ``dest`` (default WHEELHOUSE/assembled), reusing a joined file that already verifies.
    Returns the folders pip should find the files in. Raises WheelhouseError naming the first
    missing or corrupt file or part."""
    dest = dest or wheelhouse / "assembled"
    batch_of = {rel: b["dir"] for b in manifest["batches"] for rel in b["files"]}
    folders = {wheelhouse / b["dir"] for b in manifest["batches"]}
    for entry in manifest["files"]:
        if "parts" not in entry:
            _check_piece(wheelhouse, entry["path"], entry["size"], entry["sha256"], batch_of)
            continue
        target = dest / entry["name"]
        if target.is_file() and target.stat().st_size == entry["size"] \
                and sha256_file(target) == entry["sha256"]:
            continue
        parts = [_check_piece(wheelhouse, p["path"], p["size"], p["sha256"], batch_of)
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
    if any("parts" in e for e in manifest["files"]):
        folders.add(dest)
    return sorted(folders)


def copy_plan(manifest: dict, root: str = "wheelhouse") -> List[str]:
    """Lines saying which paths to copy together, one batch per copy."""
    lines = []
    for i, batch in enumerate(manifest["batches"]):
        paths = [f"{root}/{batch['dir']}"] + ([f"{root}/{MANIFEST}"] if i == 0 else [])
        lines.append(f"copy {i + 1}/{len(manifest['batches'])}: {' '.join(paths)}  "
                     f"({batch['size'] / MIB:.1f} MiB, {len(batch['files'])} files)")
    return lines


# ---------------------------------------------------------------------------------------------
# Resolving and downloading (run where the package index is reachable)
# ---------------------------------------------------------------------------------------------


def _packaging():
    """``packaging``'s Requirement and Version, from the package or from pip's vendored copy."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def target_platforms(platform: str) -> List[str]:
    """The platform tags a machine of ``platform`` accepts. pip takes ``--platform`` literally,
    so ``manylinux_2_28_x86_64`` alone would refuse every manylinux2014 wheel."""
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    major, minor, arch = int(match[1]), int(match[2]), match[3]
    if major != 2:
        return [platform]
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in legacy.items() if minor >= m]
    return tags


def marker_environment(python_version: str, platform: str) -> dict:
    """The PEP 508 marker values of the target machine (pip evaluates markers for the Python it
    runs on, not for ``--python-version``)."""
    arch = next((a for a in ("x86_64", "aarch64", "ppc64le", "s390x", "i686", "armv7l")
                 if platform.endswith(a)), None)
    if arch is None:
        raise ValueError(f"--platform {platform}: no known machine architecture at its end")
    full = python_version if python_version.count(".") == 2 else python_version + ".0"
    return {"python_version": ".".join(python_version.split(".")[:2]), "python_full_version": full,
            "implementation_name": "cpython", "implementation_version": full,
            "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": arch,
            "platform_release": "", "platform_version": ""}


def _pip_target_args(python_version: str, platform: str) -> List[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in target_platforms(platform):
        args += ["--platform", tag]
    return args


def _pip(args: Sequence[str], timeout: int = 1800) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-30:])
        raise RuntimeError(f"pip {args[0]} failed (exit {done.returncode}):\n{tail}")


def resolve(requirements: List[str], constraints: List[str], python_version: str, platform: str,
            work: Path) -> dict:
    """pip's resolution of ``requirements`` for the target (a dry-run install report: only
    metadata is fetched where the index serves it separately)."""
    (work / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (work / "constraints.txt").write_text("\n".join(constraints) + "\n")
    report = work / "report.json"
    _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
          *_pip_target_args(python_version, platform), "--target", str(work / "target"),
          "-r", str(work / "requirements.txt"), "-c", str(work / "constraints.txt")])
    return json.loads(report.read_text())


def closure(report: dict, roots: List[str], env: dict, excluded: str = "torch"
            ) -> Tuple[Dict[str, dict], List[str]]:
    """The report's packages that ``roots`` need on the target, not counting ``excluded`` and
    what only it brings. Returns (canonical name -> report item, requirements the report lacks)."""
    Requirement, _ = _packaging()
    items = {canonical(i["metadata"]["name"]): i for i in report["install"]}
    keep: Dict[str, dict] = {}
    extras_seen: Dict[str, set] = {}
    missing: List[str] = []
    queue = [Requirement(r) for r in roots]
    while queue:
        req = queue.pop()
        name = canonical(req.name)
        if name == canonical(excluded):
            continue
        if req.marker is not None and not req.marker.evaluate(dict(env, extra="")):
            continue
        if name not in items:
            missing.append(str(req))
            continue
        new_extras = set(req.extras) - extras_seen.get(name, set())
        if name in keep and not new_extras:
            continue
        extras_seen.setdefault(name, set()).update(req.extras)
        keep[name] = items[name]
        for dep in items[name]["metadata"].get("requires_dist") or []:
            dep_req = Requirement(dep)
            active = [""] + sorted(extras_seen[name])
            if dep_req.marker is None or any(dep_req.marker.evaluate(dict(env, extra=e))
                                             for e in active):
                dep_req.marker = None  # evaluated here, for the extras of its dependent
                queue.append(dep_req)
    return keep, sorted(set(missing))


def _index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True, timeout=60)
        url = got.stdout.strip() if got.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def fetch_sdist(name: str, version: str, dest: Path) -> Path:
    """Downloads the sdist of ``name==version`` from the package index, checking its sha256.
    (``pip download`` cannot: it builds the sdist's metadata, and transformer_engine_torch's
    setup.py stops without a CUDA torch.)"""
    page = f"{_index_url()}/{canonical(name)}/"
    request = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read().decode()
        is_json = "json" in response.headers.get("Content-Type", "")
    wanted = {f"{name}-{version}.tar.gz", f"{canonical(name).replace('-', '_')}-{version}.tar.gz"}
    if is_json:
        found = [(f["url"], f.get("hashes", {}).get("sha256")) for f in json.loads(body)["files"]
                 if f["filename"] in wanted]
    else:  # a PEP 503 HTML page: <a href="URL#sha256=HEX">
        found = [(urllib.parse.urljoin(page, href.split("#")[0]),
                  (re.search(r"sha256=([0-9a-f]{64})", href) or [None, None])[1])
                 for href in re.findall(r'href="([^"]+)"', body)
                 if href.split("#")[0].rsplit("/", 1)[-1] in wanted]
    if not found:
        raise ValueError(f"--te {version}: the index {page} has no sdist of {name} {version}")
    url, sha = found[0]
    target = dest / url.rsplit("/", 1)[-1]
    with urllib.request.urlopen(url, timeout=600) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out, 4 * MIB)
    if sha and sha256_file(target) != sha:
        raise RuntimeError(f"{target.name}: sha256 differs from the index's; download it again")
    return target


def sdist_requirements(sdist: Path) -> List[str]:
    """The Requires-Dist lines of an sdist's PKG-INFO."""
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.count("/") == 1
                       and m.name.endswith("/PKG-INFO")), None)
        if member is None:
            raise ValueError(f"{sdist.name} has no PKG-INFO")
        text = tar.extractfile(member).read().decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def te_requirements(sdist: Path, version: str, cuda: str) -> Tuple[List[str], List[str]]:
    """(the core and meta wheels, the torch extension's runtime requirements) for Transformer
    Engine ``version``: the sdist names the cu12 core (its setup.py picks the core from the CUDA
    of the torch it is built against), so the core is taken for ``cuda`` instead."""
    Requirement, _ = _packaging()
    runtime = []
    for line in sdist_requirements(sdist):
        name = canonical(Requirement(line).name)
        if name == "torch" or name.startswith("transformer-engine"):
            continue
        runtime.append(line)
    return [f"transformer_engine_cu{cuda}=={version}", f"transformer_engine=={version}"], runtime


def check_te_version(version: str) -> None:
    _, Version = _packaging()
    release = Version(version).release[:2]
    low, high = TE_SUPPORTED
    if not low <= release < high:
        raise ValueError(f"--te {version}: megatron-core 0.16.1 supports Transformer Engine "
                         f"{low[0]}.{low[1]} up to {high[0]}.{high[1] - 1} (or give --te none)")


def download(items: Dict[str, dict], python_version: str, platform: str, dest: Path,
             work: Path) -> None:
    """Downloads exactly the files the resolver chose (pinned by sha256 where the index gave
    one) into ``dest``."""
    lines, hashed = [], all("sha256" in (i["download_info"].get("archive_info", {})
                                         .get("hashes") or {}) for i in items.values())
    for item in items.values():
        line = f"{item['metadata']['name']}=={item['metadata']['version']}"
        if hashed:
            line += f" --hash=sha256:{item['download_info']['archive_info']['hashes']['sha256']}"
        lines.append(line)
    (work / "pinned.txt").write_text("\n".join(sorted(lines)) + "\n")
    _pip(["download", "--no-deps", "--quiet", "-d", str(dest),
          *_pip_target_args(python_version, platform), "-r", str(work / "pinned.txt")])
    names = {p.name for p in dest.iterdir()}
    for item in items.values():
        filename = item["download_info"]["url"].rsplit("/", 1)[-1]
        if urllib.parse.unquote(filename) not in names:
            raise RuntimeError(f"pip download did not save {filename}")


def build(args) -> dict:
    """Resolves, downloads and lays out the wheelhouse at ``args.out``; returns its manifest."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise ValueError(f"--out {out}: exists and is not a wheelhouse (no {MANIFEST}); "
                         f"give an empty or new folder")
    if args.te != "none":
        check_te_version(args.te)
    stage = out.with_name(out.name + ".building")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        manifest = _build_into(stage, args)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # a half-built wheelhouse is of no use
        raise
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    return manifest


def _build_into(stage: Path, args) -> dict:
    """Fetches the Transformer Engine sdist, resolves, downloads and lays out into ``stage``."""
    env = marker_environment(args.python_version, args.platform)
    roots = GPU_PATH_REQUIREMENTS + ENCODER_REQUIREMENTS + ["torchvision"] + list(args.extra)
    te = None
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work = Path(tmp)
        if args.te != "none":
            sdist = fetch_sdist(TE_SDIST, args.te, stage)
            wheels, runtime = te_requirements(sdist, args.te, args.te_cuda)
            te = {"version": args.te, "cuda": args.te_cuda, "wheels": wheels,
                  "runtime_requirements": runtime, "sdist": sdist.name}
            roots += wheels + runtime
        roots += [r for r in BUILD_REQUIREMENTS if r not in roots]
        constraints = [f"torch=={args.torch}"]
        requested = list(roots)
        for _ in range(3):  # a dependency pip's markers dropped for its own Python: add, redo
            report = resolve(requested, constraints, args.python_version, args.platform, work)
            keep, missing = closure(report, roots, env)
            if not missing:
                break
            requested += missing
        else:
            raise RuntimeError(f"the resolution for Python {args.python_version} lacks {missing}")
        excluded = sorted(canonical(i["metadata"]["name"]) for i in report["install"]
                          if canonical(i["metadata"]["name"]) not in keep)
        print(f"resolved {len(keep)} packages for Python {args.python_version} "
              f"({args.platform}); left out torch and what only it brings: {', '.join(excluded)}")
        download(keep, args.python_version, args.platform, stage, work)
    versions = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in keep.values()}
    meta = {"python_version": args.python_version, "platform": args.platform,
            "torch": args.torch, "packages": dict(sorted(versions.items())),
            "excluded": excluded,
            "requirements": GPU_PATH_REQUIREMENTS + ENCODER_REQUIREMENTS + list(args.extra),
            "build_requirements": BUILD_REQUIREMENTS,
            "torchvision": f"torchvision=={versions['torchvision']}", "te": te}
    return layout(stage, int(args.part_mib * MIB), int(args.batch_mib * MIB), meta)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="wheelhouse", help="the wheelhouse folder (replaced)")
    parser.add_argument("--python-version", default="3.12", help="the target's Python (3.12)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="the target's newest platform tag (older manylinux tags are added)")
    parser.add_argument("--torch", default="2.11.0",
                        help="the target's torch version, resolved against but never downloaded")
    parser.add_argument("--te", default="2.11.0", metavar="VERSION",
                        help="Transformer Engine version (2.9-2.11), or 'none'")
    parser.add_argument("--te-cuda", default="13", choices=["12", "13"],
                        help="CUDA major version of the Transformer Engine core wheel")
    parser.add_argument("--extra", action="append", default=[], metavar="REQ",
                        help="another requirement to include (repeatable)")
    parser.add_argument("--part-mib", type=float, default=60,
                        help="files over this size are split into parts of at most this size")
    parser.add_argument("--batch-mib", type=float, default=64,
                        help="size limit of one copy (one batchNN/ folder)")
    args = parser.parse_args(argv)
    if args.part_mib > args.batch_mib - MANIFEST_RESERVE / MIB:
        parser.error("--part-mib must leave room for the manifest in a batch")
    try:
        manifest = build(args)
    except ValueError as err:
        print(f"wheelhouse: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:  # pip, the network
        print(f"wheelhouse: failed: {err}", file=sys.stderr)
        return 1
    te = manifest["te"]
    print(f"wrote {args.out}/: {len(manifest['files'])} files, "
          f"{manifest['total_size'] / MIB:.1f} MiB in {len(manifest['batches'])} batches; "
          f"Transformer Engine: {te['version'] + ' (cu' + te['cuda'] + ')' if te else 'none'}")
    for line in copy_plan(manifest, args.out.rstrip("/")):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
