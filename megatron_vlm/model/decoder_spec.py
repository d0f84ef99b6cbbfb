"""megatron-core layer specs for the DCLM/OpenLM decoder block.

The block: pre-norm with gain-only LayerNorm (eps 1e-5), fused QKV
without bias, qk-norm as a gain-only LayerNorm over the *whole* Q and K width (not per head),
NeoX rotary, SwiGLU MLP without bias, untied embeddings.

Two variants share every piece except the linear layers and the attention kernel:
Transformer Engine modules (FP8 capable) when TE and CUDA exist, megatron-core's local modules
with a torch SDPA core attention otherwise. Norms stay separate modules in both (TE's fused
LayerNorm-Linear always carries a norm bias, which this architecture does not have).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def swiglu_hidden_size(hidden_size: int) -> int:
    """OpenLM's SwiGLU width: 256 * ceil(int(8 d / 3) / 256)."""
    return 256 * math.ceil(int(8 * hidden_size / 3) / 256)


def _param_device(config: TransformerConfig):
    """Where megatron builds parameters: the current CUDA device unless CPU init is asked for."""
    return None if config.use_cpu_initialization else torch.cuda.current_device()


class GainOnlyLayerNorm(torch.nn.LayerNorm):
    """LayerNorm with a gain and no bias, built the way megatron builds its norm slots.

    Under sequence parallelism it runs on this rank's slice of the sequence, so its gain
    gradient is a partial sum: the weight carries ``sequence_parallel`` and megatron's
    ``finalize_model_grads`` all-reduces it over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, bias=False, dtype=config.params_dtype,
                         device=_param_device(config))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def _all_reduce_tp(t: torch.Tensor) -> torch.Tensor:
    """Sums ``t`` in place over the tensor-parallel group and returns it."""
    torch.distributed.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
    return t


class _ShardedWidthLayerNorm(torch.autograd.Function):
    """Gain-only LayerNorm over a last dimension split across ranks, one all-reduce each way.

    ``x`` is ``[..., local_width]``, ``weight`` this rank's ``[local_width]`` slice of the gain,
    ``full_width`` the width summed over all ranks, and ``all_reduce`` sums a float32 (float64
    for float64 input) tensor over the ranks that share the rows, in place or not, and returns
    the sum.

    The statistics come from per-row partial sums of x and x^2 (``var = E[x^2] - E[x]^2``),
    so one all-reduce of ``[2, rows]`` gives both; a two-pass variance would need a second
    all-reduce per call. The formula's cancellation costs a relative variance error of about
    ``eps_fp32 * (1 + mean^2 / var)`` per row. q/k rows are close to zero-mean across the
    full width; on 2048-wide rows (tests/test_decoder_spec.py) the fp32 output error is 1.5e-7
    of the largest value for zero-mean rows, 1.3e-6 with the row mean at 3 std and 4e-7 with
    30x outlier channels (F.layer_norm: about 1.5e-7), and 1.8e-5 with the mean at 10 std; in
    bf16 the output rounding (3e-3) dominates and both errors are the same. Accumulation is fp32
    without an fp32 copy of ``x`` being kept: backward saves only ``x`` (its own dtype), the
    gain and per-row mean/rstd, and recomputes the normalized input.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, full_width: int, all_reduce: Callable):
        acc = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        sums = torch.stack([
            torch.sum(x, dim=-1, dtype=acc),
            torch.linalg.vector_norm(x, dim=-1, dtype=acc).square(),
        ])
        sums = all_reduce(sums)
        mean = (sums[0] / full_width).unsqueeze(-1)
        var = (sums[1] / full_width).unsqueeze(-1) - mean.square()
        # Rounding can push a constant row's variance below zero.
        rstd = torch.rsqrt(var.clamp_min_(0.0).add_(eps))
        # x - mean promotes to the accumulation dtype; the in-place ops reuse that transient.
        out = torch.sub(x, mean).mul_(rstd).mul_(weight).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.full_width = full_width
        ctx.all_reduce = all_reduce
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        xhat = torch.sub(x, mean).mul_(rstd)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.mul(dy, xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = torch.mul(dy, weight.to(xhat.dtype))
            sums = ctx.all_reduce(torch.stack([g.sum(-1), torch.mul(g, xhat).sum(-1)]))
            # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), means over the full width.
            mean_g = (sums[0] / ctx.full_width).unsqueeze(-1)
            mean_gx = (sums[1] / ctx.full_width).unsqueeze(-1)
            grad_x = g.sub_(xhat.mul_(mean_gx)).sub_(mean_g).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None, None, None


def sharded_width_layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, full_width: int,
                             all_reduce: Callable = _all_reduce_tp) -> torch.Tensor:
    """Gain-only LayerNorm of ``x``'s last dim, which is one rank's slice of ``full_width``."""
    return _ShardedWidthLayerNorm.apply(x, weight, eps, full_width, all_reduce)


