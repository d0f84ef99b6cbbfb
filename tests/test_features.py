"""Throughput features (performance.*, checkpoint.async_save): how they resolve per runtime,
that they reach megatron-core's config, and that recomputation changes nothing but memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_vlm.config import load_config
from megatron_vlm.runtime import features as features_module
from megatron_vlm.runtime.features import Features, resolve_features

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_cpu_mode_leaves_gpu_features_off():
    f = resolve_features(load_config("tiny"), cuda=False, transformer_engine=False)
    assert not any([f.sequence_parallel, f.overlap_grad_reduce, f.overlap_param_gather,
                    f.bias_swiglu_fusion, f.rope_fusion, f.gradient_accumulation_fusion,
                    f.cross_entropy_fusion, f.async_save])
    assert f.recompute == "none"
    assert "on: none" in f.describe()


@pytest.fixture
def apex_present(monkeypatch):
    """As on a machine where apex's fused_weight_gradient_mlp_cuda imports (the NGC image)."""
    monkeypatch.setattr(features_module, "_apex_grad_accumulation_available", lambda: True)


@pytest.fixture
def apex_absent(monkeypatch):
    monkeypatch.setattr(features_module, "_apex_grad_accumulation_available", lambda: False)


def test_gpu_run_turns_on_what_its_layout_can_use(apex_present):
    cfg = load_config("7b", ["parallel.use_distributed_optimizer=true"])  # TP=2
    f = resolve_features(cfg, cuda=True, transformer_engine=True, data_parallel=4)
    assert all([f.sequence_parallel, f.overlap_grad_reduce, f.overlap_param_gather,
                f.bias_swiglu_fusion, f.rope_fusion, f.gradient_accumulation_fusion,
                f.cross_entropy_fusion, f.async_save])
    # one GPU, TP=1, no TE: nothing that needs a larger layout or TE (apex's fusion serves the
    # local spec's linear layers too)
    f = resolve_features(load_config("1b"), cuda=True, transformer_engine=False, data_parallel=1)
    assert not (f.sequence_parallel or f.overlap_grad_reduce or f.overlap_param_gather
                or f.rope_fusion)
    assert (f.bias_swiglu_fusion and f.cross_entropy_fusion and f.async_save
            and f.gradient_accumulation_fusion)
    # false always wins
    cfg = load_config("7b", ["performance.sequence_parallel=false", "checkpoint.async_save=false"])
    f = resolve_features(cfg, cuda=True, transformer_engine=True, data_parallel=2)
    assert not f.sequence_parallel and not f.async_save


def test_gradient_accumulation_fusion_follows_apex_not_the_layer_spec(apex_absent, monkeypatch):
    """GPTModel's output layer is megatron-core's ColumnParallelLinear whatever the spec: with
    the fusion on and no apex it refuses to be built, so the TE spec alone must not turn it on."""
    from megatron.core.tensor_parallel import layers

    from megatron_vlm.model.build import decoder_transformer_config

    cfg = load_config("79m")
    for te in (True, False):
        f = resolve_features(cfg, cuda=True, transformer_engine=te, data_parallel=1)
        assert not f.gradient_accumulation_fusion
    # What megatron-core does with the resolved config: build the output layer as GPTModel does.
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)  # no apex, as here
    tiny = load_config("tiny")
    config = decoder_transformer_config(tiny, True, f, cuda=False)
    layers.ColumnParallelLinear(8, 16, config=config, init_method=config.init_method, bias=False,
                                skip_bias_add=False, gather_output=False)
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        fused = decoder_transformer_config(tiny, True, Features(gradient_accumulation_fusion=True),
                                           cuda=False)
        layers.ColumnParallelLinear(8, 16, config=fused, init_method=fused.init_method,
                                    bias=False, skip_bias_add=False, gather_output=False)


def test_gradient_accumulation_fusion_with_apex(apex_present):
    cfg = load_config("79m")
    assert resolve_features(cfg, cuda=True, transformer_engine=True).gradient_accumulation_fusion
    assert resolve_features(cfg, cuda=True, transformer_engine=False).gradient_accumulation_fusion
    assert not resolve_features(cfg, cuda=False, transformer_engine=False).gradient_accumulation_fusion


