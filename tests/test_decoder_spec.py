"""The decoder block's own modules: full-width qk-norm (TP=1 fused, TP>1 one all-reduce each
way, what autograd keeps), sequence-parallel marks on the norms, and the SDPA core attention
with packed (THD) sequences and selective recompute.

Run as a script under torchrun, this file is also the 2-rank worker of the TP=2 qk-norm test.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.model.decoder_spec import (
    FullWidthQKNorm,
    GainOnlyLayerNorm,
    SDPACoreAttention,
    decoder_layer_spec,
    sharded_width_layer_norm,
)

HEADS, HEAD_DIM = 4, 8
WIDTH = HEADS * HEAD_DIM


def make_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(num_layers=1, hidden_size=WIDTH, num_attention_heads=HEADS,
                  kv_channels=HEAD_DIM, ffn_hidden_size=64, add_bias_linear=False,
                  gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
                  masked_softmax_fusion=False, apply_rope_fusion=False,
                  gradient_accumulation_fusion=False, persist_layer_norm=False,
                  attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                  params_dtype=torch.float32)
    fields.update(overrides)
    return TransformerConfig(**fields)


def identity(t):
    return t


def full_width_reference(x, weight, eps=1e-5):
    """The OpenLM qk-norm: a gain-only layer_norm over heads * head_dim."""
    shape = x.shape
    flat = x.reshape(*shape[:-2], shape[-2] * shape[-1])
    return F.layer_norm(flat, (flat.shape[-1],), weight, None, eps).reshape(shape)


# ---------------------------------------------------------------------------------- qk-norm


def test_qk_norm_tp1_matches_full_width_layer_norm_forward_and_grads(runtime):
    norm = FullWidthQKNorm(make_config(), HEAD_DIM)
    assert norm.tp == 1
    with torch.no_grad():
        norm.weight.copy_(torch.randn(WIDTH) * 0.5 + 1)
    x = (torch.randn(6, 2, HEADS, HEAD_DIM) * 3 + 0.7).requires_grad_()
    dy = torch.randn(6, 2, HEADS, HEAD_DIM)
    out = norm(x)
    out.backward(dy)

    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    ref = full_width_reference(x64, w64)
    ref.backward(dy.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


def test_sharded_width_layer_norm_gradcheck_against_layer_norm_float64():
    torch.manual_seed(0)
    x = (torch.randn(3, 5, WIDTH, dtype=torch.float64) * 2 + 0.3).requires_grad_()
    w = torch.randn(WIDTH, dtype=torch.float64).requires_grad_()
    torch.testing.assert_close(sharded_width_layer_norm(x, w, 1e-5, WIDTH, identity),
                               F.layer_norm(x, (WIDTH,), w, None, 1e-5), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: sharded_width_layer_norm(a, b, 1e-5, WIDTH, identity), (x, w))
    # Second order is not needed for training; first-order grads must match layer_norm's too.
    dy = torch.randn_like(x)
    gx, gw = torch.autograd.grad(sharded_width_layer_norm(x, w, 1e-5, WIDTH, identity), (x, w), dy)
    rx, rw = torch.autograd.grad(F.layer_norm(x, (WIDTH,), w, None, 1e-5), (x, w), dy)
    torch.testing.assert_close(gx, rx, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gw, rw, atol=1e-12, rtol=1e-12)


def test_sharded_width_layer_norm_reduces_once_each_way():
    calls = []

    def counting(t):
        calls.append(tuple(t.shape))
        return t

    x = torch.randn(7, 3, WIDTH, requires_grad=True)
    w = torch.ones(WIDTH, requires_grad=True)
    out = sharded_width_layer_norm(x, w, 1e-5, WIDTH, counting)
    assert calls == [(2, 7, 3)]  # sum and sum of squares, stacked
    out.backward(torch.randn_like(out))
    assert calls == [(2, 7, 3), (2, 7, 3)]


def saved_tensors_of(fn, *inputs):
    """(dtype, numel) of every tensor autograd saves while running ``fn(*inputs)``."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return saved


def full_size_saves(saved, numel):
    return [dtype for dtype, n in saved if n >= numel]


