"""``make wheelhouse``: the packages an air-gapped GPU machine installs, in copies that each fit
one command's 64 MiB together with the working tree (tools/wheelhouse.py is its entry).

The wheelhouse holds, as wheels for the target Python and platform, every package of four
groups, and never torch or what only torch brings (the machine has its own CUDA torch):

* ``core``    megatron-core and what the GPU tests and the benchmark import, the test tools, and
              setuptools/wheel/packaging for the project's editable install (no build isolation
              offline);
* ``encoder`` open_clip_torch, timm and the torchvision release resolved against ``--torch``
              (the online vision encoder's GPU tests);
* ``train``   what training on real data adds: pyarrow, zstandard, Pillow, the tokenizers and
              TensorBoard;
* ``te``      with ``--te VERSION``: the ``transformer_engine_cuNN`` core wheel, the
              ``transformer_engine`` meta-package, the ``transformer_engine_torch`` sdist (its
              torch extension is compiled on the GPU machine) and the build tools it needs.

The first copy (``batch00/`` and manifest.json) holds core, encoder and every package several
groups share, so the first check carries one copy; see planner.py for the packing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from megatron_vlm.gpucheck import planner, resolve
from megatron_vlm.gpucheck.manifest import GROUP_ABOUT, MANIFEST, MANIFEST_RESERVE, MIB, canonical
from megatron_vlm.gpucheck.stages import OneLineParser

REPO = Path(__file__).resolve().parents[2]
# What the GPU tests and the benchmark import (training/step.py, model/, runtime/, the tests'
# helpers), megatron-core's own imports on that path (einops, nvtx), and the test tools.
CORE_REQUIREMENTS = [
    "megatron-core==0.16.1", "numpy", "packaging", "pyyaml", "tqdm", "psutil", "safetensors",
    "einops", "nvtx", "pytest", "pytest-timeout", "hypothesis",
]
# Installed before the rest: the project's editable install and the Transformer Engine sdist
# build run without build isolation (offline), so these must already be there. The sdist's
# setup.py imports setuptools, wheel (bdist_wheel) and packaging.
BUILD_REQUIREMENTS = ["setuptools>=64", "wheel", "packaging"]
# ninja lets torch compile TE's extension in parallel (MAX_JOBS). pybind11 is not needed: torch
# ships its headers, and TE imports the pybind11 package only for its CMake core build, which
# the core wheel replaces.
TE_BUILD_REQUIREMENTS = BUILD_REQUIREMENTS + ["ninja"]
# The online vision encoder (its GPU tests); torchvision is resolved against --torch.
ENCODER_REQUIREMENTS = ["open_clip_torch==3.3.0", "timm==1.0.31"]
# Imported by the data formats' readers, the tokenizers and the metrics log, not by the tests.
TRAIN_REQUIREMENTS = ["tokenizers", "sentencepiece", "pillow", "pyarrow", "zstandard",
                      "tensorboard"]
DEFAULT_BATCH_MIB = 56  # 64 MiB per command, less the working tree (about 2.2 MiB) and room
DEFAULT_CARRY_MIB = 64


def group_roots(args, te: Optional[dict]) -> List[dict]:
    """The groups in packing order, each with the requirements its closure starts from."""
    groups = [
        {"name": "core", "requirements": list(CORE_REQUIREMENTS),
         "install_first": list(BUILD_REQUIREMENTS)},
        {"name": "encoder", "requirements": list(ENCODER_REQUIREMENTS),
         "install_first": [], "roots_extra": ["torchvision"]},
        {"name": "train", "requirements": list(TRAIN_REQUIREMENTS), "install_first": []},
    ]
    if args.extra:
        groups.append({"name": "extra", "requirements": list(args.extra), "install_first": []})
    if te:
        groups.append({"name": "te", "requirements": te["wheels"] + te["runtime_requirements"],
                       "install_first": list(TE_BUILD_REQUIREMENTS), "sdist": te["sdist"]})
    for entry in groups:
        entry["about"] = GROUP_ABOUT[entry["name"]]
    return groups


def check_sizes(batch_bytes: int, part_bytes: int, carry_bytes: int, tree_bytes: int) -> None:
    """One-line errors for copies that could not travel with the working tree."""
    if batch_bytes + MANIFEST_RESERVE + tree_bytes > carry_bytes:
        room = (carry_bytes - MANIFEST_RESERVE - tree_bytes) / MIB
        raise ValueError(f"a copy of {batch_bytes / MIB:.1f} MiB, the manifest "
                         f"({MANIFEST_RESERVE / MIB:.0f} MiB) and the working tree "
                         f"({tree_bytes / MIB:.1f} MiB) exceed the {carry_bytes / MIB:.0f} MiB "
                         f"one command carries; give a batch size under {room:.1f} MiB")
    if part_bytes > batch_bytes - MANIFEST_RESERVE:
        raise ValueError(f"parts of {part_bytes / MIB:.1f} MiB must leave room for the manifest "
                         f"in a copy of {batch_bytes / MIB:.1f} MiB")


def build(args) -> dict:
    """Resolves, downloads and lays out the wheelhouse at ``args.out``; returns its manifest."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise ValueError(f"--out {out}: exists and is not a wheelhouse (no {MANIFEST}); "
                         f"give an empty or new folder")
    if args.te != "none":
        resolve.check_te_version(args.te)
    check_sizes(args.batch_bytes, args.part_bytes, args.carry_bytes, args.tree_bytes)
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
    """Fetches the Transformer Engine sdist, resolves every group, downloads, lays out."""
    env = resolve.marker_environment(args.python_version, args.platform)
    te, sdist = None, None
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work = Path(tmp)
        if args.te != "none":
            sdist = resolve.fetch_sdist(resolve.TE_SDIST, args.te, stage)
            wheels, runtime = resolve.te_requirements(sdist, args.te, args.te_cuda)
            te = {"version": args.te, "cuda": args.te_cuda, "wheels": wheels,
                  "runtime_requirements": runtime, "sdist": sdist.name}
        groups = group_roots(args, te)
        roots = {g["name"]: g["install_first"] + g["requirements"] + g.pop("roots_extra", [])
                 for g in groups}
        requested = list(dict.fromkeys(r for rs in roots.values() for r in rs))
        constraints = [f"torch=={args.torch}"]
        for _ in range(3):  # a dependency pip's markers dropped for its own Python: add, redo
            report = resolve.resolve(requested, constraints, args.python_version, args.platform,
                                     work)
            closures, missing = {}, []
            for name, group_root in roots.items():
                closures[name], lacking = resolve.closure(report, group_root, env)
                missing += lacking
            if not missing:
                break
            requested += sorted(set(missing))
        else:
            raise RuntimeError(f"the resolution for Python {args.python_version} lacks {missing}")
        keep = {n: i for c in closures.values() for n, i in c.items()}
        excluded = sorted(canonical(i["metadata"]["name"]) for i in report["install"]
                          if canonical(i["metadata"]["name"]) not in keep)
        print(f"resolved {len(keep)} packages for Python {args.python_version} "
              f"({args.platform}); left out torch and what only it brings: {', '.join(excluded)}")
        packages = resolve.download(keep, args.python_version, args.platform, stage, work)
    for entry in groups:
        entry["packages"] = sorted(closures[entry["name"]])
        if entry["name"] == "te":
            entry["packages"].append(canonical(resolve.TE_SDIST))
    if sdist is not None:
        packages[sdist.name] = canonical(resolve.TE_SDIST)
    versions = {n: i["metadata"]["version"] for n, i in keep.items()}
    wheel = next(f for f, p in packages.items() if p == "torchvision")
    meta = {"python_version": args.python_version, "platform": args.platform,
            "torch": args.torch, "packages": dict(sorted(versions.items())),
            "excluded": excluded, "te": te,
            "torchvision": resolve.torchvision_build(stage / wheel, keep["torchvision"]),
            "tree_size": args.tree_bytes, "carry_limit": args.carry_bytes}
    return planner.layout(stage, packages, groups, args.part_bytes, args.batch_bytes, meta)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="wheelhouse.py", description="Builds the wheelhouse for an air-gapped CUDA machine, "
        "in copies that fit one command together with the working tree.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
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
                        help="another requirement to include, in group 'extra' (repeatable)")
    parser.add_argument("--batch-mib", type=float, default=DEFAULT_BATCH_MIB,
                        help=f"size limit of one copy, a batchNN/ folder (default "
                             f"{DEFAULT_BATCH_MIB}: with the working tree and the manifest it "
                             f"must fit --carry-mib)")
    parser.add_argument("--carry-mib", type=float, default=DEFAULT_CARRY_MIB,
                        help="what one command may carry, the working tree included (64)")
    parser.add_argument("--part-mib", type=float,
                        help="files over this size are split into parts of at most this size "
                             "(default: the batch size less 1 MiB for the manifest)")
    parser.add_argument("--repo", default=str(REPO),
                        help="the checkout whose working tree travels with each copy")
    args = parser.parse_args(argv)
    for name in ("batch_mib", "carry_mib", "part_mib"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    args.batch_bytes = int(args.batch_mib * MIB)
    args.carry_bytes = int(args.carry_mib * MIB)
    args.part_bytes = (int(args.part_mib * MIB) if args.part_mib is not None
                       else args.batch_bytes - MANIFEST_RESERVE)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    args.tree_bytes, how = planner.working_tree_bytes(Path(args.repo))
    print(f"working tree: {args.tree_bytes / MIB:.1f} MiB ({how} in {args.repo}); it travels "
          f"with every copy")
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
          f"{manifest['total_size'] / MIB:.1f} MiB in {len(manifest['batches'])} copies; "
          f"Transformer Engine: {te['version'] + ' (cu' + te['cuda'] + ')' if te else 'none'}")
    for line in planner.group_lines(manifest):
        print(line)
    manifest_bytes = (Path(args.out) / MANIFEST).stat().st_size
    for line in planner.copy_lines(manifest, args.out.rstrip("/"), args.tree_bytes,
                                   args.carry_bytes, manifest_bytes):
        print(line)
    return 0