class FullWidthQKNorm(MegatronModule):
    """Gain-only LayerNorm over the full Q (or K) width, correct under tensor parallelism.

    megatron builds the q/k norm slots per head (``hidden_size`` is the head dim) and calls them
    on ``[seq, batch, heads_on_this_rank, head_dim]``. OpenLM normalizes the concatenation of all
    heads, so this module holds this rank's slice of the full-width gain. At TP=1 that is one
    fused ``layer_norm`` over the ``[..., heads * head_dim]`` view; at TP>1 the statistics and
    the input gradient's reductions span the TP group (:func:`sharded_width_layer_norm`).

    The input is the whole sequence (after the QKV projection gathered it), so the gain is not
    marked ``sequence_parallel``: its gradient is complete on each rank for its slice.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if config.num_query_groups not in (None, config.num_attention_heads):
            raise ValueError("full-width qk-norm assumes no grouped-query attention")
        self.tp = tp
        self.local_heads = config.num_attention_heads // tp
        self.head_dim = hidden_size
        self.full_width = config.num_attention_heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(
            self.local_heads * hidden_size, dtype=config.params_dtype,
            device=_param_device(config)))
        # Marks the gain as sharded along dim 0 like a column-parallel weight, so grad-norm
        # and checkpoint code treat it per rank.
        setattr(self.weight, "tensor_model_parallel", tp > 1)
        setattr(self.weight, "partition_dim", 0)
        setattr(self.weight, "partition_stride", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1])
        weight = self.weight.to(x.dtype)
        if self.tp == 1:
            out = F.layer_norm(flat, (flat.shape[-1],), weight, None, self.eps)
        else:
            out = sharded_width_layer_norm(flat, weight, self.eps, self.full_width)
        return out.reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal,
                 AttnMaskType.causal_bottom_right)


def packed_attention_mask(packed_seq_params: PackedSeqParams, total: int,
                          causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[t, t]`` allowed-attention mask (True = attend) of a THD pack and its valid rows.

    Sub-sequence ``i`` holds positions ``[start_i, start_i + len_i)``, with starts from
    ``cu_seqlens_q_padded`` when given (the rest up to the next start is padding) and from
    ``cu_seqlens_q`` otherwise; positions past the last start are padding too. Everything is
    computed on the device of ``cu_seqlens`` without reading it back to the host. Padding rows
    attend only to themselves (so no row is empty) and are marked invalid for the caller.
    """
    cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        raise RuntimeError("packed_seq_params.cu_seqlens_q is required for qkv_format='thd'")
    kv = packed_seq_params.cu_seqlens_kv
    if kv is not None and kv.shape != cu.shape:
        raise RuntimeError("packed self-attention needs cu_seqlens_kv equal to cu_seqlens_q, got "
                           f"shapes {tuple(kv.shape)} and {tuple(cu.shape)}")
    layout = cu if packed_seq_params.cu_seqlens_q_padded is None \
        else packed_seq_params.cu_seqlens_q_padded
    pos = torch.arange(total, device=cu.device, dtype=layout.dtype)
    segments = layout.numel() - 1
    seg = torch.searchsorted(layout[1:].contiguous(), pos, right=True)
    inside = seg < segments
    seg_c = seg.clamp_max(segments - 1)
    lengths = cu[1:] - cu[:-1]
    valid = inside & (pos - layout[seg_c] < lengths[seg_c])
    allowed = (seg[:, None] == seg[None, :]) & valid[None, :]
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    allowed |= torch.eye(total, dtype=torch.bool, device=cu.device) & ~valid[:, None]
    return allowed, valid


