"""Parallel layouts on GPUs against one process (megatron_vlm.check_parallel), where the
machine has more than one GPU; each layout runs under torchrun in its own processes."""

from __future__ import annotations

import pytest
import torch
from distributed import last_json, torchrun

pytestmark = pytest.mark.gpu

LAYOUTS = {  # name: (GPUs, arguments)
    "tp2_sequence_parallel": (2, ["--tp", "2", "performance.sequence_parallel=true"]),
    "pp2_packed_documents": (2, ["--pp", "2", "data.caption_fill=text"]),
    "dp2_overlap": (2, ["--dp", "2", "--distributed-optimizer"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2", "data.caption_fill=text"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process_on_gpus(name):
    gpus, args = LAYOUTS[name]
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, {torch.cuda.device_count()} visible")
    proc = torchrun("megatron_vlm.check_parallel",
                    args + ["parallel.device=cuda", "--json", "--tolerance", "1e-4"], nproc=gpus,
                    timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert last_json(proc.stdout)["failed"] == []
