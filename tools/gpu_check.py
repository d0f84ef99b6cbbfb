#!/usr/bin/env python3
"""The GPU checks in one command, for a CUDA machine that may have nothing but Python and torch.

    python tools/gpu_check.py [--wheelhouse DIR] [--out DIR] [--skip-install] [--quick]

Steps, each logged with its time to OUT/gpu_check.log:

  cuda        torch sees a CUDA device (else one line, "no CUDA device is visible; ...", exit 2)
  python      a virtual environment (--venv, default .gpu_venv) that sees this machine's torch,
              or the running one when this script already runs inside a virtual environment
  wheelhouse  every file and part of the wheelhouse (`make wheelhouse`) verified against its
              manifest, split files joined again
  install     the build tools, torchvision and the requirements, offline from the wheelhouse,
              never touching torch (pinned to the installed build)
  te          Transformer Engine: this machine's own if it imports, else the core wheel from the
              wheelhouse plus its torch extension built here (log: OUT/te_build.log)
  project     this checkout, `pip install --no-deps --no-build-isolation -e .`
  imports     megatron-core, megatron_vlm's training path, torchvision, open_clip
  pytest      `pytest -m gpu tests/gpu` (OUT/gpu_tests.log, OUT/gpu_tests.xml)
  bench 79m   bench/train_throughput.py --recipe 79m (OUT/throughput_79m.json), and the same for 1b

A table of the steps, the test counts and the throughput rows is printed last. The exit status
is 0 when every step passed, 1 when one failed, 2 for a machine or wheelhouse that cannot be used.
``--skip-install`` reruns the checks on an environment an earlier run installed.

Only the standard library is used here (the script runs before anything is installed); every
command it starts runs in its own process group with a time limit, and the whole group is
stopped when the command ends, times out, or this script is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wheelhouse as wh  # noqa: E402  (beside this file; standard library only)

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device is visible; was the container started with --gpus?"
# Seconds each kind of command may run.
TIMEOUTS = {"probe": 600, "venv": 300, "pip": 1800, "te_build": 3600, "pytest": 3600,
            "bench": 1800}
RECIPES = ("79m", "1b")
# Throughput columns, in this order; a key also matches with a suffix (ratio_vs_torch).
THROUGHPUT_KEYS = ("variant", "tokens_per_s", "tflops", "mfu", "peak_mem_gib", "ratio", "note")
PYTEST_LOG, PYTEST_XML, TE_LOG = "gpu_tests.log", "gpu_tests.xml", "te_build.log"

PROBE = r"""
import json, sys
out = {"python": "%d.%d.%d" % sys.version_info[:3], "executable": sys.executable}
try:
    import torch
except Exception as err:
    out["error"] = "%s: %s" % (type(err).__name__, err)
else:
    out.update(torch=torch.__version__, cuda=torch.version.cuda,
               available=torch.cuda.is_available())
    if out["available"]:
        out.update(count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0),
                   capability=list(torch.cuda.get_device_capability(0)))
from importlib import metadata
for dist in ("torchvision", "pip"):
    try:
        out[dist + "_dist"] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
print("PROBE " + json.dumps(out))
"""
TE_PROBE = r"""
import json
import transformer_engine.pytorch
from importlib import metadata
print("TE " + json.dumps(metadata.version("transformer_engine")))
"""
IMPORTS = r"""
import json
from importlib import metadata
import megatron.core, megatron_vlm.training.loop, torchvision, open_clip, pytest
print("IMPORTS " + json.dumps({d: metadata.version(d) for d in
      ("megatron-core", "megatron-vlm", "torchvision", "open_clip_torch", "timm", "pytest")}))
"""


class StepFailed(Exception):
    """A step that failed; the message is its one-line reason."""


class StepSkipped(Exception):
    """A step that did not run; the message says why."""


_running: Optional[subprocess.Popen] = None


def _stop_group(proc: subprocess.Popen) -> None:
    """Ends every process of ``proc``'s group: TERM, a grace period, then KILL."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)