@pytest.mark.parametrize("path", ["tp1_module", "sharded_function"])
def test_bf16_qk_norm_saves_no_full_size_fp32_tensor(runtime, path):
    x = torch.randn(16, 2, HEADS, HEAD_DIM, dtype=torch.bfloat16, requires_grad=True)
    if path == "tp1_module":
        norm = FullWidthQKNorm(make_config(params_dtype=torch.bfloat16, bf16=True), HEAD_DIM)
        saved = saved_tensors_of(norm, x)
    else:
        w = torch.ones(WIDTH, dtype=torch.bfloat16, requires_grad=True)
        flat = x.detach().reshape(16, 2, WIDTH).requires_grad_()
        saved = saved_tensors_of(
            lambda a: sharded_width_layer_norm(a, w, 1e-5, WIDTH, identity), flat)
    # Only the input itself, in its own dtype: per-row statistics are 1/WIDTH of its size.
    assert full_size_saves(saved, x.numel()) == [torch.bfloat16], saved


def test_one_pass_statistics_stay_as_accurate_as_layer_norm_on_qk_like_rows():
    """E[x^2] - E[x]^2 against the float64 truth, next to F.layer_norm's own (two-pass) error,
    on rows shaped like q/k activations: zero-mean, offset by 3 std, a few 30x channels.

    Errors are relative to the largest normalized value. In bf16 the output rounding (about
    3e-3) dominates both; in fp32 the one-pass variance stays within 2e-6.
    """
    torch.manual_seed(1)
    width = 2048
    base = torch.randn(256, width) * 2.5
    outliers = base.clone()
    outliers[:, :8] *= 30
    for rows in (base, base + 7.5, outliers):
        for dtype in (torch.float32, torch.bfloat16):
            x = rows.to(dtype)
            w = torch.ones(width, dtype=dtype)
            truth = F.layer_norm(x.double(), (width,), None, None, 1e-5)
            scale = truth.abs().max()
            ours = (sharded_width_layer_norm(x, w, 1e-5, width, identity).double() - truth)
            fused = (F.layer_norm(x, (width,), w, None, 1e-5).double() - truth)
            ours, fused = ours.abs().max() / scale, fused.abs().max() / scale
            if dtype == torch.float32:
                assert ours <= 2e-6, ours
            else:
                assert ours <= fused * 1.01 + 1e-5, (ours, fused)


def test_qk_gain_is_declared_tensor_parallel_sharded_for_checkpoints(runtime):
    norm = FullWidthQKNorm(make_config(), HEAD_DIM)
    sharded = norm.sharded_state_dict(prefix="layer.q_layernorm.")
    weight = sharded["layer.q_layernorm.weight"]
    assert weight.key == "layer.q_layernorm.weight"
    assert weight.global_shape == (WIDTH,)
    assert weight.axis_fragmentations == (1,)  # one TP rank here: the whole gain


# ------------------------------------------------------------------ sequence-parallel marks


def test_block_norms_carry_sequence_parallel_and_qk_gain_does_not(runtime):
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
    )

    for sp in (True, False):
        config = make_config(num_layers=2, tensor_model_parallel_size=2, sequence_parallel=sp)
        block = TransformerBlock(config, TransformerBlockSubmodules(
            layer_specs=[decoder_layer_spec(False)] * 2, layer_norm=GainOnlyLayerNorm))
        norms = {n: m for n, m in block.named_modules() if isinstance(m, GainOnlyLayerNorm)}
        assert "final_layernorm" in norms and len(norms) == 5  # 2 per layer + the final one
        assert all(m.weight.sequence_parallel is sp for m in norms.values())
        qk = [m for m in block.modules() if isinstance(m, FullWidthQKNorm)]
        assert len(qk) == 4
        assert not any(getattr(m.weight, "sequence_parallel", False) for m in qk)


# ------------------------------------------------------------------------- core attention


def packed_params(cu, padded=None):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded)


def per_segment(q, k, v, bounds, causal=True):
    """Plain SDPA on each [start, end) of [t, h, d] inputs -> {start: [len, h*d]}."""
    outs = {}
    for start, end in bounds:
        qs, ks, vs = (t[start:end].permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)[0]
        outs[start] = o.permute(1, 0, 2).reshape(end - start, -1)
    return outs


def core_attention(**config):
    from megatron.core.transformer.enums import AttnMaskType

    return SDPACoreAttention(make_config(**config), 1, AttnMaskType.causal, "self")


