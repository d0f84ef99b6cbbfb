"""The check's environment on the GPU machine: what Python sees, the virtual environment, the
offline installs from the wheelhouse, and Transformer Engine's build.

The functions take the check's context ``ctx`` (check.py): ``ctx.run(cmd, log, env=None,
on_tick=None)`` runs a command within the current stage's budget and returns its exit status;
``ctx.stage_log`` is the running stage's log (children.CappedLog), ``ctx.python`` the
environment's Python, ``ctx.work`` a scratch folder outside OUT, ``ctx.out`` the results folder,
``ctx.device`` the CUDA probe's record, ``ctx.repo`` the checkout. They raise StepFailed with a
one-line reason.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_vlm.gpucheck import manifest as mf
from megatron_vlm.gpucheck.children import TIMEOUT
from megatron_vlm.gpucheck.stages import StepFailed

# Each probe writes one JSON object to the file named by its first argument.
CUDA_PROBE = r"""
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
        props = torch.cuda.get_device_properties(0)
        out.update(count=torch.cuda.device_count(), name=props.name,
                   capability=[props.major, props.minor],
                   memory_gib=round(props.total_memory / 2**30, 1))
from importlib import metadata
for dist in ("torchvision", "pip", "transformer_engine"):
    try:
        out[dist + "_dist"] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
json.dump(out, open(sys.argv[1], "w"))
"""
MACHINE_PROBE = r"""
import json, os, shutil, subprocess, sys
from importlib import metadata
def command(*cmd):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (done.stdout or done.stderr).strip()[-2000:]
    except (OSError, subprocess.SubprocessError) as err:
        return "unavailable: %s" % err
out = {"cpus": os.cpu_count(),
       "nvidia_smi": command("nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,"
                             "compute_cap,power.limit,clocks.max.sm", "--format=csv,noheader"),
       "nvcc": command("nvcc", "--version").splitlines()[-1:] if shutil.which("nvcc") else None,
       "cuda_home": os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
       "disk_free_gib": round(shutil.disk_usage(".").free / 2**30, 1)}
try:
    meminfo = dict(l.split(":", 1) for l in open("/proc/meminfo"))
    out["memory_gib"] = round(int(meminfo["MemTotal"].split()[0]) / 2**20, 1)
except (OSError, KeyError, ValueError):
    pass
import torch
out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "arch_list": torch.cuda.get_arch_list(),
                "nccl": str(torch.cuda.nccl.version()) if torch.cuda.is_available() else None}
out["packages"] = dict(sorted((d.metadata["Name"], d.version) for d in metadata.distributions()
                              if d.metadata["Name"]))
json.dump(out, open(sys.argv[1], "w"))
"""
IMPORTS_PROBE = r"""
import importlib, json, sys
from importlib import metadata
out = {}
modules = [("megatron.core", "megatron-core"), ("megatron_vlm.training.loop", "megatron-vlm"),
           ("pytest", "pytest")]
if "encoder" in sys.argv[2:]:
    # As the project imports it (vision_encoder.py): torchvision made importable first.
    modules += [("megatron_vlm._compat.torchvision_shim", None), ("open_clip", "open_clip_torch"),
                ("torchvision", "torchvision"), ("timm", "timm")]
for module, dist in modules:
    try:
        loaded = importlib.import_module(module)
        if dist is None:
            loaded.ensure_torchvision_importable()
        else:
            out[dist] = metadata.version(dist)
    except Exception as err:
        out[dist or module] = "error: %s: %s" % (type(err).__name__,
                                                 (str(err).splitlines() or [""])[0][:200])
try:
    import transformer_engine.pytorch
    out["transformer-engine"] = metadata.version("transformer_engine")
except Exception:
    out["transformer-engine"] = None
json.dump(out, open(sys.argv[1], "w"))
"""


TE_PROBE = r"""
import json, sys
from importlib import metadata
try:
    import transformer_engine.pytorch
    out = {"version": metadata.version("transformer_engine")}