def run(cmd: List[str], log_path: Path, timeout: int, env: Optional[dict] = None,
        cwd: Path = REPO, fresh: bool = False) -> Tuple[int, str]:
    """Runs ``cmd`` in its own process group with its output going to ``log_path`` (appended,
    or replaced when ``fresh``); stops the whole group when it ends or after ``timeout`` seconds.
    Returns (exit status, 124 on timeout; the last 40 lines of its output)."""
    global _running
    start = log_path.stat().st_size if log_path.exists() and not fresh else 0
    with open(log_path, "w" if fresh else "a") as log:
        shown = ("<script>" if "\n" in str(c) else str(c) for c in cmd)
        log.write(f"$ {' '.join(shown)}\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                start_new_session=True)
        _running = proc
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = 124
        finally:
            _stop_group(proc)
            _running = None
        if status == 124:
            log.write(f"[gpu_check] stopped after the {timeout} s limit\n")
    with open(log_path, errors="replace") as log:
        log.seek(start)
        tail = log.read().splitlines()[-40:]
    return status, "\n".join(tail)


def capture(cmd: List[str], log_path: Path, timeout: int, marker: str,
            env: Optional[dict] = None) -> Tuple[int, Optional[object], str]:
    """Runs ``cmd`` like :func:`run` and returns (status, the JSON after the last output line
    starting with ``marker``, or None; the output's tail)."""
    status, tail = run(cmd, log_path, timeout, env=env)
    value = None
    for line in tail.splitlines():
        if line.startswith(marker + " "):
            value = json.loads(line[len(marker) + 1:])
    return status, value, tail


class Check:
    """The steps of one run: their log lines, statuses and times."""

    def __init__(self, out: Path):
        self.out = out
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")
        self.steps: List[Tuple[str, str, float, str]] = []

    def say(self, message: str, stream=None, stamp: bool = True) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}" if stamp else message
        print(line, file=stream or sys.stdout, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def step(self, name: str, action: Callable[[], Optional[str]]) -> str:
        """Runs one step; records ok / failed / skipped, its seconds and a one-line detail."""
        self.say(f"== {name}")
        start = time.monotonic()
        try:
            detail, status = action() or "", "ok"
        except StepSkipped as why:
            detail, status = str(why), "skipped"
        except StepFailed as why:
            detail, status = str(why), "failed"
        except (wh.WheelhouseError, OSError, ValueError, RuntimeError, json.JSONDecodeError,
                subprocess.SubprocessError) as err:
            detail, status = f"{type(err).__name__}: {err}", "failed"
            with open(self.log_path, "a") as log:
                log.write(traceback.format_exc())
        seconds = time.monotonic() - start
        self.steps.append((name, status, seconds, detail))
        self.say(f"{name}: {status} ({seconds:.1f} s){': ' + detail if detail else ''}")
        return status

    def failed(self, *names: str) -> bool:
        return any(s == "failed" for n, s, _, _ in self.steps if not names or n in names)


# ---------------------------------------------------------------------------------------------
# Environment and installation
# ---------------------------------------------------------------------------------------------


def probe(python: str, out: Path) -> dict:
    """What ``python`` sees: its version, torch and CUDA, the device, torchvision and pip."""
    status, value, tail = capture([python, "-c", PROBE], out / "gpu_check.log",
                                  TIMEOUTS["probe"], "PROBE")
    if value is None:
        raise StepFailed(f"{python} did not run the torch probe (exit {status}): "
                         f"{tail.splitlines()[-1] if tail else 'no output'}")
    return value


def environment_python(args, out: Path, torch_version: str) -> str:
    """The Python the checks install into and run with: a virtual environment that sees this
    machine's packages (so torch stays the machine's build), created unless this script already
    runs in one or ``--venv none`` is given."""
    if args.venv == "none" or sys.prefix != sys.base_prefix:
        return sys.executable
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.exists():
        if args.skip_install:
            return sys.executable
        status, tail = run([sys.executable, "-m", "venv", "--system-site-packages",
                            "--without-pip", venv], out / "install.log", TIMEOUTS["venv"])
        if status != 0:
            raise StepFailed(f"python -m venv {venv} failed (exit {status}); see install.log")
    seen = probe(str(python), out)
    if seen.get("torch") != torch_version:
        raise StepFailed(f"{python} sees torch {seen.get('torch')}, not this machine's "
                         f"{torch_version}; remove {venv} and rerun")
    if "pip_dist" not in seen:
        raise StepFailed(f"{python} has no pip: install pip for {sys.executable}")
    return str(python)


def pip_install(python: str, requirements: List[str], folders: List[Path], out: Path,
                log_name: str = "install.log", extra: Tuple[str, ...] = (),
                env: Optional[dict] = None, timeout: Optional[int] = None) -> None:
    """``pip install`` offline from ``folders``, with OUT/constraints.txt (this machine's torch
    and torchvision builds) in force. ``--pre`` only lets an installed pre-release torch (NGC
    builds) satisfy ``torch>=...``: the wheelhouse holds one version of each package."""
    cmd = [python, "-m", "pip", "install", "--no-index", "--pre", "--no-input",
           "--progress-bar", "off", "--disable-pip-version-check", "-c", out / "constraints.txt"]
    for folder in folders:
        cmd += ["--find-links", folder]
    status, tail = run(cmd + list(extra) + requirements, out / log_name,
                       timeout or TIMEOUTS["pip"], env=env)
    if status != 0:
        last = [line for line in tail.splitlines() if line.strip()][-1:] or ["no output"]
        raise StepFailed(f"pip install {' '.join(requirements)[:80]} failed (exit {status}): "
                         f"{last[0][:200]}; see {log_name}")


def write_constraints(python: str, out: Path) -> dict:
    """Pins this machine's torch (and torchvision, if installed) so nothing replaces them."""
    seen = probe(python, out)
    lines = [f"torch=={seen['torch']}"]
    if "torchvision_dist" in seen:
        lines.append(f"torchvision=={seen['torchvision_dist']}")
    (out / "constraints.txt").write_text("\n".join(lines) + "\n")
    return seen


def install_requirements(python: str, manifest: dict, folders: List[Path], out: Path) -> str:
    """The build tools, torchvision (``--no-deps``, so its exact torch pin cannot pull a torch),
    then the requirements, each resolved offline from the wheelhouse."""
    seen = write_constraints(python, out)
    pip_install(python, manifest["build_requirements"], folders, out)
    if "torchvision_dist" in seen:
        note = f"kept this machine's torchvision {seen['torchvision_dist']}"
    elif manifest.get("torchvision"):
        pip_install(python, [manifest["torchvision"]], folders, out, extra=("--no-deps",))
        write_constraints(python, out)
        note = f"installed {manifest['torchvision']}"
    else:
        note = "no torchvision"
    pip_install(python, manifest["requirements"], folders, out)
    return f"{len(manifest['requirements'])} requirements; {note}"


def install_project(python: str, repo: Path, out: Path, folders: List[Path] = ()) -> str:
    """This checkout, editable, without its dependencies (pyproject.toml pins a CPU torch)."""
    if not (out / "constraints.txt").exists():
        write_constraints(python, out)
    pip_install(python, ["-e", str(repo)], list(folders), out,
                extra=("--no-deps", "--no-build-isolation"))
    return f"megatron-vlm from {repo}"


def te_build_env(python: str, device: dict, out: Path) -> dict:
    """The environment for compiling Transformer Engine's torch extension here."""
    env = dict(os.environ)
    bin_dirs = [str(Path(python).parent)]
    cuda_home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if not cuda_home and nvcc:
        cuda_home = str(Path(nvcc).resolve().parent.parent)
    if not cuda_home and Path("/usr/local/cuda/bin/nvcc").exists():
        cuda_home = "/usr/local/cuda"
    if not cuda_home or not (Path(cuda_home) / "bin" / "nvcc").exists():
        raise StepFailed("nvcc not found (set CUDA_HOME or put nvcc on PATH): Transformer "
                         "Engine's torch extension is compiled on this machine")
    bin_dirs.append(str(Path(cuda_home) / "bin"))
    major, minor = device["capability"]
    # cudnn.h and friends come with torch's nvidia-* wheels, not with the CUDA toolkit.
    status, includes, _ = capture([python, "-c", (
        "import json, os\ntry:\n import nvidia\n roots = list(nvidia.__path__)\n"
        "except ImportError:\n roots = []\n"
        "print('INC ' + json.dumps([os.path.join(r, d, 'include') for r in roots "
        "for d in sorted(os.listdir(r)) if os.path.isdir(os.path.join(r, d, 'include'))]))")],
        out / TE_LOG, TIMEOUTS["probe"], "INC")
    if includes:
        env["CPLUS_INCLUDE_PATH"] = os.pathsep.join(
            includes + ([env["CPLUS_INCLUDE_PATH"]] if env.get("CPLUS_INCLUDE_PATH") else []))
    env.update(
        CUDA_HOME=cuda_home, NVTE_FRAMEWORK="pytorch", NVTE_CUDA_ARCHS=f"{major}{minor}",
        TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count() or 4),
        # Build from source: the sdist would first try to download a prebuilt wheel.
        NVTE_PYTORCH_FORCE_BUILD="TRUE",
        # The extension's version must equal the core wheel's (no +git suffix).
        NVTE_NO_LOCAL_VERSION="1",
        PATH=os.pathsep.join(bin_dirs + [env.get("PATH", "")]))
    return env