def test_packed_thd_attention_equals_each_subsequence_alone_and_the_dense_mask(runtime):
    attn = core_attention()
    t, lengths = 12, [3, 4, 5]
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
    q, k, v = (torch.randn(t, HEADS, HEAD_DIM) for _ in range(3))
    out = attn(q, k, v, None, packed_seq_params=packed_params(cu))
    assert out.shape == (t, WIDTH)  # megatron reshapes it to [t, 1, h*d]

    expected = per_segment(q, k, v, [(0, 3), (3, 7), (7, 12)])
    for start, length in zip([0, 3, 7], lengths):
        torch.testing.assert_close(out[start:start + length], expected[start])

    # The dense path with a block-diagonal causal mask (True = masked out) agrees.
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    dense = attn(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), ~allowed[None, None])
    torch.testing.assert_close(out, dense[:, 0])


@pytest.mark.parametrize("causal", [True, False])
def test_packed_thd_padding_positions_are_zero_and_never_attended(runtime, causal):
    from megatron.core.transformer.enums import AttnMaskType

    attn = core_attention()
    mask_type = AttnMaskType.padding_causal if causal else AttnMaskType.padding
    # Two documents of 3 and 2 tokens, each padded to 4: layout [d0 d0 d0 p d1 d1 p p].
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    padded = torch.tensor([0, 4, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, HEADS, HEAD_DIM) for _ in range(3))
    out = attn(q, k, v, None, attn_mask_type=mask_type,
               packed_seq_params=packed_params(cu, padded))
    expected = per_segment(q, k, v, [(0, 3), (4, 6)], causal=causal)
    torch.testing.assert_close(out[0:3], expected[0])
    torch.testing.assert_close(out[4:6], expected[4])
    assert out[[3, 6, 7]].abs().max() == 0
    assert torch.isfinite(out).all()


def test_packed_thd_bad_arguments_are_internal_errors(runtime):
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = core_attention()
    q = torch.randn(5, HEADS, HEAD_DIM)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="qkv_format='thd'"):
        attn(q, q, q, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu))
    with pytest.raises(RuntimeError, match="attention_mask=None"):
        attn(q, q, q, torch.zeros(1, 1, 5, 5, dtype=torch.bool),
             packed_seq_params=packed_params(cu))
    with pytest.raises(RuntimeError, match="cu_seqlens_q is required"):
        attn(q, q, q, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))


def build_layer(config):
    from megatron.core.transformer.spec_utils import build_module

    return build_module(decoder_layer_spec(False), config=config, layer_number=1)


