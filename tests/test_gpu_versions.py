"""The supported version matrix of docs/gpu.md ("Supported versions"): each line agrees with the
file that sets it (pyproject.toml, the Makefile, docker/Dockerfile), and (``slow``, needs the
package index) each line that can be resolved resolves with ``pip install --dry-run`` for the
GPU machine, to exactly the versions the line names.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_vlm.gpucheck import resolve  # noqa: E402

PLATFORM = "manylinux_2_28_x86_64"
COLUMNS = ["route", "Python", "torch", "CUDA", "torchvision", "megatron-core",
           "Transformer Engine", "apex", "checked here"]


def matrix() -> dict[str, dict]:
    """The table under docs/gpu.md's "## Supported versions", by route (its first word)."""
    text = (REPO / "docs" / "gpu.md").read_text()
    section = text.split("## Supported versions", 1)
    assert len(section) == 2, "docs/gpu.md has no '## Supported versions' section"
    lines = [ln for ln in section[1].splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS, header
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split()[0]] = dict(zip(COLUMNS, cells))
    return rows


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pin(requirements: list[str], name: str) -> str:
    found = [r for r in requirements if re.match(rf"{re.escape(name)}\s*==", r)]
    assert len(found) == 1, (name, requirements)
    return found[0].split("==", 1)[1].strip()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2])


def test_the_matrix_names_each_route_once():
    assert list(matrix()) == ["pyproject", "wheelhouse", "docker"]


def test_every_line_has_a_transformer_engine_megatron_core_supports():
    low, high = resolve.TE_SUPPORTED
    for route, row in matrix().items():
        assert low <= _version(row["Transformer Engine"]) < high, (route, row)
        assert row["megatron-core"] == _pin(_pyproject()["dependencies"], "megatron-core")


def test_pyproject_line_is_what_pyproject_pins():
    row, project = matrix()["pyproject"], _pyproject()
    assert row["torch"] == _pin(project["dependencies"], "torch")
    assert row["torchvision"] == _pin(project["dependencies"], "torchvision")
    gpu_extra = " ".join(project["optional-dependencies"]["gpu"])
    bounds = dict(re.findall(r"(>=|<)\s*([\d.]+)", gpu_extra))
    assert _version(bounds[">="]) <= _version(row["Transformer Engine"]) < _version(bounds["<"])


def test_wheelhouse_line_is_what_make_wheelhouse_builds():
    row = matrix()["wheelhouse"]
    makefile = (REPO / "Makefile").read_text()

    def default(var):
        match = re.search(rf"^{var}\s*\?=\s*(\S+)", makefile, flags=re.MULTILINE)
        assert match, var
        return match.group(1)

    assert (default("WHEEL_PYTHON"), default("WHEEL_TORCH"), default("TE"),
            default("TE_CUDA")) == (row["Python"], row["torch"], row["Transformer Engine"],
                                    row["CUDA"])


def test_docker_line_is_the_base_image():
    row = matrix()["docker"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3" in dockerfile
    assert "25.11" in row["route"]
    header = " ".join(line.lstrip("# ") for line in dockerfile.splitlines()[:12])
    shipped = re.search(r"NGC PyTorch 25\.11 ships torch (\S+) .*? for CUDA (\d+)\S* on Python "
                        r"(\S+), with Transformer Engine ([\d.]+)", header)
    assert shipped, header
    torch_version, cuda, python, te = shipped.groups()
    assert torch_version.startswith(row["torch"]), (torch_version, row["torch"])
    assert (cuda, python, te) == (row["CUDA"], row["Python"], row["Transformer Engine"])


# ---------------------------------------------------------------------------------------------
# Resolved from the package index (slow: about a minute, needs the index)


# Resolving for another Python and platform takes wheels only; lm-eval needs sqlitedict, which
# is source only, so pyproject's requirements are resolved without it (it is pure Python).
SOURCE_ONLY_CLOSURE = ("lm-eval",)


def _other_requirements(leave_out: tuple) -> list[str]:
    return [r for r in _pyproject()["dependencies"]
            if not r.startswith(leave_out + SOURCE_ONLY_CLOSURE)]


def _resolved(requirements: list[str], python: str, tmp_path: Path) -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = resolve.resolve(requirements, [], python, PLATFORM, tmp_path)
    return {resolve.canonical(i["metadata"]["name"]): i["metadata"]["version"]
            for i in report["install"]}


def _cuda_major(versions: dict[str, str]) -> str:
    """The CUDA major version torch was built for, from the CUDA runtime it depends on."""
    runtime = [(n, v) for n, v in versions.items() if n.startswith("nvidia-cuda-runtime")]
    assert runtime, sorted(versions)
    name, version = runtime[0]
    match = re.search(r"-cu(\d+)$", name)
    return match.group(1) if match else version.split(".")[0]


@pytest.mark.slow
@pytest.mark.parametrize("route", ["pyproject", "wheelhouse"])
def test_line_resolves_for_the_gpu_machine(route, tmp_path):
    row = matrix()[route]
    te = row["Transformer Engine"]
    requirements = [f"torch=={row['torch']}", f"torchvision=={row['torchvision']}",
                    f"megatron-core=={row['megatron-core']}",
                    f"transformer_engine_cu{row['CUDA']}=={te}", f"transformer-engine=={te}"]
    if route == "pyproject":  # everything else pyproject asks for, beside them
        requirements += _other_requirements(("torch", "megatron-core"))
    versions = _resolved(requirements, row["Python"], tmp_path / "resolve")
    for name, column in (("torch", "torch"), ("torchvision", "torchvision"),
                         ("megatron-core", "megatron-core")):
        assert versions[name] == row[column], (name, versions.get(name))
    assert versions[f"transformer-engine-cu{row['CUDA']}"] == te
    assert _cuda_major(versions) == row["CUDA"]
    # TE's torch extension is source only: the index must have the sdist the machine builds.
    (tmp_path / "sdist").mkdir()
    sdist = resolve.fetch_sdist(resolve.TE_SDIST, te, tmp_path / "sdist")
    assert sdist.name.endswith(".tar.gz") and te in sdist.name


@pytest.mark.slow
def test_docker_line_resolves_what_the_image_does_not_bring(tmp_path):
    row = matrix()["docker"]
    image_provided = ("torch", "torchvision", "nvidia-dali", "transformer-engine")
    requirements = _other_requirements(image_provided)
    versions = _resolved([f"torch=={row['torch']}", *requirements], row["Python"], tmp_path)
    assert versions["megatron-core"] == row["megatron-core"]
    assert versions["torch"] == row["torch"]