def transformer_engine(python: str, manifest: Optional[dict], folders: List[Path],
                       device: dict, out: Path, skip_install: bool) -> str:
    """This machine's Transformer Engine if it imports; else the wheelhouse's, built here."""
    status, version, _ = capture([python, "-c", TE_PROBE], out / TE_LOG, TIMEOUTS["probe"], "TE")
    if status == 0 and version:
        low, high = wh.TE_SUPPORTED
        release = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
        note = "" if low <= release < high else " (outside the supported 2.9-2.11)"
        return f"this machine's Transformer Engine {version}{note}"
    if skip_install:
        raise StepFailed("Transformer Engine does not import and --skip-install was given")
    te = (manifest or {}).get("te")
    if not te:
        raise StepFailed("Transformer Engine does not import here and the wheelhouse has none "
                         "(built with TE=none)")
    pip_install(python, te["wheels"] + te["runtime_requirements"], folders, out, log_name=TE_LOG)
    sdist = next((f / te["sdist"] for f in folders if (f / te["sdist"]).is_file()), None)
    if sdist is None:
        raise StepFailed(f"{te['sdist']} is not in the wheelhouse")
    env = te_build_env(python, device, out)
    pip_install(python, [str(sdist)], folders, out, log_name=TE_LOG, env=env,
                extra=("--no-build-isolation", "--no-deps", "-v"), timeout=TIMEOUTS["te_build"])
    status, version, tail = capture([python, "-c", TE_PROBE], out / TE_LOG, TIMEOUTS["probe"], "TE")
    if status != 0 or not version:
        raise StepFailed(f"built, but transformer_engine.pytorch does not import: "
                         f"{tail.splitlines()[-1] if tail else ''}; see {TE_LOG}")
    return f"Transformer Engine {version} (cu{te['cuda']}) built for sm_{env['NVTE_CUDA_ARCHS']}"


