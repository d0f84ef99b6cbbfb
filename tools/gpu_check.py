#!/usr/bin/env python3
"""The GPU checks in stages that each fit one command on a GPU machine (Python and a CUDA
torch are all it needs; the wheelhouse from `make wheelhouse` brings the rest):

    python tools/gpu_check.py --dry-run                       # the plan, budgets, what to carry
    python tools/gpu_check.py --stages probe,install,test,bench --recipes 79m
    python tools/gpu_check.py --stages install,bench,test --recipes 1b --tests sync
    python tools/gpu_check.py --stages te                     # Transformer Engine, its own slot
    python tools/gpu_check.py --stages probe,test,bench       # everything already installed

Results go to $OUT when it is set, else --out (gpu_check_out/): summary.json, rewritten after
every step and benchmark variant, one log per stage and bench_RECIPE.json. `--help` describes
the stages; docs/gpu.md has the first-light commands. The logic is in megatron_vlm/gpucheck/.
"""

import sys
from pathlib import Path

# The checkout's own package, usable before anything is installed (standard library only).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_vlm.gpucheck.check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