def test_packed_sequences_through_megatron_self_attention_with_rope(runtime):
    """A whole decoder layer (megatron squeezes the batch for THD and applies RoPE per
    sub-sequence): the packed run equals running each document on its own."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    torch.manual_seed(3)
    layer = build_layer(make_config()).eval()
    rope = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0)
    lengths = [5, 3, 6]
    hidden = torch.randn(sum(lengths), 1, WIDTH)
    cu = torch.tensor([0, 5, 8, 14], dtype=torch.int32)
    emb = rope(max(lengths))
    with torch.no_grad():
        packed, _ = layer(hidden, attention_mask=None, rotary_pos_emb=(emb, emb),
                          packed_seq_params=packed_params(cu))
        start = 0
        for n in lengths:
            alone, _ = layer(hidden[start:start + n], attention_mask=None,
                             rotary_pos_emb=(emb[:n], emb[:n]))
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


@pytest.mark.parametrize("packed", [False, True])
def test_selective_recompute_of_core_attention_gives_the_same_grads(runtime, packed):
    torch.manual_seed(4)
    plain = build_layer(make_config()).train()
    recompute = build_layer(make_config(recompute_granularity="selective",
                                        recompute_modules=["core_attn"])).train()
    recompute.load_state_dict(plain.state_dict())
    assert recompute.self_attention.checkpoint_core_attention
    t = 10
    hidden = torch.randn(t, 1 if packed else 2, WIDTH)
    kwargs = {"packed_seq_params": packed_params(torch.tensor([0, 4, 10], dtype=torch.int32))} \
        if packed else {}
    results = []
    for layer in (plain, recompute):
        x = hidden.clone().requires_grad_()
        out, _ = layer(x, attention_mask=None, **kwargs)
        out.square().sum().backward()
        results.append((out.detach(), x.grad,
                        layer.self_attention.linear_qkv.weight.grad,
                        layer.self_attention.q_layernorm.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_attention_dropout_uses_the_model_parallel_rng_and_replays_under_recompute(runtime):
    """TP ranks hold different heads: as in megatron's DotProductAttention, dropout draws from
    the tracker's per-rank stream, and selective recompute replays the same masks."""
    from megatron.core import tensor_parallel

    attn = core_attention(attention_dropout=0.5).train()
    q = torch.randn(6, 2, HEADS, HEAD_DIM)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    default_before, tracker_before = torch.get_rng_state(), tracker.get_states()
    attn(q, q, q)
    assert torch.equal(torch.get_rng_state(), default_before)
    assert any(not torch.equal(tracker_before[k], v) for k, v in tracker.get_states().items())

    results = []
    for recompute in ({}, {"recompute_granularity": "selective"}):
        torch.manual_seed(5)
        layer = build_layer(make_config(attention_dropout=0.5, **recompute)).train()
        tensor_parallel.model_parallel_cuda_manual_seed(9)
        x = torch.randn(8, 2, WIDTH, requires_grad=True)
        out, _ = layer(x, attention_mask=None)
        out.square().sum().backward()
        results.append((out.detach(), x.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------- TP=2 (torchrun worker)


@pytest.mark.slow  # a torchrun launch
def test_qk_norm_tp2_matches_full_width_reference():
    from distributed import last_json, torchrun

    proc = torchrun("tests/test_decoder_spec.py", ["tp2-worker"], nproc=2, module=False,
                    timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["all_reduces"] == [1, 1]  # one in forward, one in backward, per rank
    for key in ("out", "grad_x", "grad_w"):
        assert result["fp32"][key] <= 1e-5, (key, result)
        assert result["bf16"][key] <= 0.05, (key, result)


def _tp2_worker():
    """Each rank normalizes its half of the heads; gathered results against float64."""
    import torch.distributed as dist

    from megatron.core import parallel_state
    from megatron_vlm.runtime import initialize, shutdown

    initialize(2, 1, seed=11)
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    calls = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls[0] += 1
        return real_all_reduce(*args, **kwargs)

    report, counts = {}, []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator().manual_seed(5)  # same full tensors on both ranks
        x = (torch.randn(9, 2, HEADS, HEAD_DIM, generator=gen) * 2 + 0.5).to(dtype)
        dy = torch.randn(9, 2, HEADS, HEAD_DIM, generator=gen).to(dtype)
        gain = (torch.randn(WIDTH, generator=gen) * 0.3 + 1).to(dtype)
        config = make_config(tensor_model_parallel_size=2, params_dtype=dtype,
                             bf16=dtype == torch.bfloat16)
        norm = FullWidthQKNorm(config, HEAD_DIM)
        local = slice(rank * HEADS // 2, (rank + 1) * HEADS // 2)
        with torch.no_grad():
            norm.weight.copy_(gain.view(HEADS, HEAD_DIM)[local].reshape(-1))
        x_local = x[:, :, local].clone().requires_grad_()
        calls[0] = 0
        dist.all_reduce = counting_all_reduce
        try:
            out = norm(x_local)
            counts_fwd = calls[0]
            out.backward(dy[:, :, local])
        finally:
            dist.all_reduce = real_all_reduce
        counts = [counts_fwd, calls[0] - counts_fwd]

        def gather(t, dim):
            parts = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(parts, t.contiguous(), group=group)
            return torch.cat(parts, dim).double()

        got_out, got_gx = gather(out.detach(), 2), gather(x_local.grad, 2)
        got_gw = gather(norm.weight.grad, 0)
        x64 = x.double().requires_grad_()
        w64 = gain.double().requires_grad_()
        ref = full_width_reference(x64, w64)
        ref.backward(dy.double())
        report[name] = {"out": (got_out - ref).abs().max().item(),
                        "grad_x": (got_gx - x64.grad).abs().max().item(),
                        "grad_w": ((got_gw - w64.grad).abs().max()
                                   / w64.grad.abs().max()).item()}
    if rank == 0:
        print(json.dumps({"all_reduces": counts, **report}), flush=True)
    shutdown()


if __name__ == "__main__" and sys.argv[1:] == ["tp2-worker"]:
    _tp2_worker()