except Exception as err:
    out = {"error": "%s: %s" % (type(err).__name__, (str(err).splitlines() or [""])[0][:200])}
json.dump(out, open(sys.argv[1], "w"))
"""


def probe(ctx, python: str, script: str, log, args: Sequence[str] = ()) -> dict:
    """Runs one of the probes with ``python``; its JSON record."""
    record = ctx.work / "probe.json"
    record.unlink(missing_ok=True)
    status = ctx.run([python, "-c", script, record, *args], log)
    if status == TIMEOUT:
        raise StepFailed(f"{python} did not finish the probe within the stage's budget")
    try:
        return json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        last = (log.output().strip().splitlines() or ["no output"])[-1]
        raise StepFailed(f"{python} did not run the probe (exit {status}): {last[:200]}") \
            from None


def major(cuda: Optional[str]) -> Optional[str]:
    return cuda.split(".")[0] if cuda else None


def environment(ctx, venv: str, create: bool) -> str:
    """The Python the checks install into and run with: a virtual environment that sees this
    machine's packages (so torch stays the machine's build), created when ``create`` unless
    this script already runs in one or ``venv`` is 'none'; without ``create`` an existing one,
    else the running Python."""
    if venv == "none" or sys.prefix != sys.base_prefix:
        return sys.executable
    python = Path(venv) / "bin" / "python"
    log = ctx.stage_log
    if not python.exists():
        if not create:
            return sys.executable
        status = ctx.run([sys.executable, "-m", "venv", "--system-site-packages",
                          "--without-pip", venv], log)
        if status != 0:
            raise StepFailed(f"python -m venv {venv} failed (exit {status}); see "
                             f"{log.path.name}")
    seen = probe(ctx, str(python), CUDA_PROBE, log)
    if seen.get("torch") != ctx.device["torch"]:
        raise StepFailed(f"{python} sees torch {seen.get('torch')}, not this machine's "
                         f"{ctx.device['torch']}; remove {venv} and rerun")
    if "pip_dist" not in seen:
        raise StepFailed(f"{python} has no pip: install pip for {sys.executable}")
    return str(python)


def constraints(ctx) -> dict:
    """package -> version pinned for every install: this machine's torch (and torchvision, if
    installed), probed once per run and kept in WORK/constraints.txt, so nothing replaces
    them."""
    path = ctx.work / "constraints.txt"
    if not path.exists():
        seen = probe(ctx, ctx.python, CUDA_PROBE, ctx.stage_log)
        pins = {"torch": seen["torch"]}
        if "torchvision_dist" in seen:
            pins["torchvision"] = seen["torchvision_dist"]
        path.write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
    return dict(line.split("==", 1) for line in path.read_text().split())


def pin(ctx, package: str, version: str) -> None:
    """Adds ``package==version`` to the constraints (a torchvision just installed)."""
    with open(ctx.work / "constraints.txt", "a") as handle:
        handle.write(f"{package}=={version}\n")


def pip_install(ctx, requirements: List[str], folders: List[Path], log,
                extra: Sequence[str] = (), env: Optional[dict] = None) -> None:
    """``pip install`` offline from ``folders``, with the constraints (this machine's torch and
    torchvision) in force. ``--pre`` only lets an installed pre-release torch (NGC builds)
    satisfy ``torch>=...``: the wheelhouse holds one version of each package."""
    constraints(ctx)
    cmd = [ctx.python, "-m", "pip", "install", "--no-index", "--pre", "--no-input",
           "--progress-bar", "off", "--disable-pip-version-check",
           "-c", ctx.work / "constraints.txt"]
    for folder in folders:
        cmd += ["--find-links", folder]
    status = ctx.run(cmd + list(extra) + requirements, log, env=env)
    if status == TIMEOUT:
        raise StepFailed(f"pip install {' '.join(map(str, requirements))[:80]} ran out of the "
                         f"stage's budget; see {log.path.name}")
    if status != 0:
        lines = [line for line in log.output().splitlines() if line.strip()][-1:] or ["no output"]
        raise StepFailed(f"pip install {' '.join(map(str, requirements))[:80]} failed (exit "
                         f"{status}): {lines[0][:200]}; see {log.path.name}")


def torchvision_refusal(torchvision: Optional[dict], device: dict) -> Optional[str]:
    """Why the wheelhouse's torchvision cannot go next to this machine's torch (one line), or
    None: a torchvision pins the exact torch release and is built for one CUDA major version."""
    if not torchvision:
        return None
    torch_release = device["torch"].split("+")[0]
    pin = torchvision.get("torch") or ""
    if pin.startswith("==") and pin[2:].split("+")[0] != torch_release:
        return (f"the wheelhouse's {torchvision['requirement']} is built for torch {pin[2:]}, "
                f"this machine has torch {device['torch']}: rebuild the wheelhouse with "
                f"WHEEL_TORCH={torch_release}")
    built = torchvision.get("cuda")
    if built and built != "cpu" and device.get("cuda") and major(built) != major(device["cuda"]):
        return (f"the wheelhouse's {torchvision['requirement']} is built for CUDA {built}, this "
                f"machine's torch for CUDA {device['cuda']}: install a matching torchvision "
                f"here, or install without the encoder group")
    return None


def install_group(ctx, manifest: dict, name: str, folders: List[Path]) -> str:
    """One group's build tools, (for the encoder) torchvision without its dependencies so its
    exact torch pin cannot pull a torch, then its requirements, offline."""
    entry = mf.group(manifest, name)
    log = ctx.stage_log
    pinned = constraints(ctx)
    if entry.get("install_first"):
        pip_install(ctx, entry["install_first"], folders, log)
    note = ""
    if name == "encoder":
        if "torchvision" in pinned:
            note = f"; kept this machine's torchvision {pinned['torchvision']}"
        else:
            refusal = torchvision_refusal(manifest.get("torchvision"), ctx.device)
            if refusal:
                raise StepFailed(refusal)
            torchvision = manifest["torchvision"]
            pip_install(ctx, [torchvision["requirement"]], folders, log, extra=("--no-deps",))
            pin(ctx, "torchvision", torchvision["version"])
            note = f"; installed {torchvision['requirement']}"
    pip_install(ctx, entry["requirements"], folders, log)
    return f"{len(entry['requirements'])} requirements ({len(entry['packages'])} packages){note}"


def install_project(ctx, folders: List[Path]) -> str:
    """This checkout, editable, without its dependencies (pyproject.toml pins a CPU torch)."""
    pip_install(ctx, ["-e", str(ctx.repo)], folders, ctx.stage_log,
                extra=("--no-deps", "--no-build-isolation"))
    return f"megatron-vlm from {ctx.repo}"


def check_imports(ctx, groups: Sequence[str]) -> dict:
    """Imports the training path, megatron-core and pytest (and open_clip and torchvision for
    the encoder group); their versions, and Transformer Engine's or None."""
    versions = probe(ctx, ctx.python, IMPORTS_PROBE, ctx.stage_log, list(groups))
    broken = {k: v for k, v in versions.items() if isinstance(v, str) and v.startswith("error")}
    if broken:
        name, why = next(iter(broken.items()))
        raise StepFailed(f"{name} does not import: {why[7:]}")
    return versions


