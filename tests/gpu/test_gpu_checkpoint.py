"""A checkpoint written on the GPU loads on the CPU with equal logits (fp32), and one written
on the CPU loads back on the GPU; the CPU side runs in its own process with no GPU visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build, tiny_cuda_config

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "checkpoint_logits.py"


def _logits(checkpoint: Path, device: str, out: Path, save: Path | None = None) -> torch.Tensor:
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(29000 + os.getpid() % 1000))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(SCRIPT), str(checkpoint), "--device", device, "--out", str(out)]
    cmd += ["--save", str(save)] if save else []
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def test_checkpoint_moves_between_gpu_and_cpu(cuda_runtime, tmp_path):
    from megatron_vlm.config import config_to_dict
    from megatron_vlm.training.checkpointing import save_checkpoint

    cfg = tiny_cuda_config("train.params_dtype=fp32")
    model = build(cfg, te=None, seed=1)  # the GPU's own spec (TE where installed)
    with torch.no_grad():  # gains away from one, so a misplaced gain would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    gpu_ckpt = save_checkpoint(tmp_path / "gpu", model, None,
                               {"step": 0, "config": config_to_dict(cfg)}, update_latest=False)
    on_gpu = _logits(gpu_ckpt, "cuda", tmp_path / "gpu_logits.pt")
    on_cpu = _logits(gpu_ckpt, "cpu", tmp_path / "cpu_logits.pt", save=tmp_path / "cpu")
    torch.testing.assert_close(on_cpu, on_gpu, atol=2e-3, rtol=2e-3)
    back = _logits(tmp_path / "cpu", "cuda", tmp_path / "back_logits.pt")
    torch.testing.assert_close(back, on_gpu, atol=1e-5, rtol=1e-5)
