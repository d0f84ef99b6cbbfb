"""Model FLOPs of one training token and the GPU peaks that MFU is measured against.

The training loop's log line and ``bench/train_throughput.py`` both take their FLOP/s and MFU
from here, so the two report the same figure. Training FLOPs per token (a multiply-add is 2
FLOPs; forward + backward = 3 x forward)::

    6 * N_dec              decoder: every weight of the layers, the final norm and the output
                           layer meets every position once (the input embedding is a lookup
                           and costs no FLOPs, so it is left out)
  + 12 * L * d * s         attention scores (Q K^T) and values (A V), forward and backward, over
                           the whole s x s square: no causal halving, as Megatron-LM's and
                           PaLM's MFU figures count it
  + 6 * N_proj * f_img     projector, which runs only at image positions; f_img = image
                           positions per token of the batch
  + c * N_enc * f_img      online vision encoder only (model.encoder.mode=online): a ViT meets
                           each of its weights once per patch, and each patch is one image
                           position; c = 2 for a frozen tower (forward only), 6 for a trained
                           one. The tower's own attention (about 4 * layers * width * n_img per
                           patch and pass) is left out, and N_enc counts the whole tower
                           (its unused pooling head included): both move it by a few percent.

With precomputed image embeddings (the default) the encoder costs nothing during training.
MFU = achieved model FLOP/s per GPU / the GPU's dense bf16 peak. FP8 runs are measured against
the same bf16 peak, so their MFU can be compared with bf16 runs directly.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from megatron_vlm.model.param_count import (
    decoder_parameters,
    encoder_parameters,
    projector_parameters,
)

# Dense (no sparsity) bf16 peak FLOP/s per GPU, matched as substrings of the CUDA device name,
# most specific first: "NVIDIA H100 PCIe" must not match the SXM figure.
PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops(device_name: Optional[str] = None) -> Optional[float]:
    """Dense bf16 peak FLOP/s of ``device_name`` (default: the current CUDA device), or None
    for a device the table does not know (then MFU is not reported)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def image_positions_fraction(batches: Iterable[dict]) -> float:
    """Image positions per token over host batches (dicts with ``image_mask`` [b, s])."""
    images = positions = 0
    for batch in batches:
        mask = batch["image_mask"]
        images += int(mask.sum())
        positions += mask.numel()
    if positions == 0:
        raise ValueError("image_positions_fraction: no batch positions given")
    return images / positions


def decoder_flop_parameters(decoder_cfg) -> int:
    """Decoder parameters that cost FLOPs: layers, final norm and output layer (the input
    embedding, a lookup, excluded)."""
    return decoder_parameters(decoder_cfg) - decoder_cfg.vocab_size * decoder_cfg.hidden_size


def flops_terms(cfg, image_fraction: float = 0.0, seq_length: Optional[int] = None,
                encoder_params: Optional[int] = None) -> dict[str, float]:
    """The terms of the training FLOPs per token (see the module docstring), by name.

    ``image_fraction`` is the share of sequence positions that are image positions;
    ``seq_length`` defaults to ``cfg.train.seq_length``; ``encoder_params`` (online encoder
    only) defaults to counting the configured tower, which needs open_clip.
    """
    if not 0.0 <= image_fraction <= 1.0:
        raise ValueError(f"image_fraction={image_fraction!r} must be in [0, 1] (image positions "
                         "per token)")
    seq = cfg.train.seq_length if seq_length is None else seq_length
    if seq <= 0:
        raise ValueError(f"seq_length={seq!r} must be positive")
    dec, enc = cfg.model.decoder, cfg.model.encoder
    terms = {
        "decoder": 6.0 * decoder_flop_parameters(dec),
        "attention": 12.0 * dec.num_layers * dec.hidden_size * seq,
        "projector": 6.0 * projector_parameters(cfg.model.projector, enc, dec.hidden_size)
        * image_fraction,
        "encoder": 0.0,
    }
    if enc.mode == "online":
        n_enc = encoder_parameters(enc) if encoder_params is None else encoder_params
        terms["encoder"] = (2.0 if enc.frozen else 6.0) * n_enc * image_fraction
    return terms


def flops_per_token(cfg, image_fraction: float = 0.0, seq_length: Optional[int] = None,
                    encoder_params: Optional[int] = None) -> float:
    """Training (forward + backward) model FLOPs per token; arguments as :func:`flops_terms`."""
    return sum(flops_terms(cfg, image_fraction, seq_length, encoder_params).values())


def mfu(flops_per_s_per_gpu: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization, or None when the peak is unknown."""
    return None if not peak else flops_per_s_per_gpu / peak


def formula(cfg, image_fraction: float = 0.0, seq_length: Optional[int] = None,
            device_name: Optional[str] = None, encoder_params: Optional[int] = None) -> str:
    """The FLOPs and MFU formula with this configuration's numbers, as printable lines."""
    dec, enc = cfg.model.decoder, cfg.model.encoder
    seq = cfg.train.seq_length if seq_length is None else seq_length
    terms = flops_terms(cfg, image_fraction, seq, encoder_params)
    n_dec = decoder_flop_parameters(dec)
    n_proj = projector_parameters(cfg.model.projector, enc, dec.hidden_size)
    lines = [
        "training FLOPs/token = 6*N_dec + 12*L*d*s + 6*N_proj*f_img"
        + (" + c*N_enc*f_img" if enc.mode == "online" else ""),
        f"  N_dec  = {n_dec:,} decoder parameters without the input embedding "
        "(layers, final norm, output layer)",
        f"  L={dec.num_layers} d={dec.hidden_size} s={seq}: attention scores and values, "
        "fwd+bwd, no causal halving",
        f"  N_proj = {n_proj:,} projector parameters ({cfg.model.projector.type}), "
        f"f_img = {image_fraction:.4f} image positions per token",
    ]
    if enc.mode == "online":
        c = 2 if enc.frozen else 6
        lines.append(f"  online encoder: c={c} ({'frozen: forward only' if enc.frozen else 'trained'}"
                     f"), N_enc*c*f_img = {terms['encoder']:.4g}; its attention is left out")
    lines.append("  = " + " + ".join(f"{terms[k]:.4g}" for k in terms if terms[k])
                 + f" = {sum(terms.values()):.4g} FLOPs/token")
    peak = peak_flops(device_name) if device_name is not None else None
    where = (f"{device_name}: {peak / 1e12:.0f} TFLOP/s" if peak
             else f"{device_name or 'this device'}: unknown, MFU n/a")
    lines.append(f"MFU = tokens/s per GPU * FLOPs/token / dense bf16 peak per GPU ({where}); "
                 "FP8 rows are measured against the same bf16 peak")
    return "\n".join(lines)
