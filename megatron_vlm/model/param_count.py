"""Parameter counts computed from the config alone, without building any module.

Decoder (DCLM/OpenLM block, no biases): untied input embedding and output layer; per layer a
fused QKV projection, an output projection, optional full-width q/k-norm gains, a SwiGLU MLP
and two gain-only norms; one final norm. The vision encoder's count comes from
``megatron_vlm.model.vision_encoder.count_encoder_parameters`` (the open_clip tower built on the
meta device).
"""

from __future__ import annotations

from megatron_vlm.config import DecoderConfig, EncoderConfig, ModelConfig, ProjectorConfig


def decoder_parameters(decoder_cfg: DecoderConfig) -> int:
    """Parameters of the decoder: embedding, layers, final norm and output layer."""
    d, ffn = decoder_cfg.hidden_size, decoder_cfg.resolved_ffn_hidden_size()
    attention = 3 * d * d + d * d + (2 * d if decoder_cfg.qk_norm else 0)
    mlp = d * 2 * ffn + ffn * d
    norms = 2 * d
    per_layer = attention + mlp + norms
    embedding_and_output = 2 * decoder_cfg.vocab_size * d
    return embedding_and_output + decoder_cfg.num_layers * per_layer + d


def projector_parameters(projector_cfg: ProjectorConfig, encoder_cfg: EncoderConfig,
                         d_model: int) -> int:
    """Parameters of the projector from encoder width to ``d_model``."""
    d_enc, bias = encoder_cfg.embed_dim, int(projector_cfg.bias)
    if projector_cfg.type == "linear":
        return d_enc * d_model + bias * d_model
    if projector_cfg.type == "mlp2":
        hidden = projector_cfg.hidden_multiplier * d_enc
        return d_enc * hidden + bias * hidden + hidden * d_model + bias * d_model
    raise ValueError(f"model.projector.type={projector_cfg.type!r} has no parameter count")


def encoder_parameters(encoder_cfg: EncoderConfig) -> int:
    """Parameters of the vision tower (from the vision encoder module, which may need open_clip)."""
    try:
        from megatron_vlm.model.vision_encoder import count_encoder_parameters
    except ImportError as err:
        raise RuntimeError(
            "cannot count the vision encoder's parameters: importing "
            f"megatron_vlm.model.vision_encoder.count_encoder_parameters failed ({err})") from err
    return int(count_encoder_parameters(encoder_cfg))


def model_parameters(model_cfg: ModelConfig) -> dict[str, int]:
    """Counts per part: decoder, projector, encoder, total, and trainable (encoder if unfrozen)."""
    counts = {
        "decoder": decoder_parameters(model_cfg.decoder),
        "projector": projector_parameters(model_cfg.projector, model_cfg.encoder,
                                          model_cfg.decoder.hidden_size),
        "encoder": encoder_parameters(model_cfg.encoder),
    }
    counts["total"] = sum(counts.values())
    counts["trainable"] = counts["total"] - (counts["encoder"] if model_cfg.encoder.frozen else 0)
    return counts