# ---------------------------------------------------------------------------------------------
# Transformer Engine
# ---------------------------------------------------------------------------------------------


def te_version(ctx) -> str:
    """The version of the Transformer Engine that ``ctx.python`` imports (its torch extension
    included); StepFailed with the import's error otherwise."""
    found = probe(ctx, ctx.python, TE_PROBE, ctx.stage_log)
    if "error" in found:
        raise StepFailed(f"transformer_engine.pytorch does not import: {found['error']}")
    return found["version"]


def te_cuda_refusal(te: dict, device: dict) -> Optional[str]:
    """Why the wheelhouse's TE core wheel cannot serve this machine's torch (one line), or None.
    The core wheel is built for one CUDA major version; the extension built here links it."""
    if device.get("cuda") and te["cuda"] != major(device["cuda"]):
        return (f"the wheelhouse's Transformer Engine core is transformer_engine_cu{te['cuda']}, "
                f"this machine's torch is built for CUDA {device['cuda']}: rebuild the "
                f"wheelhouse with TE_CUDA={major(device['cuda'])}")
    return None


def te_build_env(ctx) -> dict:
    """The environment for compiling Transformer Engine's torch extension here."""
    env = dict(os.environ)
    bin_dirs = [str(Path(ctx.python).parent)]
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
    cap_major, cap_minor = ctx.device["capability"]
    # cudnn.h and friends come with torch's nvidia-* wheels, not with the CUDA toolkit.
    includes = probe(ctx, ctx.python, (
        "import json, os, sys\ntry:\n import nvidia\n roots = list(nvidia.__path__)\n"
        "except ImportError:\n roots = []\n"
        "json.dump([os.path.join(r, d, 'include') for r in roots for d in sorted(os.listdir(r))"
        " if os.path.isdir(os.path.join(r, d, 'include'))], open(sys.argv[1], 'w'))"),
        ctx.stage_log)
    if includes:
        env["CPLUS_INCLUDE_PATH"] = os.pathsep.join(
            includes + ([env["CPLUS_INCLUDE_PATH"]] if env.get("CPLUS_INCLUDE_PATH") else []))
    env.update(
        CUDA_HOME=cuda_home, NVTE_FRAMEWORK="pytorch", NVTE_CUDA_ARCHS=f"{cap_major}{cap_minor}",
        TORCH_CUDA_ARCH_LIST=f"{cap_major}.{cap_minor}", MAX_JOBS=str(os.cpu_count() or 4),
        # Build from source: the sdist would first try to download a prebuilt wheel.
        NVTE_PYTORCH_FORCE_BUILD="TRUE",
        # The extension's version must equal the core wheel's (no +git suffix).
        NVTE_NO_LOCAL_VERSION="1",
        PATH=os.pathsep.join(bin_dirs + [env.get("PATH", "")]))
    return env