# ---------------------------------------------------------------------------------------------
# Tests, benchmark and the summary
# ---------------------------------------------------------------------------------------------


def parse_junit(path: Path) -> Optional[dict]:
    """Passed/failed/skipped counts and failed test ids from a pytest JUnit XML file."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": []}
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            counts["failed"] += 1
            module = case.get("classname", "").replace(".", "/")
            counts["failed_tests"].append(f"{module}.py::{case.get('name')}")
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_pytest(python: str, out: Path) -> Tuple[str, Optional[dict]]:
    xml = out / PYTEST_XML
    xml.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    status, tail = run([python, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q",
                        "-p", "no:cacheprovider", "--junitxml", xml], out / PYTEST_LOG,
                       TIMEOUTS["pytest"], env=env, fresh=True)
    counts = parse_junit(xml)
    if status == 5:
        raise StepFailed("pytest collected no GPU tests")
    if status != 0:
        what = (f"{counts['failed']} failed" if counts else f"exit {status}")
        raise StepFailed(f"{what}; see {PYTEST_LOG}")
    return (f"{counts['passed']} passed, {counts['skipped']} skipped" if counts else ""), counts


def throughput_rows(path: Path) -> List[dict]:
    """The rows of a throughput JSON file: a list of objects, an object holding such a list, or
    an object of objects keyed by variant."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v
                 and all(isinstance(r, dict) for r in v)]
        if lists:
            data = lists[0]
        elif data and all(isinstance(v, dict) for v in data.values()):
            data = [dict(r, variant=r.get("variant", k)) for k, r in data.items()]
        else:
            data = [data]
    return [r for r in data if isinstance(r, dict)]


