"""Builds the VLM for this process's place in the parallel layout (the model provider)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.model.decoder_spec import GainOnlyLayerNorm, decoder_layer_spec
from megatron_vlm.model.projector import build_projector
from megatron_vlm.model.vlm import VLMModel
from megatron_vlm.runtime.distributed import has_transformer_engine

logger = logging.getLogger("megatron_vlm")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decoder_transformer_config(cfg, use_transformer_engine: bool) -> TransformerConfig:
    """megatron-core TransformerConfig of the DCLM/OpenLM decoder described by ``cfg``."""
    dec = cfg.model.decoder
    par = cfg.parallel
    dtype = _DTYPES[cfg.train.params_dtype]
    cuda = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=dec.num_layers,
        hidden_size=dec.hidden_size,
        num_attention_heads=dec.num_attention_heads,
        kv_channels=dec.hidden_size // dec.num_attention_heads,
        ffn_hidden_size=dec.resolved_ffn_hidden_size(),
        layernorm_epsilon=dec.norm_eps,
        normalization="LayerNorm",
        # The layer spec places FullWidthQKNorm itself. megatron's qk_layernorm flag would also
        # sum q/k-norm gradients over TP ranks (right for its replicated per-head norms, wrong
        # for our TP-sharded full-width gains), so it stays off.
        qk_layernorm=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=dec.init_method_std,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not cuda,
        # Per-token loss: gradients are normalized by the global count of loss tokens, so the
        # result does not depend on how the batch is split over micro-batches or DP ranks.
        calculate_per_token_loss=True,
        fp8=cfg.train.fp8 if use_transformer_engine else None,
    )


def build_model(cfg, use_transformer_engine: bool | None = None, pre_process: bool | None = None,
                post_process: bool | None = None) -> VLMModel:
    """The VLM's modules that live on this pipeline stage (projector/encoder on the first).

    ``use_transformer_engine=None`` picks the TE spec when TE and CUDA are present and the
    local spec otherwise; FP8 (``train.fp8``) needs the TE spec.
    """
    if use_transformer_engine is None:
        use_transformer_engine = has_transformer_engine()
    if cfg.train.fp8 and not use_transformer_engine:
        raise ValueError(f"train.fp8={cfg.train.fp8!r} needs Transformer Engine on a CUDA GPU; "
                         "this host has none (set train.fp8=null)")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    config = decoder_transformer_config(cfg, use_transformer_engine)
    layer = decoder_layer_spec(use_transformer_engine, qk_norm=cfg.model.decoder.qk_norm)
    block = TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=GainOnlyLayerNorm)
    language_model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=cfg.model.decoder.vocab_size,
        max_sequence_length=cfg.model.decoder.max_seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.model.decoder.rotary_base,
    )
    projector = vision_encoder = None
    if pre_process:
        projector = build_projector(config, cfg.model.projector, cfg.model.encoder,
                                    use_transformer_engine)
        if cfg.model.encoder.mode == "online":
            from megatron_vlm.model.vision_encoder import build_vision_encoder

            vision_encoder = build_vision_encoder(cfg.model.encoder)
    return VLMModel(config, language_model, projector, vision_encoder,
                    cfg.model.encoder.num_image_tokens)
