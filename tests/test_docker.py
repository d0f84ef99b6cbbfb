"""docker/Dockerfile against pyproject.toml, read as text (no Docker daemon, no image pulled).

The image is an NGC PyTorch image, which brings torch, torchvision, Transformer Engine and DALI
built for its CUDA. These tests check that the Dockerfile never pip-installs those four, that
every other requirement of pyproject.toml (all extras) reaches pip with its exact pin, through the
Dockerfile's own invocations of docker/requirements_from_pyproject.py, and that the checks
themselves catch the two mistakes they exist for (a requirement the image would miss, a
`pip install torch`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"
SCRIPT = "docker/requirements_from_pyproject.py"

# What the NGC PyTorch image provides, written out here independently of the script's own list,
# so that a package quietly added to the script's list shows up as a missing requirement.
PROVIDED_EXACT = {"torch", "torchvision"}
PROVIDED_PREFIXES = ("transformer-engine", "nvidia-dali")

# pip options that take a value (the value is not a requirement).
_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
    "-C", "--config-settings", "--upgrade-strategy", "--python", "--platform", "--src",
    "--cache-dir", "--log", "--progress-bar", "--global-option", "--implementation", "--abi",
    "--python-version", "--only-binary", "--no-binary", "--trusted-host", "--proxy", "--timeout",
}
_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_provided(requirement: str) -> bool:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a package name from {requirement!r}"
    name = canonical(match.group(1).rstrip("._-"))
    return name in PROVIDED_EXACT or any(name == p or name.startswith(p + "-") for p in PROVIDED_PREFIXES)


# -- reading the Dockerfile ---------------------------------------------------------------------
def instructions(text: str) -> List[Tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comment lines dropped."""
    out: List[Tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    if pending.strip():
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def shell_commands(script: str) -> List[List[str]]:
    """The simple commands of a RUN line: split on ; && || | & and parentheses."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: List[List[str]] = [[]]
    for token in lexer:
        if token in _SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def run_commands(text: str) -> List[List[str]]:
    return [cmd for word, args in instructions(text) if word == "RUN" for cmd in shell_commands(args)]


def _strip_prefix(argv: List[str]) -> List[str]:
    """Drops leading VAR=value assignments and `env [-u NAME] [VAR=value]` wrappers."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
            i += 1
        elif token == "env":
            i += 1
        elif token == "-u" and i > 0 and argv[i - 1] == "env":
            i += 2
        else:
            break
    return argv[i:]


def split_redirect(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """(arguments, file written with `>`)."""
    if ">" in argv:
        k = argv.index(">")
        return argv[:k], argv[k + 1] if k + 1 < len(argv) else None
    return argv, None


def pip_install_args(argv: List[str]) -> Optional[List[str]]:
    """The arguments after `install` when the command is a pip install, else None."""
    argv = _strip_prefix(argv)
    if not argv:
        return None
    prog = os.path.basename(argv[0])
    rest: Optional[List[str]] = None
    if re.fullmatch(r"pip3?(\.\d+)?", prog):
        rest = argv[1:]
    elif re.fullmatch(r"python3?(\.\d+)?", prog) and argv[1:3] == ["-m", "pip"]:
        rest = argv[3:]
    elif prog == "uv" and argv[1:2] == ["pip"]:
        rest = argv[2:]
    if rest is None:
        return None
    while rest and rest[0].startswith("-"):  # global options before the subcommand
        rest = rest[2:] if rest[0] in _VALUE_OPTIONS else rest[1:]
    if not rest or rest[0] != "install":
        return None
    return rest[1:]


def generator_invocations(text: str) -> List[Tuple[List[str], Optional[str]]]:
    """(script arguments, output file) for each run of the requirements script."""
    found = []
    for argv in run_commands(text):
        args, target = split_redirect(_strip_prefix(argv))
        if len(args) >= 2 and re.fullmatch(r"python3?(\.\d+)?", os.path.basename(args[0])) \
                and args[1] == SCRIPT:
            found.append((args[2:], target))
    return found


def install_problems(text: str) -> List[str]:
    """Every way the Dockerfile's pip installs break the rules; empty when they keep them."""
    generated = {target: args for args, target in generator_invocations(text) if target}
    problems: List[str] = []
    for argv in run_commands(text):
        args = pip_install_args(argv)
        if args is None:
            continue
        where = " ".join(argv)
        targets: List[str] = []
        i = 0
        while i < len(args):
            token = args[i]
            value = None
            if token in _VALUE_OPTIONS:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 2
            elif token.startswith("--") and "=" in token:
                token, value = token.split("=", 1)
                i += 1
            elif token.startswith("-"):
                i += 1
                continue
            else:
                targets.append(token)
                i += 1
                continue
            if token in ("-r", "--requirement"):
                if value not in generated or "--constraints" in generated[value]:
                    problems.append(f"`{where}` installs from {value!r}, which is not written by {SCRIPT}")
            elif token in ("-e", "--editable"):
                targets.append(value)
        for target in targets:
            if target.startswith((".", "/")) or target.startswith("file:"):
                if "--no-deps" not in args:
                    problems.append(f"`{where}` installs the project with its dependencies "
                                    f"(pyproject.toml pins the CPU torch): use --no-deps")
            elif is_provided(target):
                problems.append(f"`{where}` installs {target!r}, which the NGC PyTorch image provides")
    return problems


def requirement_lists(pyproject: Path) -> List[str]:
    """Every requirement of pyproject.toml: dependencies and every optional group."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        reqs.extend(group)
    return [" ".join(r.split()) for r in reqs]


def coverage_problems(pyproject: Path, output: List[str]) -> List[str]:
    """What the generated requirements miss of pyproject.toml, or hold that they must not."""
    expected = {r for r in requirement_lists(pyproject) if not is_provided(r)}
    got = [" ".join(line.split()) for line in output if line.strip()]
    problems = [f"requirement {r!r} of pyproject.toml is not installed by the image"
                for r in sorted(expected - set(got))]
    problems += [f"{r!r} is installed by the image although the NGC image provides it"
                 for r in got if is_provided(r)]
    problems += [f"{r!r} is installed but is not a requirement of pyproject.toml"
                 for r in sorted(set(got) - expected) if not is_provided(r)]
    if len(got) != len(set(got)):
        problems.append("a requirement is listed twice")
    return problems


def run_script(args: List[str], cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *kwargs.pop("python_flags", []), SCRIPT, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, **kwargs)


# -- the fixtures the tests share ---------------------------------------------------------------
@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def requirements_invocation(dockerfile) -> List[str]:
    """The script arguments of the Dockerfile's requirements run (the file pip installs -r)."""
    installed_from = set()
    for argv in run_commands(dockerfile):
        args = pip_install_args(argv) or []
        installed_from |= {args[k + 1] for k, a in enumerate(args[:-1]) if a in ("-r", "--requirement")}
    runs = [args for args, target in generator_invocations(dockerfile)
            if target in installed_from and "--constraints" not in args]
    assert len(runs) == 1, f"expected one run of {SCRIPT} feeding `pip install -r`; found {runs}"
    return runs[0]


# -- the tests ----------------------------------------------------------------------------------
def test_base_image_is_a_pinned_ngc_pytorch_tag(dockerfile):
    ins = instructions(dockerfile)
    args: Dict[str, str] = {}
    for word, rest in ins:
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip('"')
    froms = [rest.split()[0] for word, rest in ins if word == "FROM"]
    assert len(froms) == 1, f"one build stage expected, found FROM {froms}"
    ref = re.fullmatch(r"\$\{?(\w+)\}?", froms[0])
    assert ref and ref.group(1) in args, f"FROM {froms[0]} must name a build ARG with a default tag"
    image = args[ref.group(1)]
    match = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", image)
    assert match, f"base image {image!r} is not a pinned NGC PyTorch tag (nvcr.io/nvidia/pytorch:YY.MM-py3)"
    year, month = int(match.group(1)), int(match.group(2))
    assert year >= 25 and 1 <= month <= 12, image


def test_dockerfile_never_installs_what_the_image_provides(dockerfile):
    assert not install_problems(dockerfile)
    installs = [argv for argv in run_commands(dockerfile) if pip_install_args(argv) is not None]
    assert installs, "no pip install found"


def test_dockerfile_installs_the_project_without_dependencies(dockerfile):
    project_installs = [args for argv in run_commands(dockerfile)
                        if (args := pip_install_args(argv)) is not None
                        and any(a == "." or a.startswith(".[") for a in args)]
    assert project_installs, "the Dockerfile never installs the project (pip install ... -e .)"
    assert all("--no-deps" in args for args in project_installs)


def test_generated_requirements_cover_pyproject_exactly(requirements_invocation):
    result = run_script(requirements_invocation)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert coverage_problems(PYPROJECT, lines) == []
    # Spelled-out spot checks: exact pins present, provided packages absent.
    assert "megatron-core==0.16.1" in lines and "lm-eval==0.4.13" in lines
    provided = re.compile(r"(torch|torchvision|transformer[-_]engine|nvidia-dali)\b")
    assert not any(provided.match(line) for line in lines)


def test_pip_install_uses_generated_constraints(dockerfile):
    constraint_files = {target for args, target in generator_invocations(dockerfile)
                        if "--constraints" in args and target}
    assert constraint_files, f"the Dockerfile never writes constraints with {SCRIPT} --constraints"
    for argv in run_commands(dockerfile):
        args = pip_install_args(argv)
        if args and ("-r" in args or "--requirement" in args):
            used = {args[k + 1] for k, a in enumerate(args[:-1]) if a in ("-c", "--constraint")}
            assert used & constraint_files, f"`{' '.join(argv)}` does not pin the image's packages"


def test_dockerignore_keeps_local_environments_out():
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore


# -- the constraints mode, on a stand-in for the image's Python environment ---------------------
def _fake_environment(root: Path, dists: Dict[str, str]) -> Path:
    site = root / "site"
    for name, version in dists.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return site


NGC_25_11 = {"torch": "2.10.0a0+b558c986e8.nv25.11", "torchvision": "0.25.0a0+7a13ad0f",
             "transformer_engine": "2.9.0+70f53666", "nvidia_dali_cuda130": "1.52.0", "numpy": "2.1.0"}


def _constraints_run(dockerfile: str, site: Path) -> subprocess.CompletedProcess:
    runs = [args for args, target in generator_invocations(dockerfile) if "--constraints" in args]
    assert runs, "no constraints run in the Dockerfile"
    env = {**os.environ, "PYTHONPATH": str(site)}
    # -S: no site-packages, so only the stand-in environment's distributions are visible.
    return run_script(runs[0], env=env, python_flags=["-S"])


def test_constraints_pin_the_image_builds(dockerfile, tmp_path):
    result = _constraints_run(dockerfile, _fake_environment(tmp_path, NGC_25_11))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "torch==2.10.0a0+b558c986e8.nv25.11",
        "torchvision==0.25.0a0+7a13ad0f",
        "transformer-engine==2.9.0+70f53666",
        "nvidia-dali-cuda130==1.52.0",
    ]


@pytest.mark.parametrize("change, message", [
    ({"transformer_engine": "2.12.0+abc"}, "transformer-engine 2.12.0+abc"),
    ({"transformer_engine": "2.8.0"}, "transformer-engine 2.8.0"),
    ({"nvidia_dali_cuda130": None}, "no nvidia-dali"),
    ({"torch": None}, "no torch"),
])
def test_constraints_refuse_an_unfit_base_image(dockerfile, tmp_path, change, message):
    dists = {k: v for k, v in {**NGC_25_11, **change}.items() if v is not None}
    result = _constraints_run(dockerfile, _fake_environment(tmp_path, dists))
    assert result.returncode == 1
    assert message in result.stderr


# -- the checks above catch the mistakes they are for -------------------------------------------
@pytest.mark.parametrize("line", [
    "RUN pip install torch",
    "RUN pip install --no-cache-dir 'torch==2.13.0' tqdm",
    "RUN python -m pip install -U torchvision==0.28.0",
    "RUN set -e; pip install 'transformer-engine[pytorch]>=2.9,<2.12'",
    "RUN pip3 install transformer_engine_torch",
    "RUN uv pip install --system nvidia-dali-cuda120==2.4.0",
    "RUN PIP_NO_CACHE_DIR=1 pip install --upgrade pip && pip install -e .",
    "RUN pip install -r requirements-gpu.txt",
])
def test_install_check_catches_a_forbidden_install(dockerfile, line):
    assert install_problems(dockerfile + "\n" + line + "\n")


def test_coverage_check_catches_a_requirement_the_image_would_miss(requirements_invocation, tmp_path):
    current = run_script(requirements_invocation).stdout.splitlines()
    text = PYPROJECT.read_text()
    # A new dependency, and a new optional group: the current output lacks both.
    new_dep, new_extra = "megatron-vlm-probe-dependency==1.0", "megatron-vlm-probe-extra==2.0"
    grown = re.sub(r"(?m)^dependencies = \[\n", f'dependencies = [\n    "{new_dep}",\n', text, count=1)
    grown = re.sub(r"(?m)^\[project\.optional-dependencies\]\n",
                   f'[project.optional-dependencies]\nprobe = ["{new_extra}"]\n', grown, count=1)
    assert new_dep in grown and new_extra in grown
    (tmp_path / "pyproject.toml").write_text(grown)
    assert {new_dep, new_extra} <= set(requirement_lists(tmp_path / "pyproject.toml"))
    problems = coverage_problems(tmp_path / "pyproject.toml", current)
    assert any(new_dep in p for p in problems) and any(new_extra in p for p in problems)
    # ... and the Dockerfile's own invocation picks both up from the grown pyproject.toml.
    (tmp_path / "docker").mkdir()
    shutil.copy(REPO / SCRIPT, tmp_path / SCRIPT)
    result = run_script(requirements_invocation, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert coverage_problems(tmp_path / "pyproject.toml", result.stdout.splitlines()) == []
    # A provided package slipping into the output is caught too.
    assert coverage_problems(PYPROJECT, current + ["torch==2.13.0"])