def build_te(ctx, manifest: dict, folders: List[Path], keep_wheel_mib: float) -> str:
    """Installs the TE group's wheels and builds the torch extension from the sdist into a
    wheel (``pip wheel``), then installs that wheel. The built wheel is copied to OUT when it
    is at most ``keep_wheel_mib`` (so it can come back and spare the next machine the build)."""
    te, entry, log = manifest["te"], mf.group(manifest, "te"), ctx.stage_log
    pip_install(ctx, entry["install_first"], folders, log)
    pip_install(ctx, entry["requirements"], folders, log)
    sdist = next((f / entry["sdist"] for f in folders if (f / entry["sdist"]).is_file()), None)
    if sdist is None:
        raise StepFailed(f"{entry['sdist']} is not in the verified copies")
    built = ctx.work / "te_wheel"
    shutil.rmtree(built, ignore_errors=True)
    env = te_build_env(ctx)
    status = ctx.run([ctx.python, "-m", "pip", "wheel", "--no-index", "--no-deps",
                      "--no-build-isolation", "-v", "-w", built, sdist], log, env=env)
    if status != 0:
        why = "ran out of the stage's budget" if status == TIMEOUT else f"failed (exit {status})"
        raise StepFailed(f"building {entry['sdist']} {why}; see {log.path.name}")
    wheel = next(built.glob("*.whl"))
    pip_install(ctx, [str(wheel)], [], log, extra=("--no-deps",))
    size_mib = wheel.stat().st_size / mf.MIB
    kept = ""
    if size_mib <= keep_wheel_mib:
        shutil.copy(wheel, ctx.out / wheel.name)
        kept = f"; {wheel.name} ({size_mib:.1f} MiB) kept in OUT"
    return f"Transformer Engine {te['version']} (cu{te['cuda']}) built for " \
           f"sm_{env['NVTE_CUDA_ARCHS']}{kept}"
