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

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
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


class GainOnlyLayerNorm(torch.nn.LayerNorm):
    """LayerNorm with a gain and no bias, built the way megatron builds its norm slots."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, bias=False, dtype=config.params_dtype)


class FullWidthQKNorm(MegatronModule):
    """Gain-only LayerNorm over the full Q (or K) width, correct under tensor parallelism.

    megatron builds the q/k norm slots per head (``hidden_size`` is the head dim) and calls them
    on ``[seq, batch, heads_on_this_rank, head_dim]``. OpenLM normalizes the concatenation of all
    heads, so this module holds this rank's slice of the full-width gain and reduces the mean
    and variance over the tensor-parallel group. The reduction's backward is itself an
    all-reduce: every rank's output depends on every rank's input through the statistics.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if config.num_query_groups not in (None, config.num_attention_heads):
            raise ValueError("full-width qk-norm assumes no grouped-query attention")
        self.local_heads = config.num_attention_heads // tp
        self.head_dim = hidden_size
        self.full_width = config.num_attention_heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(self.local_heads * hidden_size, dtype=config.params_dtype)
        )
        # Marks the gain as sharded along dim 0 like a column-parallel weight, so grad-norm
        # and checkpoint code treat it per rank.
        setattr(self.weight, "tensor_model_parallel", tp > 1)
        setattr(self.weight, "partition_dim", 0)
        setattr(self.weight, "partition_stride", 1)

    def _sum_over_tp(self, x: torch.Tensor) -> torch.Tensor:
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return x
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(x, group=parallel_state.get_tensor_model_parallel_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1]).float()
        mean = self._sum_over_tp(flat.sum(-1, keepdim=True)) / self.full_width
        centered = flat - mean
        var = self._sum_over_tp((centered * centered).sum(-1, keepdim=True)) / self.full_width
        out = centered * torch.rsqrt(var + self.eps) * self.weight.float()
        return out.to(x.dtype).reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class SDPACoreAttention(MegatronModule):
    """Core attention with torch's scaled_dot_product_attention, for hosts without TE.

    Takes megatron's ``[seq, batch, heads, head_dim]`` query/key/value and returns
    ``[seq, batch, heads * head_dim]``. A boolean ``attention_mask`` follows megatron's
    convention (True = masked out) and is broadcast to ``[batch, 1|heads, seq, seq]``; without
    one the attention is causal.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 **_):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need the Transformer Engine attention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is not None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale,
                dropout_p=self.dropout if self.training else 0.0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=mask_type == AttnMaskType.causal, scale=self.softmax_scale,
                dropout_p=self.dropout if self.training else 0.0)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


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
