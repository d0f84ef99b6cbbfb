"""The offline GPU check (tools/gpu_check.py) and its wheelhouse (tools/wheelhouse.py), on the CPU.

Covered here: the command line, the no-CUDA exit, splitting files into parts and joining them
(with a corrupt and a missing part), the batch plan and manifest, the dependency closure that
leaves torch out, the summary table, and that the training path imports none of the packages
the wheelhouse leaves out. The slow test builds a wheelhouse for this machine and installs from
it offline into a fresh virtual environment with the check's own install code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_check  # noqa: E402
import wheelhouse as wh  # noqa: E402


def _run_tool(*args, timeout=120, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def test_help_of_both_tools():
    done = _run_tool(TOOLS / "gpu_check.py", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--wheelhouse", "--out", "--skip-install", "--quick"):
        assert option in done.stdout
    assert "pytest -m gpu" in done.stdout
    done = _run_tool(TOOLS / "wheelhouse.py", "--help")
    assert done.returncode == 0, done.stderr
    assert "--te" in done.stdout and "--python-version" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_no_cuda_is_one_line_and_exit_2(tmp_path):
    done = _run_tool(TOOLS / "gpu_check.py", "--out", tmp_path / "out",
                     "--wheelhouse", tmp_path / "absent")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert ("gpu_check: no CUDA device is visible; was the container started with --gpus?"
            in lines[0])
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "no CUDA device is visible" in log
    assert "== python" not in log  # nothing after the CUDA check ran


# ---------------------------------------------------------------------------------------------
# Parts, batches, manifest
# ---------------------------------------------------------------------------------------------


def _fake_wheelhouse(tmp_path, part_bytes=4000, batch_bytes=9000, reserve=500):
    rng = random.Random(0)
    src = tmp_path / "wh"
    src.mkdir(parents=True)
    big = bytes(rng.getrandbits(8) for _ in range(10_000))
    (src / "big-1.0-py3-none-any.whl").write_bytes(big)
    (src / "small-1.0-py3-none-any.whl").write_bytes(b"s" * 300)
    (src / "mid-1.0.tar.gz").write_bytes(b"m" * 3500)
    meta = {"note": "test", "requirements": [], "build_requirements": []}
    manifest = wh.layout(src, part_bytes, batch_bytes, meta, reserve=reserve)
    return src, manifest, big


def test_split_layout_and_join(tmp_path):
    src, manifest, big = _fake_wheelhouse(tmp_path)
    assert not (src / "big-1.0-py3-none-any.whl").exists()  # the original is removed
    entry = next(e for e in manifest["files"] if e["name"].startswith("big"))
    assert [p["size"] for p in entry["parts"]] == [4000, 4000, 2000]
    assert [Path(p["path"]).name for p in entry["parts"]] == [
        f"big-1.0-py3-none-any.whl.part{i:03d}" for i in range(3)]
    assert entry["size"] == len(big) and entry["sha256"] == hashlib.sha256(big).hexdigest()
    on_disk = json.loads((src / wh.MANIFEST).read_text())
    assert on_disk == manifest and on_disk["note"] == "test"
    # Every piece is in exactly one batch folder, and no batch is over its size.
    pieces = [p["path"] for e in manifest["files"] for p in e.get("parts", [e])]
    in_batches = [f for b in manifest["batches"] for f in b["files"]]
    assert sorted(pieces) == sorted(in_batches)
    for i, batch in enumerate(manifest["batches"]):
        assert batch["size"] <= 9000 - (500 if i == 0 else 0)
        assert batch["size"] == sum((src / f).stat().st_size for f in batch["files"])
        assert all(f.startswith(batch["dir"] + "/") for f in batch["files"])
    assert manifest["total_size"] == 10_000 + 300 + 3500
    folders = wh.assemble(src, wh.load_manifest(src), tmp_path / "joined")
    assert (tmp_path / "joined" / "big-1.0-py3-none-any.whl").read_bytes() == big
    assert tmp_path / "joined" in folders
    assert {f.name for f in folders} >= {b["dir"] for b in manifest["batches"]}
    # A second run reuses the joined file instead of joining again.
    joined = tmp_path / "joined" / "big-1.0-py3-none-any.whl"
    before = joined.stat().st_mtime_ns
    time.sleep(0.01)
    wh.assemble(src, manifest, tmp_path / "joined")
    assert joined.stat().st_mtime_ns == before


def test_corrupt_part_is_one_clear_line(tmp_path):
    src, manifest, _ = _fake_wheelhouse(tmp_path)
    part = next(p for e in manifest["files"] for p in e.get("parts", [])
                if p["path"].endswith(".part001"))
    data = bytearray((src / part["path"]).read_bytes())
    data[17] ^= 0xFF  # same size, other content
    (src / part["path"]).write_bytes(bytes(data))
    with pytest.raises(wh.WheelhouseError) as err:
        wh.assemble(src, manifest, tmp_path / "joined")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("corrupt ") and part["path"] in message and "sha256" in message
    assert f"copy {part['path'].split('/')[0]}/ again" in message
    assert not (tmp_path / "joined" / "big-1.0-py3-none-any.whl").exists()
    # A truncated copy is reported by its size.
    (src / part["path"]).write_bytes(bytes(data[:100]))
    with pytest.raises(wh.WheelhouseError, match=r"corrupt .*part001: 100 bytes, the manifest "
                                                   r"says 4000"):
        wh.assemble(src, manifest, tmp_path / "joined")
    # Parts that verify but do not join into the file the manifest describes.
    (src / part["path"]).write_bytes(bytes(data))
    part["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(wh.WheelhouseError, match="joined big-1.0-py3-none-any.whl from its 3 "
                                                 "parts but its sha256 differs"):
        wh.assemble(src, manifest, tmp_path / "joined")
    assert not list((tmp_path / "joined").iterdir())  # no half-joined file left behind


def test_missing_part_and_missing_file_name_their_batch(tmp_path):
    src, manifest, _ = _fake_wheelhouse(tmp_path)
    part = next(p for e in manifest["files"] for p in e.get("parts", [])
                if p["path"].endswith(".part002"))
    (src / part["path"]).unlink()
    with pytest.raises(wh.WheelhouseError) as err:
        wh.assemble(src, manifest, tmp_path / "joined")
    message = str(err.value)
    assert "\n" not in message and message.startswith("missing ") and part["path"] in message
    assert f"copy {part['path'].split('/')[0]}/ again" in message

    src2, manifest2, _ = _fake_wheelhouse(tmp_path / "second")
    small = next(e for e in manifest2["files"] if e["name"].startswith("small"))
    (src2 / small["path"]).unlink()
    with pytest.raises(wh.WheelhouseError, match="missing .*small-1.0-py3-none-any.whl"):
        wh.assemble(src2, manifest2, tmp_path / "joined2")


def test_load_manifest_errors(tmp_path):
    with pytest.raises(wh.WheelhouseError, match="manifest.json not found.*make wheelhouse"):
        wh.load_manifest(tmp_path)
    (tmp_path / wh.MANIFEST).write_text('{"format": 99}')
    with pytest.raises(wh.WheelhouseError, match="format 99"):
        wh.load_manifest(tmp_path)
    (tmp_path / wh.MANIFEST).write_text('{"format": 1, "files": [], "batches": []}')
    with pytest.raises(wh.WheelhouseError, match="'requirements' is missing"):
        wh.load_manifest(tmp_path)


def test_batch_plan():
    sizes = {"a": 6, "b": 5, "c": 4, "d": 3, "e": 2}
    plan = wh.plan_batches(sizes, capacity=10)
    assert plan == [["a", "c"], ["b", "d", "e"]]  # first fit, largest first: two full batches
    assert wh.plan_batches(sizes, capacity=10) == plan  # deterministic
    reserved = wh.plan_batches(sizes, capacity=10, reserve_first=5)
    assert sum(sizes[n] for n in reserved[0]) <= 5
    assert all(sum(sizes[n] for n in b) <= 10 for b in reserved)
    assert sorted(n for b in reserved for n in b) == sorted(sizes)
    with pytest.raises(ValueError, match="big .*larger than a batch"):
        wh.plan_batches({"big": 11}, capacity=10)
    assert wh.plan_batches({}, capacity=10) == []


def test_copy_plan_lines(tmp_path):
    _, manifest, _ = _fake_wheelhouse(tmp_path)
    lines = wh.copy_plan(manifest, "wheelhouse")
    assert len(lines) == len(manifest["batches"]) >= 2
    assert lines[0].startswith(f"copy 1/{len(lines)}: wheelhouse/batch00 wheelhouse/manifest.json")
    assert all("manifest.json" not in line for line in lines[1:])


# ---------------------------------------------------------------------------------------------
# Resolution: platforms, markers, the closure without torch
# ---------------------------------------------------------------------------------------------


def test_platform_tags_and_markers():
    tags = wh.target_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    env = wh.marker_environment("3.12", "manylinux_2_28_x86_64")
    assert env["platform_machine"] == "x86_64"  # huggingface_hub needs hf-xet there
    assert env["python_version"] == "3.12" and env["python_full_version"] == "3.12.0"
    with pytest.raises(ValueError, match="--platform"):
        wh.marker_environment("3.12", "win_amd64x")


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
    env = wh.marker_environment("3.12", "manylinux_2_28_x86_64")
    keep, missing = wh.closure(report, ["app"], env)
    assert sorted(keep) == ["app", "extra-user", "shared-lib", "speedup"]
    assert missing == []
    keep311, _ = wh.closure(report, ["app"], wh.marker_environment("3.11", "manylinux_2_28_x86_64"))
    assert "old-only" in keep311
    # A dependency the report lacks (pip evaluated markers for its own Python) is returned.
    report["install"] = [i for i in report["install"] if i["metadata"]["name"] != "speedup"]
    _, missing = wh.closure(report, ["app"], env)
    assert missing == ["speedup"]


def test_te_version_range():
    wh.check_te_version("2.11.0")
    wh.check_te_version("2.9.0")
    for bad in ("2.12.0", "2.8.1"):
        with pytest.raises(ValueError, match="supports Transformer Engine 2.9 up to 2.11"):
            wh.check_te_version(bad)


def test_wheelhouse_user_errors_are_one_line(tmp_path):
    done = _run_tool(TOOLS / "wheelhouse.py", "--out", tmp_path / "wh", "--te", "2.12.0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "wheelhouse: error: --te 2.12.0: megatron-core 0.16.1 supports Transformer Engine 2.9 "
        "up to 2.11 (or give --te none)"]
    assert not (tmp_path / "wh").exists() and not (tmp_path / "wh.building").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    done = _run_tool(TOOLS / "wheelhouse.py", "--out", tmp_path / "notes", "--te", "none")
    assert done.returncode == 2 and "exists and is not a wheelhouse" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_make_wheelhouse_passes_its_variables():
    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-n", "wheelhouse", "WHEEL_PYTHON=3.11", "TE=none",
                           "WHEELHOUSE=/tmp/wh-x", "WHEEL_TORCH=2.13.0"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    command = " ".join(done.stdout.replace("\\\n", " ").split())
    assert "tools/wheelhouse.py --out /tmp/wh-x --python-version 3.11" in command
    assert "--torch 2.13.0 --te none --te-cuda 13" in command
    defaults = subprocess.run(["make", "-n", "wheelhouse"], cwd=REPO, capture_output=True,
                              text=True, timeout=60).stdout
    assert "--python-version 3.12" in defaults and "--te 2.11.0 --te-cuda 13" in defaults


# ---------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_a" name="test_ok" time="1"/>
<testcase classname="tests.gpu.test_a" name="test_ok2" time="1"/>
<testcase classname="tests.gpu.test_b" name="test_bad" time="1"><failure message="x"/></testcase>
<testcase classname="tests.gpu.test_b" name="test_err" time="1"><error message="y"/></testcase>
<testcase classname="tests.gpu.test_c" name="test_skip" time="0"><skipped message="z"/></testcase>
</testsuite></testsuites>"""