@pytest.mark.parametrize("override,dp,match", [
    ("performance.sequence_parallel=true", 1, "needs parallel.tensor_parallel > 1"),
    ("performance.overlap_param_gather=true", 2, "needs the distributed optimizer"),
    ("performance.rope_fusion=true", 1, "needs the Transformer Engine layer spec"),
    ("performance.gradient_accumulation_fusion=true", 1, "needs apex's fused_weight_gradient"),
])
def test_asking_for_what_cannot_run_is_one_clear_error(override, dp, match, apex_absent):
    cfg = load_config("1b", [override])
    with pytest.raises(ValueError, match=match):
        resolve_features(cfg, cuda=True, transformer_engine=False, data_parallel=dp)


def test_sequence_parallel_needs_a_divisible_sequence():
    cfg = load_config("7b", ["train.seq_length=1023"])
    with pytest.raises(ValueError, match="seq_length=1023 is not divisible"):
        resolve_features(cfg, cuda=True, transformer_engine=True, data_parallel=1)


def test_features_reach_megatrons_transformer_config():
    from megatron_vlm.model.build import decoder_transformer_config
    from megatron_vlm.runtime.features import Features

    cfg = load_config("tiny", ["parallel.tensor_parallel=2"])
    features = Features(sequence_parallel=True, bias_swiglu_fusion=True,
                        cross_entropy_fusion=True, recompute="full", recompute_num_layers=2)
    config = decoder_transformer_config(cfg, False, features, cuda=False)
    assert config.sequence_parallel and config.bias_activation_fusion
    assert config.cross_entropy_loss_fusion and config.cross_entropy_fusion_impl == "native"
    assert (config.recompute_granularity, config.recompute_method,
            config.recompute_num_layers) == ("full", "uniform", 2)
    config = decoder_transformer_config(cfg, False, Features(recompute="selective"), cuda=False)
    assert config.recompute_granularity == "selective" and not config.sequence_parallel


def _recomputed_run(mode, state=None):
    from megatron_vlm.data.batch import random_batch
    from megatron_vlm.model.build import build_model

    cfg = load_config("tiny", [f"performance.recompute={mode}", "performance.recompute_num_layers=1"])
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    calls = {"attention": 0, "layer": 0}
    for layer in model.language_model.decoder.layers:
        layer.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
        layer.self_attention.core_attention.register_forward_hook(
            lambda *a: calls.__setitem__("attention", calls["attention"] + 1))
    enc = cfg.model.encoder
    batch = random_batch(torch.Generator().manual_seed(5), 4, cfg.train.seq_length,
                         cfg.model.decoder.vocab_size, enc.num_image_tokens, enc.embed_dim)
    per_token = model(tokens=batch["tokens"], labels=batch["labels"],
                      image_mask=batch["image_mask"], image_embeddings=batch["image_embeddings"])
    (per_token * batch["loss_mask"]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model.state_dict(), per_token.detach(), grads, calls


def test_recomputation_gives_the_same_losses_and_gradients(runtime):
    state, loss, grads, calls = _recomputed_run("none")
    layers = load_config("tiny").model.decoder.num_layers
    assert calls == {"attention": layers, "layer": layers}
    for mode, layer_calls in (("selective", layers), ("full", 2 * layers)):
        _, other_loss, other_grads, other_calls = _recomputed_run(mode, state)
        torch.testing.assert_close(other_loss, loss)
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], msg=name)
        # the recomputation really ran: the backward pass ran the attention (selective) or
        # whole layers (full) forward again
        assert other_calls == {"attention": 2 * layers, "layer": layer_calls}, (mode, other_calls)


@pytest.mark.parametrize("recipe,override", [("79m", None), ("tiny", "parallel.device=cuda")])
def test_a_cuda_run_without_a_gpu_stops_with_one_line(tmp_path, recipe, override):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    cmd = [sys.executable, "pretrain_vlm.py", "--recipe", recipe, "data.kind=random",
           f"output_dir={tmp_path}"] + ([override] if override else [])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "no CUDA device is visible" in lines[0], done.stderr[-2000:]
    assert "--gpus" in lines[0] and "Traceback" not in done.stderr