def run_bench(python: str, recipe: str, quick: bool, out: Path) -> str:
    script = REPO / "bench" / "train_throughput.py"
    if not script.is_file():
        raise StepSkipped("bench not found")
    target = out / f"throughput_{recipe}.json"
    target.unlink(missing_ok=True)
    cmd = [python, script, "--recipe", recipe, "--json", target] + (["--quick"] if quick else [])
    status, tail = run(cmd, out / f"bench_{recipe}.log", TIMEOUTS["bench"], fresh=True)
    if status != 0:
        raise StepFailed(f"exit {status}; see bench_{recipe}.log")
    if not target.is_file():
        raise StepFailed(f"the bench wrote no {target.name}")
    return f"{len(throughput_rows(target))} rows"


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value[:60]
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def format_table(check: Check, header: str, counts: Optional[dict],
                 throughput: Dict[str, List[dict]]) -> List[str]:
    """The summary printed last: steps, test counts, failed tests, throughput rows."""
    lines = [f"GPU check summary: {header}", f"{'step':<12} {'status':<8} {'seconds':>8}  detail"]
    for name, status, seconds, detail in check.steps:
        lines.append(f"{name:<12} {status:<8} {seconds:>8.1f}  {detail[:100]}")
    if counts is not None:
        lines.append(f"pytest -m gpu: {counts['passed']} passed, {counts['failed']} failed, "
                     f"{counts['skipped']} skipped")
        lines += [f"  failed: {name}" for name in counts["failed_tests"]]
    for recipe, rows in throughput.items():
        present = list(dict.fromkeys(k for r in rows for k in r))
        keys = [k for p in THROUGHPUT_KEYS for k in present if k == p or k.startswith(p + "_")] \
            or [k for k in present if not isinstance(rows[0].get(k), (dict, list))]
        widths = [max(len(k), *(len(_cell(r.get(k, ""))) for r in rows)) for k in keys]
        lines.append(f"throughput {recipe}:")
        lines.append("  " + "  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for row in rows:
            lines.append("  " + "  ".join(_cell(row.get(k, "")).ljust(w)
                                          for k, w in zip(keys, widths)))
    return [line.rstrip() for line in lines]


def _on_term(signum, frame):  # a stopped check stops its commands (run()'s finally) too
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split(
        "\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheelhouse", default=str(REPO / "wheelhouse"),
                        help="the wheelhouse folder (manifest.json and batchNN/ folders)")
    parser.add_argument("--out", default=str(REPO / "gpu_check_out"),
                        help="where the logs and results go")
    parser.add_argument("--venv", default=str(REPO / ".gpu_venv"),
                        help="virtual environment to install into, or 'none' for this Python")
    parser.add_argument("--skip-install", action="store_true",
                        help="reuse what an earlier run installed (a rerun on the same machine)")
    parser.add_argument("--quick", action="store_true", help="short benchmark runs")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out)
    signal.signal(signal.SIGTERM, _on_term)
    device: dict = {}

    def cuda() -> str:
        device.update(probe(sys.executable, out))
        if "error" in device:
            raise StepFailed(f"torch is not importable by {sys.executable} ({device['error']}); "
                             f"this check needs a CUDA build of torch")
        if not device["available"]:
            build = f"built for CUDA {device['cuda']}" if device["cuda"] else "a CPU-only build"
            raise StepFailed(f"{NO_CUDA} (torch {device['torch']} is {build})")
        arch = "".join(map(str, device["capability"]))
        return (f"{device['count']} x {device['name']} (sm_{arch}), torch {device['torch']}, "
                f"CUDA {device['cuda']}, Python {device['python']}")

    if check.step("cuda", cuda) != "ok":
        check.say(f"gpu_check: {check.steps[-1][3]}", stream=sys.stderr)
        return 2
    state: dict = {"python": sys.executable, "manifest": None, "folders": []}
    counts, throughput = None, {}
    try:
        def python() -> str:
            state["python"] = environment_python(args, out, device["torch"])
            return state["python"]

        def wheelhouse() -> str:
            if args.skip_install:
                raise StepSkipped("--skip-install")
            manifest = wh.load_manifest(Path(args.wheelhouse))
            want = manifest["python_version"]
            if not device["python"].startswith(want + "."):
                raise StepFailed(f"the wheelhouse is for Python {want}, this machine runs "
                                 f"{device['python']}: rebuild it with WHEEL_PYTHON=...")
            state["folders"] = wh.assemble(Path(args.wheelhouse), manifest)
            state["manifest"] = manifest
            torch_note = ("" if device["torch"].split("+")[0] == manifest["torch"] else
                          f"; resolved for torch {manifest['torch']}, this machine has "
                          f"{device['torch']}")
            return f"{len(manifest['files'])} files verified{torch_note}"

        def install_step(action):
            def step():
                if args.skip_install:
                    raise StepSkipped("--skip-install")
                if check.failed("python", "wheelhouse", "install"):
                    raise StepSkipped("an earlier install step failed")
                return action()
            return step

        check.step("python", python)
        check.step("wheelhouse", wheelhouse)
        py = lambda: state["python"]  # noqa: E731
        check.step("install", install_step(lambda: install_requirements(
            py(), state["manifest"], state["folders"], out)))

        def te() -> str:
            if check.failed("python", "wheelhouse"):
                raise StepSkipped("an earlier install step failed")
            return transformer_engine(py(), state["manifest"], state["folders"], device, out,
                                      args.skip_install)

        check.step("te", te)
        check.step("project", install_step(lambda: install_project(py(), REPO, out,
                                                                   state["folders"])))

        def imports() -> str:
            status, versions, tail = capture([py(), "-c", IMPORTS], out / "gpu_check.log",
                                             TIMEOUTS["probe"], "IMPORTS")
            if status != 0 or not versions:
                raise StepFailed(tail.splitlines()[-1] if tail else f"exit {status}")
            return ", ".join(f"{k} {v}" for k, v in versions.items())

        check.step("imports", imports)
        blocked = check.failed("python", "wheelhouse", "install", "project", "imports")

        def tests() -> str:
            nonlocal counts
            if blocked:
                raise StepSkipped("the environment is not usable")
            try:
                detail, counts = run_pytest(py(), out)
            except StepFailed:
                counts = parse_junit(out / PYTEST_XML)
                raise
            return detail

        check.step("pytest", tests)
        for recipe in RECIPES:
            def bench(recipe=recipe) -> str:
                if blocked:
                    raise StepSkipped("the environment is not usable")
                try:
                    return run_bench(py(), recipe, args.quick, out)
                finally:  # a failed variant still leaves the others' rows
                    written = out / f"throughput_{recipe}.json"
                    if written.is_file():
                        try:
                            throughput[recipe] = throughput_rows(written)
                        except (ValueError, OSError) as err:
                            check.say(f"{written.name} is not readable: {err}")
            check.step(f"bench {recipe}", bench)
    except KeyboardInterrupt:
        check.say("interrupted; the running command was stopped")
        check.steps.append(("interrupted", "failed", 0.0, "stopped before the end"))
    header = (f"{device.get('name')}, torch {device.get('torch')}, CUDA {device.get('cuda')}, "
              f"Python {device.get('python')} ({state['python']})")
    for line in format_table(check, header, counts, throughput):
        check.say(line, stamp=False)
    return 1 if check.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