def test_summary_table(tmp_path):
    (tmp_path / "t.xml").write_text(JUNIT)
    counts = gpu_check.parse_junit(tmp_path / "t.xml")
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (2, 2, 1)
    assert counts["failed_tests"] == ["tests/gpu/test_b.py::test_bad",
                                      "tests/gpu/test_b.py::test_err"]
    assert gpu_check.parse_junit(tmp_path / "absent.xml") is None

    # The shape bench/train_throughput.py writes: {"rows": [...], ...}, None for n/a.
    rows = [{"variant": "baseline", "tokens_per_s": 12345.6, "mfu": 0.41, "ratio_vs_torch": 1.0,
             "loss": 5.5, "note": ""},
            {"variant": "te_fp8", "tokens_per_s": 23456.7, "mfu": None, "ratio_vs_torch": 1.9,
             "loss": 5.6, "note": "n/a: no CUDA device"}]
    for form in (rows, {"rows": rows, "recipe": "79m"},
                 {r["variant"]: {k: v for k, v in r.items() if k != "variant"} for r in rows}):
        (tmp_path / "tp.json").write_text(json.dumps(form))
        got = gpu_check.throughput_rows(tmp_path / "tp.json")
        assert [r["variant"] for r in got] == ["baseline", "te_fp8"]
        assert got[1]["tokens_per_s"] == 23456.7

    def te():
        raise gpu_check.StepFailed("nvcc not found")

    def bench():
        raise gpu_check.StepSkipped("bench not found")

    check = gpu_check.Check(tmp_path)
    check.step("cuda", lambda: "1 x H200")
    check.step("te", te)
    check.step("bench 1b", bench)
    table = gpu_check.format_table(check, "H200", counts, {"79m": rows})
    text = "\n".join(table)
    assert [line.split()[:2] for line in table[2:5]] == [
        ["cuda", "ok"], ["te", "failed"], ["bench", "1b"]]
    assert "skipped" in table[4] and "bench not found" in table[4]
    assert "pytest -m gpu: 2 passed, 2 failed, 1 skipped" in text
    assert "failed: tests/gpu/test_b.py::test_bad" in text
    header = next(line for line in table if "tokens_per_s" in line).split()
    # The known keys (a suffix matches too), in their order; others (loss) left out.
    assert header == ["variant", "tokens_per_s", "mfu", "ratio_vs_torch", "note"]
    assert any(line.split()[:5] == ["te_fp8", "23,457", "n/a", "1.9", "n/a:"] for line in table)
    assert check.failed() and check.failed("te") and not check.failed("cuda", "bench 1b")


