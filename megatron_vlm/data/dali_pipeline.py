"""The batch image preprocessor: a DALI pipeline, with the PIL path for what DALI cannot decode.

:class:`ImagePreprocessor` turns a batch of encoded images (JPEG, PNG, WebP, BMP, TIFF bytes)
into normalized float tensors ``[b, 3, S, S]`` for the vision encoder. It runs a DALI pipeline
fed through ``external_source``: on a GPU with DALI's ``"mixed"`` decoder and GPU resize when
CUDA is present, in DALI's CPU mode otherwise (one log line says which). Resize modes,
interpolation (the encoder's: bicubic for SigLIP) and normalization are those of
:mod:`megatron_vlm.data.image_io`; the geometry of every image is computed on the host from its
header (:func:`~megatron_vlm.data.image_io.resize_geometry`) and fed to DALI per sample, so DALI
and the pure-PIL reference (:func:`~megatron_vlm.data.image_io.pil_preprocess`) cut and pad
exactly the same pixels; they then differ only by interpolation rounding (mean absolute
difference about 0.002 after normalization, measured in ``tests/test_precompute.py``).

A bad image makes a DALI batch fail as a whole, so images are checked first: the header is
parsed with PIL (cheap: no pixel decoding), and JPEG/PNG files whose end-of-image marker is
missing (truncated downloads) or formats DALI does not decode (GIF, ...) go to the PIL path
instead. If a DALI batch still fails, its images are decoded one by one to find the culprit; an
image DALI cannot decode is tried with PIL, and is reported as corrupt only if PIL fails too.

DALI is imported when a DALI preprocessor is built, not when this module is imported; without
DALI installed, ``decoder="dali"`` raises ValueError saying how to install it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_vlm.config import RESIZE_MODES
from megatron_vlm.data.image_io import (
    SIGLIP_NORM,
    Geometry,
    ImageDecodeError,
    ImageNorm,
    looks_truncated,
    pil_preprocess,
    probe_image,
    resize_geometry,
)

logger = logging.getLogger("megatron_vlm")

DECODERS = ("dali", "pil")
DEVICES = ("auto", "cpu", "cuda")
DALI_PIN = "nvidia-dali-cuda120==2.4.0"

# Image formats (PIL's names) handed to DALI; anything else PIL can read goes to the PIL path.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})


@dataclass
class ImageFailure:
    key: str
    reason: str
    detail: str


@dataclass
class PreprocessedBatch:
    """Images that decoded, in input order, and the ones that did not."""

    keys: List[str]
    images: torch.Tensor                     # [len(keys), 3, S, S] float32 on the preprocessor's device
    failures: List[ImageFailure] = field(default_factory=list)
    pil_decoded: int = 0                     # how many of ``keys`` went through the PIL path


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {DEVICES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available here (use cpu or auto)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as err:
        raise ValueError(f"DALI is not installed ({err}); install it with `pip install {DALI_PIN}` "
                         f"or use the PIL decoder (--decoder pil)") from None
    return dali, fn, types, feed_ndarray


class ImagePreprocessor:
    """Decode, resize and normalize batches of encoded images to ``[b, 3, S, S]`` float32.

    Args:
        image_size: ``S``, the encoder's input side.
        resize_mode: one of :data:`RESIZE_MODES`.
        norm: mean/std/interpolation (:func:`encoder_image_norm`).
        batch_size: the DALI pipeline's batch size; larger inputs are split, smaller (the last
            partial batch) are fed as they are.
        device: ``auto`` | ``cpu`` | ``cuda``; with CUDA the output tensors live on the GPU.
        decoder: ``dali`` (default) or ``pil`` (the reference path for everything).
        num_threads: DALI CPU threads (default: the CPU count, at most 8).
    """

    def __init__(self, image_size: int, resize_mode: str = "letterbox", norm: ImageNorm = SIGLIP_NORM,
                 batch_size: int = 64, device: str = "auto", decoder: str = "dali",
                 num_threads: Optional[int] = None):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {resize_mode!r} is not one of {RESIZE_MODES}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {DECODERS}")
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be at least 1; got {batch_size}")
        if int(image_size) < 1:
            raise ValueError(f"image size must be at least 1; got {image_size}")
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.norm = norm
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.decoder = decoder
        self.num_threads = int(num_threads or min(8, os.cpu_count() or 1))
        self.dali_failures = 0  # DALI batches that had to be retried image by image
        self._pipe = None
        self._arg_inputs: Tuple[str, ...] = ()
        if decoder == "dali":
            _import_dali()
            self._pipe = self._build_pipeline()
            if self.device.type == "cuda":
                logger.info("image decode: DALI GPU mode on %s (mixed decoder, GPU resize), %s, %dx%d",
                            self.device, resize_mode, self.image_size, self.image_size)
            else:
                # (no CUDA call here: this may run in a loader worker forked from a CUDA process)
                logger.info("image decode: DALI CPU mode, %d threads, %s, %dx%d",
                            self.num_threads, resize_mode, self.image_size, self.image_size)
        else:
            logger.info("image decode: PIL on the CPU, %s, %dx%d", resize_mode, self.image_size, self.image_size)

    # -- DALI pipeline ------------------------------------------------------------------------
    def _build_pipeline(self):
        dali, fn, types, _ = _import_dali()
        gpu = self.device.type == "cuda"
        interp = types.INTERP_CUBIC if self.norm.interpolation == "bicubic" else types.INTERP_LINEAR
        mode = self.resize_mode
        fill = [float(v) for v in self.norm.fill]
        mean = [255.0 * m for m in self.norm.mean]
        std = [255.0 * s for s in self.norm.std]
        self._arg_inputs = ("size",) if mode == "resize-naive" else ("anchor", "window", "size")

        @dali.pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                           device_id=self.device.index if gpu else None, prefetch_queue_depth=1)
        def pipeline():
            raw = fn.external_source(name="raw", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            img = fn.decoders.image(raw, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)
            if mode == "letterbox":
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
                window = fn.external_source(name="window", dtype=types.FLOAT, ndim=1)
                img = fn.slice(img, anchor, window, axis_names="HW", normalized_anchor=False,
                               normalized_shape=False, out_of_bounds_policy="pad", fill_values=fill)
                img = fn.resize(img, size=size, interp_type=interp, antialias=True)
            elif mode == "resize-crop":
                anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)
                window = fn.external_source(name="window", dtype=types.FLOAT, ndim=1)
                img = fn.resize(img, size=size, interp_type=interp, antialias=True)
                img = fn.slice(img, anchor, window, axis_names="HW", normalized_anchor=False,
                               normalized_shape=False, out_of_bounds_policy="pad", fill_values=fill)
            else:
                img = fn.resize(img, size=size, interp_type=interp, antialias=True)
            return fn.crop_mirror_normalize(img, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

        pipe = pipeline()
        pipe.build()
        return pipe

    def _run_dali(self, datas: Sequence[bytes], geoms: Sequence[Geometry]) -> torch.Tensor:
        _, _, _, feed_ndarray = _import_dali()
        pipe = self._pipe
        pipe.feed_input("raw", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        args = {
            "anchor": [np.asarray(g.anchor, dtype=np.float32) for g in geoms],
            "window": [np.asarray(g.window, dtype=np.float32) for g in geoms],
            "size": [np.asarray(g.resize, dtype=np.float32) for g in geoms],
        }
        for name in self._arg_inputs:
            pipe.feed_input(name, args[name])
        (out,) = pipe.run()
        s = self.image_size
        result = torch.empty((len(datas), 3, s, s), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(out.as_tensor(), result, cuda_stream=stream)
        if stream is not None:
            stream.synchronize()  # the copy is done before DALI reuses its output buffer
        return result

    def _dali_or_retry(self, datas: List[bytes], geoms: List[Geometry]) -> List[Optional[torch.Tensor]]:
        """Decode with DALI; if the batch fails, rebuild the pipeline and decode one by one."""
        try:
            return list(self._run_dali(datas, geoms).unbind(0))
        except RuntimeError as err:
            self.dali_failures += 1
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            logger.debug("DALI batch of %d failed (%s); decoding its images one by one",
                         len(datas), lines[-1] if lines else type(err).__name__)
            self._pipe = self._build_pipeline()
        results: List[Optional[torch.Tensor]] = []
        for data, geom in zip(datas, geoms):
            try:
                results.append(self._run_dali([data], [geom])[0])
            except RuntimeError:
                self._pipe = self._build_pipeline()
                results.append(None)
        return results

    # -- public -------------------------------------------------------------------------------
    def __call__(self, items: Sequence[Tuple[str, bytes]]) -> PreprocessedBatch:
        """Preprocess ``(key, encoded bytes)`` pairs; undecodable ones come back as failures."""
        outputs: List[Optional[torch.Tensor]] = [None] * len(items)
        failures: Dict[int, ImageFailure] = {}
        to_dali: List[Tuple[int, Geometry]] = []
        to_pil: List[int] = []
        for i, (key, data) in enumerate(items):
            try:
                info = probe_image(data)
            except ImageDecodeError as err:
                failures[i] = ImageFailure(key, err.reason, err.detail)
                continue
            if self.decoder == "dali" and info.format in DALI_FORMATS and not looks_truncated(data, info.format):
                to_dali.append((i, resize_geometry(info.width, info.height, self.image_size, self.resize_mode)))
            else:
                to_pil.append(i)
        for start in range(0, len(to_dali), self.batch_size):
            chunk = to_dali[start:start + self.batch_size]
            decoded = self._dali_or_retry([items[i][1] for i, _ in chunk], [g for _, g in chunk])
            for (i, _), tensor in zip(chunk, decoded):
                if tensor is None:
                    to_pil.append(i)
                else:
                    outputs[i] = tensor
        pil_decoded = 0
        for i in sorted(to_pil):
            key, data = items[i]
            try:
                outputs[i] = pil_preprocess(data, self.image_size, self.resize_mode, self.norm).to(self.device)
                pil_decoded += 1
            except ImageDecodeError as err:
                failures[i] = ImageFailure(key, err.reason, err.detail)
        ok = [i for i in range(len(items)) if outputs[i] is not None]
        s = self.image_size
        images = (torch.stack([outputs[i] for i in ok]) if ok
                  else torch.empty((0, 3, s, s), dtype=torch.float32, device=self.device))
        return PreprocessedBatch([items[i][0] for i in ok], images,
                                 [failures[i] for i in sorted(failures)], pil_decoded)
