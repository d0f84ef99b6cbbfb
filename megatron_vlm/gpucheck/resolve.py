"""pip's resolution for the GPU machine, the closure of each group, and the downloads (run where
the package index is reachable, by ``make wheelhouse``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_vlm.fsutil import sha256_file
from megatron_vlm.gpucheck.manifest import MIB, canonical

# megatron-core 0.16.1 supports Transformer Engine 2.9 up to 2.11 (pyproject's gpu extra agrees).
TE_SUPPORTED = ((2, 9), (2, 12))
TE_SDIST = "transformer_engine_torch"


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
             work: Path) -> Dict[str, str]:
    """Downloads exactly the files the resolver chose (pinned by sha256 where the index gave
    one) into ``dest``. Returns file name -> the canonical package name it holds."""
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
    files = {}
    for package, item in items.items():
        filename = urllib.parse.unquote(item["download_info"]["url"].rsplit("/", 1)[-1])
        if filename not in names:
            raise RuntimeError(f"pip download did not save {filename}")
        files[filename] = package
    return files


def torchvision_build(wheel: Path, item: dict) -> dict:
    """What a torchvision wheel is built for: its requirement, the torch it pins (from its
    metadata) and its CUDA version ("13.0"; "cpu"; None when the wheel does not say), from the
    local tag of the ``__version__`` in ``torchvision/version.py`` (``0.26.0+cu130``) or else
    the CUDA runtime it bundles (``libcudart.*.so.13``)."""
    Requirement, _ = _packaging()
    pins = [str(r.specifier) for r in map(Requirement, item["metadata"].get("requires_dist") or [])
            if canonical(r.name) == "torch"]
    cuda: Optional[str] = None
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("torchvision/version.py").decode()
        names = archive.namelist()
    local = re.search(r"^__version__\s*=\s*['\"][^+'\"]*\+([a-z0-9]+)['\"]", source, re.M)
    bundled = [m for m in (re.search(r"libcudart[^/]*\.so\.(\d+)$", n) for n in names) if m]
    if local and re.fullmatch(r"cu\d{3,}", local[1]):
        cuda = f"{local[1][2:-1]}.{local[1][-1]}"
    elif local and local[1] == "cpu":
        cuda = "cpu"
    elif bundled:
        cuda = bundled[0][1]
    version = item["metadata"]["version"]
    return {"requirement": f"torchvision=={version}", "version": version,
            "torch": pins[0] if pins else "", "cuda": cuda}
