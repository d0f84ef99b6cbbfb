"""The wheelhouse (tools/wheelhouse.py, megatron_vlm/gpucheck/{manifest,planner,resolve,build}.py)
on the CPU: the copy plan with realistic sizes (every copy fits one command with the working
tree; the first copy holds what the first check installs), splitting and joining, verifying
only the groups installed, the dependency closure that leaves torch out, and the command line.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from megatron_vlm.gpucheck import build, planner, resolve
from megatron_vlm.gpucheck import manifest as mf

REPO = Path(__file__).resolve().parent.parent
MIB = mf.MIB

# ---------------------------------------------------------------------------------------------
# The copy plan with the sizes of a real `make wheelhouse` (Python 3.12, manylinux_2_28_x86_64,
# torch 2.11.0, TE 2.11.0 cu13): MiB per package, and each group's closure.
# ---------------------------------------------------------------------------------------------

SIZES_MIB = {
    "transformer-engine-cu13": 170.94, "pyarrow": 52.49, "numpy": 14.99, "onnx": 8.47,
    "torchvision": 7.17, "grpcio": 7.02, "pillow": 6.81, "sympy": 6.01, "zstandard": 5.29,
    "tensorboard": 5.26, "hf-xet": 4.09, "tokenizers": 3.24, "nvtx": 2.91, "timm": 2.67,
    "megatron-core": 2.49, "pydantic-core": 2.16, "sentencepiece": 1.64, "open-clip-torch": 1.48,
    "pygments": 1.19, "hypothesis": 1.12, "setuptools": 1.01, "huggingface-hub": 0.82,
    "pyyaml": 0.81, "wcwidth": 0.78, "regex": 0.78, "onnxscript": 0.72, "transformer-engine": 0.69,
    "mpmath": 0.51, "safetensors": 0.49, "pydantic": 0.47, "ml-dtypes": 0.44, "pytest": 0.39,
    "protobuf": 0.33, "filelock": 0.23, "transformer-engine-torch": 0.23, "werkzeug": 0.22,
    "fsspec": 0.21, "onnx-ir": 0.18, "ninja": 0.17, "psutil": 0.15, "packaging": 0.13,
    "absl-py": 0.13, "anyio": 0.13, "click": 0.12, "markdown": 0.11, "httpx2": 0.10,
    "httpcore2": 0.08, "tqdm": 0.08, "idna": 0.07, "einops": 0.06, "typing-extensions": 0.04,
    "ftfy": 0.04, "h11": 0.04, "importlib-metadata": 0.03, "wheel": 0.03,
    "sortedcontainers": 0.03, "pluggy": 0.03, "markupsafe": 0.02, "truststore": 0.02,
    "typing-inspection": 0.01, "pytest-timeout": 0.01, "annotated-types": 0.01,
    "lazy-importer": 0.01, "zipp": 0.01, "iniconfig": 0.01, "tensorboard-data-server": 0.01,
}
CORE = ["einops", "hypothesis", "iniconfig", "megatron-core", "numpy", "nvtx", "packaging",
        "pluggy", "psutil", "pygments", "pytest", "pytest-timeout", "pyyaml", "safetensors",
        "setuptools", "sortedcontainers", "tqdm", "wheel"]
HUB = ["anyio", "click", "filelock", "fsspec", "h11", "hf-xet", "httpcore2", "httpx2",
       "huggingface-hub", "idna", "numpy", "packaging", "pyyaml", "tqdm", "truststore",
       "typing-extensions"]
ENCODER = HUB + ["ftfy", "open-clip-torch", "pillow", "regex", "safetensors", "timm",
                 "torchvision", "wcwidth"]
TRAIN = HUB + ["absl-py", "grpcio", "markdown", "markupsafe", "pillow", "protobuf", "pyarrow",
               "sentencepiece", "setuptools", "tensorboard", "tensorboard-data-server",
               "tokenizers", "werkzeug", "zstandard"]
TE = ["annotated-types", "einops", "importlib-metadata", "lazy-importer", "ml-dtypes", "mpmath",
      "ninja", "numpy", "onnx", "onnx-ir", "onnxscript", "packaging", "protobuf", "pydantic",
      "pydantic-core", "setuptools", "sympy", "transformer-engine", "transformer-engine-cu13",
      "transformer-engine-torch", "typing-extensions", "typing-inspection", "wheel", "zipp"]
REAL_GROUPS = [{"name": "core", "packages": CORE}, {"name": "encoder", "packages": ENCODER},
               {"name": "train", "packages": TRAIN}, {"name": "te", "packages": TE}]
TREE_BYTES = int(2.2 * MIB)


def _real_files() -> dict:
    return {f"{p}-1.0-py3-none-any.whl": (int(mib * MIB), p) for p, mib in SIZES_MIB.items()}


def test_every_copy_fits_one_command_with_the_tree_and_the_first_holds_the_first_check():
    files = _real_files()
    batch = build.DEFAULT_BATCH_MIB * MIB
    part = batch - mf.MANIFEST_RESERVE  # the default --part-mib
    build.check_sizes(batch, part, build.DEFAULT_CARRY_MIB * MIB, TREE_BYTES)
    pieces = planner.pieces_of(files, REAL_GROUPS, part)
    te_parts = [n for n in pieces if ".part" in n]
    assert len(te_parts) == 4  # the 171 MiB core wheel in parts
    plan = planner.plan_copies(pieces, [g["name"] for g in REAL_GROUPS], batch)
    sizes = [sum(pieces[n][0] for n in names) for names in plan]
    for index, size in enumerate(sizes):
        carried = size + TREE_BYTES + (mf.MANIFEST_RESERVE if index == 0 else 0)
        assert carried <= 64 * MIB, (index, carried / MIB)
    assert sorted(n for names in plan for n in names) == sorted(pieces)  # each piece once
    needs = planner.group_batches(plan, files, REAL_GROUPS)
    # The first check (core and encoder) carries the first copy alone; no TE file is needed.
    assert needs["core"] == [0] and needs["encoder"] == [0]
    first = {files[n][1] for n in plan[0] if n in files}
    assert set(CORE) | set(ENCODER) <= first
    assert not any(".part" in n for n in plan[0])
    # Every group needs the first copy and its own copies, and no copy of another group.
    owners = {}
    for name, indexes in needs.items():
        for index in indexes[1:]:
            owners.setdefault(index, set()).add(name)
    assert all(len(names) == 1 for names in owners.values()), owners
    assert needs["te"][0] == 0 and len(needs["te"]) == 5 and len(plan) == 7


def test_a_copy_too_big_for_the_tree_is_one_clear_error():
    with pytest.raises(ValueError) as err:
        build.check_sizes(62 * MIB, 61 * MIB, 64 * MIB, TREE_BYTES)
    message = str(err.value)
    assert "\n" not in message and "exceed the 64 MiB one command carries" in message
    assert "give a batch size under 60.8 MiB" in message
    with pytest.raises(ValueError, match="must leave room for the manifest"):
        build.check_sizes(56 * MIB, 56 * MIB, 64 * MIB, TREE_BYTES)


def test_working_tree_is_measured_by_git_and_without_it(tmp_path):
    size, how = planner.working_tree_bytes(REPO)
    assert how == "git ls-files" and 100_000 < size < 30 * MIB
    (tmp_path / "a.py").write_text("x" * 1000)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.pyc").write_bytes(b"y" * 5000)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big").write_bytes(b"z" * 7000)
    size, how = planner.working_tree_bytes(tmp_path)  # not a git checkout
    assert (size, how) == (1000, "a walk of the folder (no git)")


def test_batch_plan_first_fit_and_sections():
    pieces = {"a": (6, ""), "b": (5, ""), "c": (4, "x"), "d": (3, "y"), "e": (2, "x")}
    plan = planner.plan_copies(pieces, ["x", "y"], capacity=10, reserve_first=0)
    # Largest first within the first section, then x's pieces into the first copy or x's own,
    # then y's: never into x's copy.
    assert plan == [["a", "c"], ["b"], ["e"], ["d"]]
    assert planner.plan_copies(pieces, ["x", "y"], 10, 0) == plan  # deterministic
    with pytest.raises(ValueError, match="big .*larger than a copy"):
        planner.plan_copies({"big": (11, "")}, [], capacity=10)
    assert planner.plan_copies({}, [], capacity=10) == []
    groups = [{"name": "core", "packages": ["n", "p"]}, {"name": "x", "packages": ["p", "q"]},
              {"name": "y", "packages": ["r"]}]
    assert planner.sections(groups) == {"n": "", "p": "", "q": "x", "r": "y"}


# ---------------------------------------------------------------------------------------------
# Layout, parts, verification of a group's files
# ---------------------------------------------------------------------------------------------

GROUPS = [{"name": "core", "packages": ["small", "mid"], "requirements": []},
          {"name": "te", "packages": ["big", "small"], "requirements": []}]


def _fake_wheelhouse(tmp_path, part_bytes=4000, batch_bytes=9000, reserve=500):
    rng = random.Random(0)
    src = tmp_path / "wh"
    src.mkdir(parents=True)
    big = bytes(rng.getrandbits(8) for _ in range(10_000))
    (src / "big-1.0-py3-none-any.whl").write_bytes(big)
    (src / "small-1.0-py3-none-any.whl").write_bytes(b"s" * 300)
    (src / "mid-1.0.tar.gz").write_bytes(b"m" * 3500)
    packages = {"big-1.0-py3-none-any.whl": "big", "small-1.0-py3-none-any.whl": "small",
                "mid-1.0.tar.gz": "mid"}
    meta = {"note": "test", "python_version": "3.12", "torch": "2.11.0"}
    manifest = planner.layout(src, packages, GROUPS, part_bytes, batch_bytes, meta,
                              reserve=reserve)
    return src, manifest, big


def test_split_layout_and_join(tmp_path):
    src, manifest, big = _fake_wheelhouse(tmp_path)
    assert not (src / "big-1.0-py3-none-any.whl").exists()  # the original is removed
    entry = next(e for e in manifest["files"] if e["name"].startswith("big"))
    assert [p["size"] for p in entry["parts"]] == [4000, 4000, 2000]
    assert [Path(p["path"]).name for p in entry["parts"]] == [
        f"big-1.0-py3-none-any.whl.part{i:03d}" for i in range(3)]
    assert entry["size"] == len(big) and entry["sha256"] == hashlib.sha256(big).hexdigest()
    on_disk = json.loads((src / mf.MANIFEST).read_text())
    assert on_disk == manifest and on_disk["note"] == "test"
    # Every piece is in exactly one batch folder, and no batch is over its size.
    pieces = [p["path"] for e in manifest["files"] for p in e.get("parts", [e])]
    assert sorted(pieces) == sorted(f for b in manifest["batches"] for f in b["files"])
    for i, batch in enumerate(manifest["batches"]):
        assert batch["size"] <= 9000 - (500 if i == 0 else 0)
        assert batch["size"] == sum((src / f).stat().st_size for f in batch["files"])
    # core (and the shared small package) in the first copy; te in the first and its own.
    core, te = (mf.group(manifest, n)["batches"] for n in ("core", "te"))
    assert core == ["batch00"] and te == ["batch00", "batch01"]
    folders = mf.verify_groups(src, mf.load_manifest(src), ["te"], tmp_path / "joined")
    assert (tmp_path / "joined" / "big-1.0-py3-none-any.whl").read_bytes() == big
    assert tmp_path / "joined" in folders
    # A second run reuses the joined file instead of joining again.
    joined = tmp_path / "joined" / "big-1.0-py3-none-any.whl"
    before = joined.stat().st_mtime_ns
    time.sleep(0.01)
    mf.verify_groups(src, manifest, ["te"], tmp_path / "joined")
    assert joined.stat().st_mtime_ns == before


def test_a_group_is_verified_from_its_own_copies_only(tmp_path):
    src, manifest, _ = _fake_wheelhouse(tmp_path)
    for batch in mf.group(manifest, "te")["batches"][1:]:
        shutil.rmtree(src / batch)  # te's own copies never arrived
    folders = mf.verify_groups(src, manifest, ["core"])
    assert folders == [src / "batch00"]
    with pytest.raises(mf.WheelhouseError) as err:
        mf.verify_groups(src, manifest, ["core", "te"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("groups core, te need ")
    assert f"{src}/batch01" in message and "carry it" in message
    with pytest.raises(mf.WheelhouseError, match=r"no group 'encoder'; it has: core, te"):
        mf.verify_groups(src, manifest, ["encoder"])


def test_corrupt_part_is_one_clear_line(tmp_path):
    src, manifest, _ = _fake_wheelhouse(tmp_path)
    part = next(p for e in manifest["files"] for p in e.get("parts", [])
                if p["path"].endswith(".part001"))
    data = bytearray((src / part["path"]).read_bytes())
    data[17] ^= 0xFF  # same size, other content
    (src / part["path"]).write_bytes(bytes(data))
    with pytest.raises(mf.WheelhouseError) as err:
        mf.verify_groups(src, manifest, ["te"], tmp_path / "joined")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("corrupt ") and part["path"] in message and "sha256" in message
    assert f"copy {part['path'].split('/')[0]}/ again" in message
    assert not (tmp_path / "joined" / "big-1.0-py3-none-any.whl").exists()
    (src / part["path"]).write_bytes(bytes(data[:100]))  # a truncated copy: named by its size
    with pytest.raises(mf.WheelhouseError, match=r"corrupt .*part001: 100 bytes, the manifest "
                                                 r"says 4000"):
        mf.verify_groups(src, manifest, ["te"], tmp_path / "joined")
    # Parts that verify but do not join into the file the manifest describes.
    (src / part["path"]).write_bytes(bytes(data))
    part["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(mf.WheelhouseError, match="joined big-1.0-py3-none-any.whl from its 3 "
                                                 "parts but its sha256 differs"):
        mf.verify_groups(src, manifest, ["te"], tmp_path / "joined")
    assert not list((tmp_path / "joined").iterdir())  # no half-joined file left behind
    # The core group does not hold that file: it still verifies.
    mf.verify_groups(src, manifest, ["core"], tmp_path / "joined")


def test_missing_file_names_its_batch(tmp_path):
    src, manifest, _ = _fake_wheelhouse(tmp_path)
    small = next(e for e in manifest["files"] if e["name"].startswith("small"))
    (src / small["path"]).unlink()
    with pytest.raises(mf.WheelhouseError) as err:
        mf.verify_groups(src, manifest, ["core"])
    assert str(err.value).startswith(f"missing {src / small['path']}: copy batch00/ again")


def test_load_manifest_errors(tmp_path):
    with pytest.raises(mf.WheelhouseError, match="manifest.json not found.*make wheelhouse"):
        mf.load_manifest(tmp_path)
    (tmp_path / mf.MANIFEST).write_text('{"format": 1}')
    with pytest.raises(mf.WheelhouseError, match="format 1, this tool reads format 2; rebuild"):
        mf.load_manifest(tmp_path)
    (tmp_path / mf.MANIFEST).write_text('{"format": 2, "files": [], "batches": []}')
    with pytest.raises(mf.WheelhouseError, match="'groups' is missing"):
        mf.load_manifest(tmp_path)


def test_copy_and_group_lines(tmp_path):
    _, manifest, _ = _fake_wheelhouse(tmp_path)
    lines = planner.copy_lines(manifest, "wheelhouse", TREE_BYTES, 64 * MIB)
    assert len(lines) == len(manifest["batches"]) == 2
    assert lines[0].startswith("copy 1/2: wheelhouse/batch00 wheelhouse/manifest.json  (")
    assert "with the working tree; for core, te)" in lines[0]
    assert all("manifest.json" not in line for line in lines[1:])
    assert planner.group_lines(manifest)[0].startswith("group core: 2 packages")
    assert planner.group_lines(manifest)[1].endswith("in copies 1, 2")
    assert lines[1].endswith("for te)")


# ---------------------------------------------------------------------------------------------
# Resolution: platforms, markers, the closure without torch, torchvision's build
# ---------------------------------------------------------------------------------------------


def test_platform_tags_and_markers():
    tags = resolve.target_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    env = resolve.marker_environment("3.12", "manylinux_2_28_x86_64")
    assert env["platform_machine"] == "x86_64"  # huggingface_hub needs hf-xet there
    assert env["python_version"] == "3.12" and env["python_full_version"] == "3.12.0"
    with pytest.raises(ValueError, match="--platform"):
        resolve.marker_environment("3.12", "win_amd64x")


def _item(name, version="1.0", requires=()):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "download_info": {"url": f"https://x/{name}-{version}-py3-none-any.whl"}}


def test_closure_leaves_out_torch_and_only_what_it_brings():
    report = {"install": [
        _item("app", requires=["torch>=2", "Shared_Lib", 'old-only; python_version < "3.12"',
                               "extra-user[fast]"]),
        _item("torch", requires=["nvidia-x", "shared-lib", "sympy"]),
        _item("nvidia-x"), _item("sympy"), _item("shared.lib"), _item("old-only"),
        _item("extra-user", requires=['speedup; extra == "fast"', 'slowdown; extra == "slow"']),
        _item("speedup"), _item("slowdown"),
    ]}
    env = resolve.marker_environment("3.12", "manylinux_2_28_x86_64")
    keep, missing = resolve.closure(report, ["app"], env)
    assert sorted(keep) == ["app", "extra-user", "shared-lib", "speedup"]
    assert missing == []
    keep311, _ = resolve.closure(report, ["app"],
                                 resolve.marker_environment("3.11", "manylinux_2_28_x86_64"))
    assert "old-only" in keep311
    report["install"] = [i for i in report["install"] if i["metadata"]["name"] != "speedup"]
    _, missing = resolve.closure(report, ["app"], env)
    assert missing == ["speedup"]


@pytest.mark.parametrize("version_py, libs, cuda", [
    ("__version__ = '0.26.0+cu130'\n", [], "13.0"),
    ("__version__ = '0.26.0+cpu'\n", [], "cpu"),
    ("__version__ = '0.26.0'\n", ["torchvision.libs/libcudart.faf08d9a.so.12"], "12"),
    ("__version__ = '0.26.0'\n", [], None),
])
def test_torchvision_build_is_read_from_its_wheel(tmp_path, version_py, libs, cuda):
    wheel = tmp_path / "torchvision-0.26.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("torchvision/version.py", version_py)
        for name in libs:
            archive.writestr(name, b"")
    item = _item("torchvision", "0.26.0", ["numpy", "torch==2.11.0", "pillow!=8.3.*,>=5.3.0"])
    assert resolve.torchvision_build(wheel, item) == {
        "requirement": "torchvision==0.26.0", "version": "0.26.0", "torch": "==2.11.0",
        "cuda": cuda}


def test_te_version_range():
    resolve.check_te_version("2.11.0")
    resolve.check_te_version("2.9.0")
    for bad in ("2.12.0", "2.8.1"):
        with pytest.raises(ValueError, match="supports Transformer Engine 2.9 up to 2.11"):
            resolve.check_te_version(bad)


# ---------------------------------------------------------------------------------------------
# The command line and make
# ---------------------------------------------------------------------------------------------


def _run_tool(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "tools" / "wheelhouse.py"),
                           *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_wheelhouse_help_and_user_errors_are_one_line(tmp_path):
    done = _run_tool("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--te", "--python-version", "--batch-mib", "--carry-mib", "--part-mib"):
        assert option in done.stdout
    done = _run_tool("--out", tmp_path / "wh", "--te", "2.12.0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "wheelhouse: error: --te 2.12.0: megatron-core 0.16.1 supports Transformer Engine 2.9 "
        "up to 2.11 (or give --te none)"]
    assert not (tmp_path / "wh").exists() and not (tmp_path / "wh.building").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    done = _run_tool("--out", tmp_path / "notes", "--te", "none")
    assert done.returncode == 2 and "exists and is not a wheelhouse" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    done = _run_tool("--out", tmp_path / "wh", "--te", "none", "--batch-mib", "63")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        "wheelhouse: error: a copy of 63.0 MiB, the manifest (1 MiB) and the working tree")
    done = _run_tool("--batch-mib", "-3")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "wheelhouse.py: error: --batch-mib must be positive (see --help)"]


def test_make_wheelhouse_passes_its_variables():
    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-n", "wheelhouse", "WHEEL_PYTHON=3.11", "TE=none",
                           "WHEELHOUSE=/tmp/wh-x", "WHEEL_TORCH=2.13.0", "WHEEL_BATCH_MIB=40"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    command = " ".join(done.stdout.replace("\\\n", " ").split())
    assert "tools/wheelhouse.py --out /tmp/wh-x --python-version 3.11" in command
    assert "--torch 2.13.0 --te none --te-cuda 13 --batch-mib 40" in command
    defaults = " ".join(subprocess.run(["make", "-n", "wheelhouse"], cwd=REPO,
                                       capture_output=True, text=True,
                                       timeout=60).stdout.replace("\\\n", " ").split())
    assert "--python-version 3.12" in defaults
    assert f"--te 2.11.0 --te-cuda 13 --batch-mib {build.DEFAULT_BATCH_MIB}" in defaults
