"""Image-embedding projector: encoder width -> decoder width, on megatron-core's module.

``mlp2``: Linear(d_enc -> k * d_enc), GELU, Linear(-> d_model) (the paper's default, k = 4).
``linear``: one Linear(d_enc -> d_model). Both are megatron-core ``MultimodalProjector``s, so
they are tensor-parallel (column then row parallel) and checkpoint like the decoder.

The projector is built on megatron-core's own tensor-parallel linear layers with either layer
spec: the affine projector needs a gathered column-parallel output, which the Transformer Engine
wrapper refuses, and FP8 does not apply here (its GEMMs need leading dimensions divisible by
16, which ``k x 729`` image rows are not in general), so TE would add nothing for two GEMMs.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

PROJECTOR_TYPES = {"mlp2": "mlp", "linear": "affine"}


def projector_transformer_config(decoder_config: TransformerConfig, projector_cfg,
                                 encoder_cfg) -> TransformerConfig:
    """The decoder's TransformerConfig with the projector's widths, bias and activation.

    The decoder's FP8, sequence parallelism (the projector's rows are images, not sequence
    positions), recomputation and fused gradient accumulation (the local linear layers would
    need apex for it) do not carry over.
    """
    return dataclasses.replace(
        decoder_config,
        ffn_hidden_size=projector_cfg.hidden_multiplier * encoder_cfg.embed_dim,
        add_bias_linear=projector_cfg.bias,
        gated_linear_unit=False,
        activation_func=F.gelu,
        bias_activation_fusion=False,
        fp8=None,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
    )


def build_projector(decoder_config: TransformerConfig, projector_cfg,
                    encoder_cfg) -> MultimodalProjector:
    if projector_cfg.type not in PROJECTOR_TYPES:
        raise ValueError(f"model.projector.type={projector_cfg.type!r}: expected one of "
                         f"{sorted(PROJECTOR_TYPES)}")
    return MultimodalProjector(
        config=projector_transformer_config(decoder_config, projector_cfg, encoder_cfg),
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        projector_type=PROJECTOR_TYPES[projector_cfg.type],
        input_size=encoder_cfg.embed_dim,
    )