class SDPACoreAttention(MegatronModule):
    """Core attention with torch's scaled_dot_product_attention, for hosts without TE.

    Takes megatron's ``[seq, batch, heads, head_dim]`` query/key/value and returns
    ``[seq, batch, heads * head_dim]``. A boolean ``attention_mask`` follows megatron's
    convention (True = masked out) and is broadcast to ``[batch, 1|heads, seq, seq]``; without
    one the attention is causal.

    With ``packed_seq_params`` in the ``thd`` format, megatron passes ``[t, heads, head_dim]``
    (the batch dim squeezed) and expects ``[t, heads * head_dim]``: attention stays inside each
    sub-sequence of ``cu_seqlens_q`` (causal for causal mask types), padding positions give 0.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 **_):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def _sdpa(self, q, k, v, **kwargs):
        dropout = self.dropout if self.training else 0.0
        if dropout == 0.0:
            return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale, **kwargs)
        # As megatron's DotProductAttention: TP ranks hold different heads, so without sequence
        # parallelism their dropout masks come from the per-rank model-parallel RNG stream.
        ctx = (contextlib.nullcontext() if self.config.sequence_parallel
               else tensor_parallel.get_cuda_rng_tracker().fork())
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale,
                                                  dropout_p=dropout, **kwargs)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if attention_bias is not None:
            raise RuntimeError("SDPACoreAttention does not take an attention_bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, mask_type, packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if attention_mask is not None:
            out = self._sdpa(q, k, v, attn_mask=~attention_mask)
        else:
            out = self._sdpa(q, k, v, is_causal=mask_type == AttnMaskType.causal)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _packed(self, query, key, value, attention_mask, mask_type, params: PackedSeqParams):
        if params.qkv_format != "thd":
            raise RuntimeError("SDPACoreAttention takes packed_seq_params only with "
                               f"qkv_format='thd', got {params.qkv_format!r}")
        if attention_mask is not None:
            raise RuntimeError("packed sequences (qkv_format='thd') take their document bounds "
                               "from cu_seqlens; pass attention_mask=None")
        if query.dim() != 3:
            raise RuntimeError("packed (thd) query must be [tokens, heads, head_dim], got "
                               f"{tuple(query.shape)}")
        t = query.shape[0]
        allowed, valid = packed_attention_mask(params, t, mask_type in _CAUSAL_TYPES)
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # [1, h, t, d]
        out = self._sdpa(q, k, v, attn_mask=allowed)[0]  # [h, t, d]
        h, _, d = out.shape
        out = out.permute(1, 0, 2).reshape(t, h * d)
        return out.masked_fill(~valid[:, None], 0.0)


def decoder_layer_spec(use_transformer_engine: bool, qk_norm: bool = True) -> ModuleSpec:
    """The DCLM/OpenLM transformer layer as a megatron-core ModuleSpec."""
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TERowParallelLinear,
        )

        column, row, core_attention = TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        column, row, core_attention = ColumnParallelLinear, RowParallelLinear, SDPACoreAttention
    qk = FullWidthQKNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=GainOnlyLayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=qk,
                    k_layernorm=qk,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=GainOnlyLayerNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
