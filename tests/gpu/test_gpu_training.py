"""Training on CUDA: both layer specs, FP8, the linear projector, document masks, the online
encoder, and a forward pass without host synchronisation. Needs a GPU (and TE where named).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch_on_cuda, build, copy_weights, per_token_loss, tiny_cuda_config, train

pytestmark = pytest.mark.gpu


def _on_cuda(model) -> None:
    wrong = [n for n, p in model.named_parameters() if p.device.type != "cuda"]
    wrong += [n for n, b in model.named_buffers() if b.device.type != "cuda"]
    assert not wrong, f"not on the GPU: {wrong[:5]}"


@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
def test_bf16_training_steps_on_cuda(cuda_runtime, te, request):
    if te:
        request.getfixturevalue("transformer_engine")
    cfg = tiny_cuda_config("train.train_iters=20")
    model = build(cfg, te)
    _on_cuda(model)
    assert model.language_model.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    losses = train(cfg, model, 20)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_te_spec_matches_local_spec(cuda_runtime, transformer_engine):
    """Same weights: fp32 forward agrees closely, and 20 bf16 training steps stay close."""
    cfg32 = tiny_cuda_config("train.params_dtype=fp32")
    local, te = build(cfg32, False), build(cfg32, True)
    copy_weights(local, te)
    batch = batch_on_cuda(cfg32)
    with torch.no_grad():
        torch.testing.assert_close(per_token_loss(te, batch), per_token_loss(local, batch),
                                   atol=2e-3, rtol=2e-3)
    cfg = tiny_cuda_config("train.train_iters=20")
    local, te = build(cfg, False), build(cfg, True)
    copy_weights(local, te)
    a, b = train(cfg, local, 20), train(cfg, te, 20)
    assert all(abs(x - y) <= 0.02 * abs(x) for x, y in zip(a, b)), (a, b)


def test_fp8_hybrid_tracks_bf16_over_60_steps(cuda_runtime, transformer_engine):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    # widths that FP8 GEMMs accept (multiples of 16)
    shape = ["model.decoder.hidden_size=128", "model.decoder.num_attention_heads=4",
             "train.train_iters=60", "train.lr=1e-3"]
    cfg = tiny_cuda_config(*shape)
    cfg8 = tiny_cuda_config(*shape, "train.fp8=hybrid")
    bf16, fp8 = build(cfg, True), build(cfg8, True)
    copy_weights(bf16, fp8)
    a, b = train(cfg, bf16, 60), train(cfg8, fp8, 60)
    assert all(math.isfinite(x) for x in b)
    last_a, last_b = sum(a[-5:]) / 5, sum(b[-5:]) / 5
    assert abs(last_b - last_a) <= 0.03 * last_a, (last_a, last_b)
    # the projector stayed out of FP8 (its config has none)
    assert fp8.projector.config.fp8 is None and fp8.config.fp8 == "hybrid"


def test_linear_projector_builds_and_trains_under_te(cuda_runtime, transformer_engine):
    cfg = tiny_cuda_config("model.projector.type=linear", "train.train_iters=5")
    model = build(cfg, True)
    losses = train(cfg, model, 5)
    assert all(math.isfinite(x) for x in losses)


def test_te_packed_documents_equal_dense_mask_sdpa(cuda_runtime, transformer_engine):
    """The TE attention on packed sequences against the local spec's SDPA with a dense mask,
    same weights, same GPU (bf16): positions that carry loss agree."""
    cfg = tiny_cuda_config("data.caption_fill=text")
    local, te = build(cfg, False, packed_documents=False), build(cfg, True)
    assert te.packed_documents
    copy_weights(local, te)
    batch = batch_on_cuda(cfg, rows=4, documents=True)
    docs = dict(segment_ids=batch["segment_ids"], cu_seqlens=batch["cu_seqlens"],
                max_seqlen=batch["max_seqlen"])
    with torch.no_grad():
        dense = per_token_loss(local, batch, **docs).float()
        packed = per_token_loss(te, batch, **docs).float()
        causal = per_token_loss(local, batch).float()
    keep = batch["loss_mask"] > 0
    torch.testing.assert_close(packed[keep], dense[keep], atol=3e-2, rtol=3e-2)
    # documents were really separated (plain causal attention differs)
    assert (causal[keep] - dense[keep]).abs().max() > 1e-2


@pytest.mark.parametrize("frozen", [True, False])
def test_online_encoder_runs_in_bf16_and_trains_when_unfrozen(cuda_runtime, frozen):
    cfg = tiny_cuda_config("model.encoder.mode=online",
                           f"model.encoder.frozen={str(frozen).lower()}", "train.train_iters=3")
    model = build(cfg, False)
    weights = {n: p.detach().clone() for n, p in model.vision_encoder.named_parameters()}
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cuda"
               for p in model.vision_encoder.parameters())
    losses = train(cfg, model, 3)
    assert all(math.isfinite(x) for x in losses)
    changed = [n for n, p in model.vision_encoder.named_parameters()
               if not torch.equal(p.detach(), weights[n])]
    if frozen:
        assert not changed
    else:
        assert changed


@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
def test_forward_and_backward_do_not_synchronise_with_the_host(cuda_runtime, te, request):
    """Through megatron's DDP wrapper (TE's fused gradient accumulation needs its main_grad
    buffers), with every throughput feature the run resolves."""
    from megatron_vlm.training.step import setup_training

    if te:
        request.getfixturevalue("transformer_engine")
    cfg = tiny_cuda_config()
    ddp = setup_training(build(cfg, te), cfg).model
    batch = batch_on_cuda(cfg)
    (per_token_loss(ddp, batch) * batch["loss_mask"]).sum().backward()  # warm-up: lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (per_token_loss(ddp, batch) * batch["loss_mask"]).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
def test_train_step_does_not_synchronise_with_the_host(cuda_runtime, te, request):
    """A whole train step (micro-batches with and without images, megatron's schedule, DDP,
    gradient normalization and clipping, the optimizer) that is not a log step: no operation
    may wait for the GPU. tests/test_host_sync.py checks the same on the CPU by operation."""
    from megatron_vlm.training.loop import make_batches
    from megatron_vlm.training.step import setup_training, summarize_losses, train_step

    if te:
        request.getfixturevalue("transformer_engine")
    cfg = tiny_cuda_config("train.micro_batch_size=1", "train.global_batch_size=4")
    state = setup_training(build(cfg, te), cfg)
    next_step, _ = make_batches(cfg, 0, 1, None)
    train_step(state, next_step(), 4, cfg, summarize=False)  # warm-up: lazy init, compiles
    microbatches = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                     for k, v in mb.items()} for mb in next_step()]
    assert any(bool(mb["image_mask"].any()) for mb in microbatches)
    assert not all(bool(mb["image_mask"].any()) for mb in microbatches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = train_step(state, microbatches, 4, cfg, summarize=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(summarize_losses(out["loss_sums"])["loss"])


def test_device_micro_batches_copy_every_batch_intact(cuda_runtime):
    from megatron_vlm.training.device_batches import DeviceMicroBatches

    host = [{"tokens": torch.arange(4096).reshape(64, 64) + i, "max_seqlen": i}
            for i in range(6)]
    seen = list(DeviceMicroBatches(host, torch.device("cuda", torch.cuda.current_device())))
    assert [b["max_seqlen"] for b in seen] == list(range(6))
    for i, b in enumerate(seen):
        assert b["tokens"].device.type == "cuda"
        assert torch.equal(b["tokens"].cpu(), host[i]["tokens"])
