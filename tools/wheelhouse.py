#!/usr/bin/env python3
"""Builds the wheelhouse for an air-gapped CUDA machine: `make wheelhouse`, or

    python tools/wheelhouse.py --out wheelhouse --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --torch 2.11.0 --te 2.11.0 --te-cuda 13 --batch-mib 56
    python tools/wheelhouse.py --te none --out /tmp/wheelhouse      # without Transformer Engine

It prints the groups, then one line per copy: the paths to carry together (the first copy is
batch00/ with manifest.json) and each copy's size with the working tree, against the 64 MiB one
command carries. The logic is in megatron_vlm/gpucheck/ (build.py, planner.py, resolve.py).
"""

import sys
from pathlib import Path

# The checkout's own package, usable before anything is installed (standard library only).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_vlm.gpucheck.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
