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
MFU = achieved model FLOP/s per GPU / the GPU's dense peak. Every run is measured against the
dense bf16 peak, so runs of any precision compare directly; an FP8 run is also measured against
the dense FP8 peak (about twice the bf16 one), which says how much of the FP8 hardware it used.
The bench's rows and the training log name the peak, ``mfu_bf16_peak`` and ``mfu_fp8_peak``
(:func:`mfu_by_peak`).

The peaks come from :data:`PEAKS`, keyed by the CUDA device name, unless
``MEGATRON_VLM_PEAK_TFLOPS=BF16[,FP8]`` (dense TFLOP/s per GPU) gives this machine's own, for a
card the table does not know or one clocked differently.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megatron_vlm.model.param_count import (
    decoder_parameters,
    encoder_parameters,
    projector_parameters,
)

# Dense (no sparsity) peak FLOP/s per GPU: (bf16, FP8), FP8 None where the tensor cores have no
# FP8. A key matches the CUDA device name as whole words ("A100" is not in "NVIDIA RTX A1000"),
# and the first key that matches wins, so the PCIe and NVL cards (lower clocks and power than SXM)
# come before the bare name that would also match them: "NVIDIA H200 NVL" contains "H200".
# The SXM cards' CUDA names carry no form factor ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAKS: dict[str, tuple[float, Optional[float]]] = {
    "H100 PCIe": (756e12, 1513e12),
    "H100 NVL": (835e12, 1671e12),
    "H100": (989e12, 1979e12),
    "H200 NVL": (835e12, 1671e12),
    "H200": (989e12, 1979e12),
    "A100": (312e12, None),
}
PEAK_ENV = "MEGATRON_VLM_PEAK_TFLOPS"
"""Environment variable with this machine's dense peaks, ``BF16[,FP8]`` in TFLOP/s per GPU."""


@dataclass(frozen=True)
class DevicePeaks:
    """The dense peaks MFU is measured against, and where they came from."""

    device_name: str
    bf16: Optional[float]  # FLOP/s; None: unknown, no MFU
    fp8: Optional[float]  # FLOP/s; None: unknown or no FP8 on this device
    key: Optional[str] = None  # the PEAKS key that matched the device name
    source: str = "table"  # "table", or the flag / variable that overrode it
    note: str = ""  # why a peak is missing

    @property
    def overridden(self) -> bool:
        return self.source != "table"

    def describe(self) -> str:
        """One line: which peaks, for which device, from where."""
        if self.bf16 is None:
            return self.note
        fp8 = f"{self.fp8 / 1e12:g}" if self.fp8 else "none"
        where = f"table key {self.key!r}" if not self.overridden else f"from {self.source}"
        return (f"{self.device_name}: dense bf16 {self.bf16 / 1e12:g}, FP8 {fp8} TFLOP/s "
                f"({where})")

    def as_dict(self) -> dict:
        """The JSON record of the peaks (TFLOP/s)."""
        return {"device_name": self.device_name, "key": self.key,
                "bf16_tflops": None if self.bf16 is None else self.bf16 / 1e12,
                "fp8_tflops": None if self.fp8 is None else self.fp8 / 1e12,
                "source": self.source, "overridden": self.overridden, "note": self.note}


def table_peaks(device_name: str) -> DevicePeaks:
    """The peaks :data:`PEAKS` gives ``device_name``; unknown devices get None and a note."""
    for key, (bf16, fp8) in PEAKS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name,
                     flags=re.IGNORECASE):
            return DevicePeaks(device_name, bf16, fp8, key=key)
    return DevicePeaks(device_name, None, None, note=(
        f"no peak known for {device_name!r}: MFU n/a (set {PEAK_ENV}=BF16[,FP8], this "
        "device's dense TFLOP/s, or give them to the bench as --peak-tflops BF16[,FP8])"))


def parse_peak_tflops(text: str, source: str) -> tuple[float, Optional[float]]:
    """``BF16[,FP8]`` dense TFLOP/s per GPU -> (bf16, fp8) FLOP/s; ``source`` (the flag or
    variable it came from) names it in the error."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{source}={text!r}: expected BF16[,FP8], the dense peak TFLOP/s per "
                         "GPU as one or two positive numbers, e.g. 989 or 989,1979")
    return values[0] * 1e12, (values[1] * 1e12 if len(values) == 2 else None)


def device_peaks(device_name: Optional[str] = None, override: Optional[str] = None,
                 override_source: str = "--peak-tflops") -> DevicePeaks:
    """The peaks of ``device_name`` (default: the current CUDA device; "CPU" without one).

    ``override`` (``BF16[,FP8]`` TFLOP/s, e.g. a command-line flag named ``override_source``)
    wins, then :data:`PEAK_ENV` (ignored when empty), then the table. An override replaces both
    peaks: without an FP8 figure the FP8 peak is unknown. A malformed one is a ValueError.
    """
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    from_env = os.environ.get(PEAK_ENV, "").strip() or None
    for text, source in ((override, override_source), (from_env, PEAK_ENV)):
        if text is not None:
            bf16, fp8 = parse_peak_tflops(text, source)
            key = table_peaks(device_name).key
            return DevicePeaks(device_name, bf16, fp8, key=key, source=source)
    return table_peaks(device_name)


def peak_flops(device_name: Optional[str] = None) -> Optional[float]:
    """Dense bf16 peak FLOP/s of ``device_name`` in the table; without a name, of the current
    CUDA device, where :data:`PEAK_ENV` can override it. None for a device the table does not
    know (then MFU is not reported)."""
    if device_name is None:
        return device_peaks().bf16 if torch.cuda.is_available() else None
    return table_peaks(device_name).bf16


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


def mfu_by_peak(flops_per_s_per_gpu: float, peaks: DevicePeaks, fp8: bool) -> dict:
    """``mfu_bf16_peak`` (every run) and ``mfu_fp8_peak`` (FP8 runs only; None otherwise):
    MFU against each dense peak, None where that peak is unknown."""
    return {"mfu_bf16_peak": mfu(flops_per_s_per_gpu, peaks.bf16),
            "mfu_fp8_peak": mfu(flops_per_s_per_gpu, peaks.fp8) if fp8 else None}


def formula(cfg, image_fraction: float = 0.0, seq_length: Optional[int] = None,
            device_name: Optional[str] = None, encoder_params: Optional[int] = None,
            peaks: Optional[DevicePeaks] = None) -> str:
    """The FLOPs and MFU formula with this configuration's numbers, as printable lines.
    ``peaks`` (default: the table's for ``device_name``) are the ones MFU is measured against."""
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
    if peaks is None and device_name is not None:
        peaks = table_peaks(device_name)
    where = (peaks.describe() if peaks is not None and peaks.bf16
             else f"{device_name or 'this device'}: peak unknown, MFU n/a")
    lines.append("MFU = tokens/s per GPU * FLOPs/token / dense peak per GPU: mfu_bf16_peak "
                 "against the bf16 peak (every row), mfu_fp8_peak against the FP8 peak (FP8 "
                 f"rows only); {where}")
    return "\n".join(lines)
