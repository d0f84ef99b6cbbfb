"""Builds the VLM for this process's place in the parallel layout (the model provider)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.model.decoder_spec import GainOnlyLayerNorm, decoder_layer_spec
from megatron_vlm.model.loss import DecoderGPTModel
from megatron_vlm.model.projector import build_projector
from megatron_vlm.model.vlm import VLMModel
from megatron_vlm.runtime.distributed import current_device, has_transformer_engine
from megatron_vlm.runtime.features import Features, resolve_features

logger = logging.getLogger("megatron_vlm")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decoder_transformer_config(cfg, use_transformer_engine: bool,
                               features: Features | None = None,
                               cuda: bool | None = None) -> TransformerConfig:
    """megatron-core TransformerConfig of the DCLM/OpenLM decoder described by ``cfg``, with the
    resolved throughput ``features`` (default: none of them). ``cuda``: whether layers are built
    on the GPU (default: the runtime's device)."""
    dec = cfg.model.decoder
    par = cfg.parallel
    dtype = _DTYPES[cfg.train.params_dtype]
    features = features or Features()
    if cuda is None:
        cuda = current_device().type == "cuda"
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "recompute_num_layers": features.recompute_num_layers}}[features.recompute]
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
        bias_activation_fusion=features.bias_swiglu_fusion,
        masked_softmax_fusion=False,  # the attention kernels (SDPA, TE) fuse the softmax
        apply_rope_fusion=features.rope_fusion,
        gradient_accumulation_fusion=features.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=features.cross_entropy_fusion,
        cross_entropy_fusion_impl=features.cross_entropy_impl,
        persist_layer_norm=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=dec.init_method_std,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        sequence_parallel=features.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not cuda,
        # Per-token loss: gradients are normalized by the global count of loss tokens, so the
        # result does not depend on how the batch is split over micro-batches or DP ranks.
        calculate_per_token_loss=True,
        fp8=cfg.train.fp8 if use_transformer_engine else None,
        **recompute,
    )


def build_model(cfg, use_transformer_engine: bool | None = None, pre_process: bool | None = None,
                post_process: bool | None = None, packed_documents: bool | None = None) -> VLMModel:
    """The VLM's modules that live on this pipeline stage (projector/encoder on the first), on
    the runtime's device, with the throughput features resolved for this run.

    ``use_transformer_engine=None`` picks the TE spec when TE and CUDA are present and the
    local spec otherwise; FP8 (``train.fp8``) needs the TE spec. ``packed_documents``: how
    document attention is given to the attention kernel (see :class:`VLMModel`); None:
    ``performance.packed_documents`` as resolved.
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
    device = current_device()
    features = resolve_features(cfg, cuda=device.type == "cuda",
                                transformer_engine=use_transformer_engine,
                                data_parallel=parallel_state.get_data_parallel_world_size())
    config = decoder_transformer_config(cfg, use_transformer_engine, features,
                                        cuda=device.type == "cuda")
    layer = decoder_layer_spec(use_transformer_engine, qk_norm=cfg.model.decoder.qk_norm)
    block = TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=GainOnlyLayerNorm)
    language_model = DecoderGPTModel(
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
        projector = build_projector(config, cfg.model.projector, cfg.model.encoder)
        if cfg.model.encoder.mode == "online":
            from megatron_vlm.model.vision_encoder import build_vision_encoder

            # The tower computes in the run's dtype (bf16 on GPU runs); a trainable one keeps
            # fp32 main weights in the optimizer like the decoder.
            vision_encoder = build_vision_encoder(cfg.model.encoder).to(dtype=config.params_dtype)
    model = VLMModel(config, language_model, projector, vision_encoder,
                     cfg.model.encoder.num_image_tokens,
                     packed_documents=(features.packed_documents if packed_documents is None
                                       else packed_documents))
    model.features = features
    # megatron builds its own layers on the current CUDA device; the norms, the q/k gains and
    # the open_clip tower are plain torch modules built on the CPU: move everything once, as
    # megatron's get_model does.
    return model.to(device)