def test_commands_are_stopped_with_their_children(tmp_path):
    """A command that outlives its limit is stopped, and so is every process it started."""
    marker = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
              f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(300)\n")
    start = time.monotonic()
    status, _ = gpu_check.run([sys.executable, "-c", script], tmp_path / "log", timeout=3)
    assert status == 124 and time.monotonic() - start < 60
    child = int(marker.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild {child} is still running")
    assert "stopped after the 3 s limit" in (tmp_path / "log").read_text()


# ---------------------------------------------------------------------------------------------
# The training path imports none of what the wheelhouse leaves out
# ---------------------------------------------------------------------------------------------

TRAIN_AND_LIST_MODULES = """
import json, sys
from megatron_vlm.config import load_config
from megatron_vlm.runtime import shutdown
from megatron_vlm.training.loop import train
train(load_config("tiny", ["data.kind=random", "train.train_iters=2", "output_dir=" + sys.argv[1]]))
shutdown()
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


def test_tiny_training_path_imports_no_dali_open_clip_or_lm_eval(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(_free_port()))
    done = subprocess.run([sys.executable, "-c", TRAIN_AND_LIST_MODULES, str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("MODULES "))
    modules = json.loads(line[len("MODULES "):])
    assert "megatron_vlm.training.loop" in modules and "megatron.core" in modules  # it ran
    leaked = [m for m in modules if m.split(".")[0] in ("open_clip", "lm_eval")
              or m == "nvidia.dali" or m.startswith("nvidia.dali.")]
    assert leaked == [], leaked


def _free_port() -> int:
    from distributed import free_port

    return free_port()


# ---------------------------------------------------------------------------------------------
# The closest CPU proof of the install: a wheelhouse for this machine, installed offline
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheelhouse_for_this_machine_installs_offline(tmp_path, monkeypatch):
    if sys.version_info[:2] != (3, 11) or shutil.which("make") is None:
        pytest.skip("builds for this machine's Python 3.11 with make")
    house = tmp_path / "wheelhouse"
    done = subprocess.run(["make", "wheelhouse", "WHEEL_PYTHON=3.11", "TE=none",
                           f"WHEEL_TORCH={torch.__version__.split('+')[0]}",
                           f"WHEELHOUSE={house}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "copy 1/" in done.stdout
    manifest = wh.load_manifest(house)
    assert manifest["te"] is None and "torch" not in manifest["packages"]
    assert not any(name.startswith("nvidia-") for name in manifest["packages"])

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    # torch from this machine's local disk first, as the GPU machine has its own.
    done = subprocess.run([python, "-m", "pip", "install", "--quiet",
                           f"torch=={torch.__version__}"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    # A copy of the project, so the editable install writes nothing into this checkout.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "megatron_vlm", project / "megatron_vlm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    out = tmp_path / "out"
    out.mkdir()
    folders = wh.assemble(house, manifest)
    # Offline from the wheelhouse alone: no pip configuration's find-links or indexes.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    gpu_check.install_requirements(python, manifest, folders, out)
    gpu_check.install_project(python, project, out, folders)
    log = (out / "install.log").read_text()
    assert "--no-index" in log
    constraints = (out / "constraints.txt").read_text()
    assert f"torch=={torch.__version__}" in constraints
    done = subprocess.run([python, "-c", "import megatron_vlm.training.loop, megatron.core, torch;"
                           "print('IMPORTED', torch.__version__, megatron.core.__version__)"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"IMPORTED {torch.__version__} 0.16.1" in done.stdout
