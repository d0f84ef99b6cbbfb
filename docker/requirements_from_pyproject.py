#!/usr/bin/env python3
"""The pip requirements of the megatron-vlm Docker image, read from pyproject.toml.

The image is built on an NGC PyTorch image, which already ships torch, torchvision, Transformer
Engine and DALI, compiled for its own CUDA. pyproject.toml pins torch, torchvision and DALI for the
CPU virtual environment; installing those pins in the image would replace NVIDIA's builds with
other CUDA builds. So docker/Dockerfile installs the project with ``pip install --no-deps`` and
takes every other requirement from this script, which reads pyproject.toml at build time (the
image and pyproject.toml cannot drift apart). tests/test_docker.py runs the Dockerfile's exact
invocations of this script.

Usage (from the repository root; standard library only, Python 3.11+):

  python docker/requirements_from_pyproject.py [--all-extras | --extra NAME ...]
      Prints [project].dependencies, plus the requested optional-dependency groups, minus the
      packages the base image provides: one requirement per line, exactly as pyproject.toml
      writes it, first occurrence kept.

  python docker/requirements_from_pyproject.py --constraints
      Checks that the running Python environment holds every provided package (and Transformer
      Engine within the range pyproject.toml asks for), then prints ``name==version`` for each of
      their installed distributions: a pip constraints file that stops any other requirement
      from replacing them. Exits with status 1 and a message on stderr when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

# Distributions the base image provides, as canonical-name prefixes: a name equal to an entry, or
# starting with the entry followed by "-", is provided ("nvidia-dali" covers nvidia-dali-cuda120
# and nvidia-dali-cuda130, "transformer-engine" covers transformer-engine-torch and -cu12).
PROVIDED = ("torch", "torchvision", "transformer-engine", "nvidia-dali")

# Provided packages whose installed version must satisfy the specifier pyproject.toml gives them.
# torch, torchvision and DALI are exact pins for the CPU environment; the image's own builds of
# those are the point of using it, so they are only required to be present.
RANGE_CHECKED = ("transformer-engine",)

_NAME = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_CLAUSE = re.compile(r"\s*(==|!=|<=|>=|<|>|~=)\s*([0-9][0-9A-Za-z.+!-]*)\s*")
_RELEASE = re.compile(r"(?:\d+!)?(\d+(?:\.\d+)*)")


def canonical(name: str) -> str:
    """The normalized form of a distribution name (lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The canonical distribution name a requirement string starts with."""
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return canonical(match.group(1))


def provided_group(name: str) -> Optional[str]:
    """The entry of :data:`PROVIDED` that covers ``name``, or None."""
    name = canonical(name)
    for group in PROVIDED:
        if name == group or name.startswith(group + "-"):
            return group
    return None


def load_project(pyproject: Path) -> dict:
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    if "project" not in data:
        raise ValueError(f"{pyproject} has no [project] table")
    return data["project"]


def selected_requirements(project: dict, extras: Iterable[str], all_extras: bool) -> List[str]:
    """[project].dependencies, then the chosen optional groups, in file order."""
    optional: Dict[str, List[str]] = project.get("optional-dependencies", {})
    names = list(optional) if all_extras else list(extras)
    unknown = [n for n in names if n not in optional]
    if unknown:
        raise ValueError(f"unknown optional-dependency group(s) {unknown}; "
                         f"pyproject.toml has {sorted(optional)}")
    requirements = list(project.get("dependencies", []))
    for group in names:
        requirements.extend(optional[group])
    return requirements


def image_requirements(requirements: Iterable[str]) -> List[str]:
    """The requirements pip must install in the image: all but the provided ones, deduplicated."""
    out: List[str] = []
    seen = set()
    for req in requirements:
        req = " ".join(req.split())
        if provided_group(requirement_name(req)) is None and req not in seen:
            seen.add(req)
            out.append(req)
    return out


def _release(version: str) -> Tuple[int, ...]:
    match = _RELEASE.match(version.strip())
    if not match:
        raise ValueError(f"cannot read a release number from version {version!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def _pad(a: Tuple[int, ...], b: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets a comma-separated specifier, comparing release numbers only.

    Pre-release and local labels are ignored (``2.9.0a0+abc`` counts as 2.9.0): the image's
    builds carry such labels, and the checked ranges are set on release numbers.
    """
    have = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = _CLAUSE.fullmatch(clause)
        if not match:
            raise ValueError(f"cannot read version clause {clause!r}")
        op, bound_text = match.groups()
        bound = _release(bound_text)
        a, b = _pad(have, bound)
        if op == "~=":
            prefix = bound[:-1]
            ok = a >= b and have[:len(prefix)] == prefix
        else:
            ok = {"==": a == b, "!=": a != b, "<=": a <= b, ">=": a >= b, "<": a < b, ">": a > b}[op]
        if not ok:
            return False
    return True


def _specifier(requirement: str) -> str:
    """The version specifier of a requirement string (no extras, no environment marker)."""
    rest = requirement[_NAME.match(requirement).end():].split(";", 1)[0]
    rest = re.sub(r"^\s*\[[^\]]*\]", "", rest)
    return rest.strip().strip("()")


def installed_provided() -> Dict[str, List[Tuple[str, str]]]:
    """For each provided group, the (name, version) of its installed distributions."""
    found: Dict[str, Dict[str, str]] = {group: {} for group in PROVIDED}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        group = provided_group(name) if name else None
        if group is not None:
            found[group].setdefault(canonical(name), dist.version)
    return {group: sorted(dists.items()) for group, dists in found.items()}


def constraints(requirements: Iterable[str]) -> Tuple[List[str], List[str]]:
    """(constraint lines, problems) for the provided packages of the running environment."""
    found = installed_provided()
    problems: List[str] = []
    for group in PROVIDED:
        if not found[group]:
            problems.append(f"the base image has no {group} distribution installed; it must provide "
                            f"{', '.join(PROVIDED)} (use an NGC PyTorch image)")
    for req in requirements:
        group = provided_group(requirement_name(req))
        if group not in RANGE_CHECKED or not found[group]:
            continue
        spec = _specifier(req)
        versions = dict(found[group])
        version = versions.get(group) or found[group][0][1]
        if spec and not satisfies(version, spec):
            problems.append(f"the base image has {group} {version}, but pyproject.toml asks for "
                            f"{req!r}; pick a base image tag whose {group} is in that range")
    lines = [f"{name}=={version}" for group in PROVIDED for name, version in found[group]]
    return lines, problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"),
                        help="path to pyproject.toml (default: ./pyproject.toml)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME",
                        help="also include this optional-dependency group (repeatable)")
    parser.add_argument("--all-extras", action="store_true",
                        help="include every optional-dependency group")
    parser.add_argument("--constraints", action="store_true",
                        help="check the provided packages and print constraints pinning them")
    args = parser.parse_args(argv)
    try:
        project = load_project(args.pyproject)
        if args.constraints:
            lines, problems = constraints(selected_requirements(project, (), all_extras=True))
            if problems:
                for problem in problems:
                    print(f"error: {problem}", file=sys.stderr)
                return 1
        else:
            lines = image_requirements(selected_requirements(project, args.extra, args.all_extras))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
