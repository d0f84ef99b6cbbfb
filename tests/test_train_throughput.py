"""bench/train_throughput.py and megatron_vlm/training/flops.py: the FLOPs formula against a
hand count, the PyTorch baseline against the project's model at equal weights, the batch mix,
and a tiny CPU run of the bench that prints its table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from megatron_vlm.config import load_config
from megatron_vlm.training import flops

BENCH = REPO_ROOT / "bench" / "train_throughput.py"


def _bench():
    """bench/train_throughput.py as a module (registered, as its dataclasses need)."""
    if "train_throughput" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_throughput"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_throughput"]


def _run_bench(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    from distributed import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_matches_a_hand_count_of_the_tiny_model():
    cfg = load_config("tiny")  # 2 layers, d 64, 4 heads, vocab 512; encoder width 32, 16 tokens
    # Per layer: QKV 64x192, output projection 64x64, q/k gains 2x64, SwiGLU hidden
    # 256*ceil(170/256) = 256: w12 64x512 and w3 256x64, two norm gains of 64.
    per_layer = 64 * 192 + 64 * 64 + 2 * 64 + 64 * 512 + 256 * 64 + 2 * 64
    matrices = 2 * per_layer + 64 + 512 * 64  # + final norm + output layer; no input embedding
    attention = 12 * 2 * 64 * 128  # 12 L d s at the recipe's sequence 128
    projector = 32 * 128 + 128 + 128 * 64 + 64  # mlp2: 32 -> 4*32 -> 64, with biases
    f_img = 16 / 128 / 8  # one image of 16 positions in a batch of 8 x 128
    expected = 6 * matrices + attention + 6 * projector * f_img
    assert flops.flops_per_token(cfg, f_img) == pytest.approx(expected, rel=1e-12)
    assert flops.flops_per_token(cfg) == pytest.approx(6 * matrices + attention, rel=1e-12)
    # The sequence length enters only the attention term.
    assert flops.flops_per_token(cfg, seq_length=256) == pytest.approx(
        6 * matrices + 2 * attention, rel=1e-12)
    text = flops.formula(cfg, f_img)
    assert f"{matrices:,}" in text and "no causal halving" in text and "bf16 peak" in text


def test_flops_counts_a_linear_projector_and_an_online_encoder():
    cfg = load_config("tiny", ["model.projector.type=linear"])
    base = flops.flops_per_token(cfg)
    assert flops.flops_per_token(cfg, 0.5) - base == pytest.approx(6 * (32 * 64 + 64) * 0.5)
    frozen = load_config("tiny", ["model.encoder.mode=online"])
    trained = load_config("tiny", ["model.encoder.mode=online", "model.encoder.frozen=false"])
    n_enc = 1000
    plain = flops.flops_per_token(load_config("tiny"), 0.25)
    assert flops.flops_per_token(frozen, 0.25, encoder_params=n_enc) - plain == pytest.approx(
        2 * n_enc * 0.25)  # forward only
    assert flops.flops_per_token(trained, 0.25, encoder_params=n_enc) - plain == pytest.approx(
        6 * n_enc * 0.25)
    with pytest.raises(ValueError, match="image_fraction"):
        flops.flops_per_token(cfg, 1.5)


def test_peak_table_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("NVIDIA GeForce RTX 4090") is None
    assert flops.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, None) is None
    batches = [{"image_mask": torch.tensor([[True, True, False, False]])},
               {"image_mask": torch.zeros(1, 4, dtype=torch.bool)}]
    assert flops.image_positions_fraction(batches) == 0.25


# ---------------------------------------------------------------------------------------------
# Batches and the baseline


def test_mixed_batch_follows_the_batch_contract_and_the_caption_share():
    from megatron_vlm.data.batch import split_microbatches

    bench = _bench()
    rows, seq, n_img = 40, 64, 16
    batch = bench.mixed_batch(rows, seq, 512, n_img, 32, caption_fraction=0.10)
    image_rows = batch["image_mask"].any(1)
    assert int(image_rows.sum()) == 4 == batch["image_embeddings"].shape[0]
    assert batch["image_embeddings"].shape == (4, n_img, 32)
    assert (batch["image_mask"][image_rows].sum(1) == n_img).all()
    assert (batch["image_mask"][image_rows][:, :n_img]).all()  # image first
    # No loss where the next position is an image position; the last image position predicts
    # the first caption token; text and caption tokens all carry loss.
    assert (batch["loss_mask"][image_rows][:, : n_img - 1] == 0).all()
    assert (batch["loss_mask"][image_rows][:, n_img - 1:] == 1).all()
    assert (batch["loss_mask"][~image_rows] == 1).all()
    torch.testing.assert_close(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    # Spread over the batch, so every micro-batch of 10 rows holds one caption row.
    assert [mb["image_embeddings"].shape[0] for mb in split_microbatches(batch, 10)] == [1] * 4
    none = bench.mixed_batch(8, seq, 512, n_img, 32, caption_fraction=0.0)
    assert not none["image_mask"].any() and none["image_embeddings"].shape[0] == 0


def _copy_megatron_weights(baseline, model, heads: int) -> None:
    """Megatron's fused QKV groups rows per head as [q_h; k_h; v_h]; the baseline's rows are
    [Q; K; V]. The SwiGLU fc1 is [gate; up] in both."""
    lm = model.language_model
    with torch.no_grad():
        baseline.embedding.weight.copy_(lm.embedding.word_embeddings.weight)
        for ours, theirs in zip(baseline.layers, lm.decoder.layers):
            attn = theirs.self_attention
            qkv = attn.linear_qkv.weight
            d = qkv.shape[1]
            ours.qkv.weight.copy_(qkv.view(heads, 3, d // heads, d).transpose(0, 1).reshape(3 * d, d))
            ours.attention_norm.weight.copy_(theirs.input_layernorm.weight)
            ours.q_norm.weight.copy_(attn.q_layernorm.weight)
            ours.k_norm.weight.copy_(attn.k_layernorm.weight)
            ours.out.weight.copy_(attn.linear_proj.weight)
            ours.ffn_norm.weight.copy_(theirs.pre_mlp_layernorm.weight)
            ours.w12.weight.copy_(theirs.mlp.linear_fc1.weight)
            ours.w3.weight.copy_(theirs.mlp.linear_fc2.weight)
        baseline.norm.weight.copy_(lm.decoder.final_layernorm.weight)
        baseline.output.weight.copy_(lm.output_layer.weight)
        fc1, fc2 = model.projector.encoder.linear_fc1, model.projector.encoder.linear_fc2
        baseline.projector[0].weight.copy_(fc1.weight)
        baseline.projector[0].bias.copy_(fc1.bias)
        baseline.projector[2].weight.copy_(fc2.weight)
        baseline.projector[2].bias.copy_(fc2.bias)


def test_baseline_forward_equals_the_project_model_at_equal_weights(runtime):
    """The baseline is the same architecture: equal logits and per-token losses in fp32."""
    from megatron_vlm.model.build import build_model

    bench = _bench()
    cfg = load_config("tiny")
    torch.manual_seed(3)
    model = build_model(cfg, use_transformer_engine=False).eval()
    with torch.no_grad():  # gains away from 1, so that a gain copied to the wrong slot shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    baseline = bench.BaselineVLM(cfg.model).eval()
    assert sum(p.numel() for p in baseline.parameters()) == sum(
        p.numel() for p in model.parameters())
    _copy_megatron_weights(baseline, model, cfg.model.decoder.num_attention_heads)
    batch = bench.mixed_batch(4, 48, 512, 16, 32, caption_fraction=0.5, seed=1)
    batch["image_embeddings"] = batch["image_embeddings"].float()
    with torch.no_grad():
        theirs = model(batch["tokens"], image_mask=batch["image_mask"],
                       image_embeddings=batch["image_embeddings"])
        ours = baseline(batch["tokens"], batch["image_mask"], batch["image_embeddings"])
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
        theirs_loss = model(batch["tokens"], labels=batch["labels"], image_mask=batch["image_mask"],
                            image_embeddings=batch["image_embeddings"])
        ours_loss = baseline(batch["tokens"], batch["image_mask"], batch["image_embeddings"],
                             batch["labels"])
    torch.testing.assert_close(ours_loss, theirs_loss, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# The command


def test_help_works():
    result = _run_bench(["--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--recipe", "--variants", "--steps", "--warmup", "--seq-length",
                 "--micro-batch-size", "--global-batch-size", "--caption-fraction", "--quick",
                 "--json", "key=value"):
        assert flag in result.stdout


def test_bad_flags_get_one_clear_line(tmp_path):
    result = _run_bench(["--variants", "torch,megatron-fast"], timeout=60)
    assert result.returncode == 2 and "--variants: unknown megatron-fast" in result.stderr
    result = _run_bench(["--recipe", "tiny", "--seq-length", "4096"], timeout=60)
    assert result.returncode == 2
    assert "--seq-length=4096 exceeds model.decoder.max_seq_length=256" in result.stderr


def test_tiny_cpu_run_prints_the_table_last(tmp_path):
    out = tmp_path / "rows.json"
    result = _run_bench(["--recipe", "tiny", "--quick", "--steps", "2", "--variants",
                         "torch,megatron-local,megatron-te,megatron-te-fp8", "--json", str(out),
                         "train.lr=1e-5"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.rstrip().splitlines()
    table = lines[-6:]
    assert table[0].split()[:3] == ["variant", "precision", "tokens/s"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert list(rows) == ["torch", "megatron-local", "megatron-te", "megatron-te-fp8"]
    assert "n/a: no CUDA device" in rows["megatron-te"]
    assert "n/a: no CUDA device" in rows["megatron-te-fp8"]
    assert "MFU = tokens/s per GPU * FLOPs/token" in result.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "CPU" and report["precision"] == "fp32"
    assert report["seq_length"] == 128 and report["global_batch_size"] == 8
    assert "--recipe tiny" in report["command"] and report["megatron_core"]
    got = {r["variant"]: r for r in report["rows"]}
    keys = {"variant", "tokens_per_s", "step_s", "tflops", "mfu", "peak_mem_gib",
            "ratio_vs_torch", "ratio_vs_compile", "note"}
    assert all(keys <= set(r) for r in report["rows"])
    for name in ("torch", "megatron-local"):
        row = got[name]
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(8 * 128 / row["step_s"])
        assert row["tflops"] == pytest.approx(
            report["flops_per_token"] * row["tokens_per_s"] / 1e12)
        assert row["mfu"] is None  # no known peak on a CPU
        # Random tokens and (almost) no learning: both stay at ln(vocab), the same task.
        assert abs(row["loss"] - math.log(512)) < 0.1, row
    assert got["torch"]["ratio_vs_torch"] == 1.0
    assert got["megatron-local"]["ratio_vs_torch"] == pytest.approx(
        got["megatron-local"]["tokens_per_s"] / got["torch"]["tokens_per_s"])
    assert got["megatron-te"]["tokens_per_s"] is None
