"""Images for the embedding precompute: decoding, resizing, normalization, inputs and the run itself.

Decoding and resizing
---------------------
:class:`ImagePreprocessor` turns a batch of encoded images (JPEG, PNG, WebP, BMP, TIFF bytes) into
normalized float tensors ``[b, 3, S, S]`` for the vision encoder. It runs a DALI pipeline fed
through ``external_source``: on a GPU with DALI's ``"mixed"`` decoder and GPU resize when CUDA is
present, in DALI's CPU mode otherwise (one log line says which). The three resize modes:

* ``letterbox``: keep the aspect ratio; pad the image to a square of side ``max(w, h)`` with the
  encoder's mean colour (``int(255 * mean)`` per channel, the image centred with the extra pixel,
  if any, on the bottom/right), then resize the square to ``S x S``. This is the "letterbox" of
  the paper's fine-tuning recipe.
* ``resize-naive``: stretch to ``S x S``.
* ``resize-crop``: resize the shorter side to ``S`` (the longer one to ``int(S * long / short)``),
  then take the centred ``S x S`` window (offset ``round((side - S) / 2)``).

Interpolation follows the encoder's preprocessing config (bicubic for SigLIP); normalization is
``(x / 255 - mean) / std`` with the encoder's mean and std (:func:`encoder_image_norm`).

The geometry of every image (window and resize sizes) is computed on the host from the image
header (:func:`resize_geometry`) and fed to DALI per sample, so DALI and the pure-PIL reference
(:func:`pil_preprocess`) cut and pad exactly the same pixels; they then differ only by
interpolation rounding (mean absolute difference about 0.002 after normalization, measured in
``tests/test_precompute.py``). EXIF orientation is ignored by both, as by PIL-based loaders.

A bad image makes a DALI batch fail as a whole, so images are checked first: the header is parsed
with PIL (cheap: no pixel decoding), and JPEG/PNG files whose end-of-image marker is missing
(truncated downloads) or formats DALI does not decode (GIF, ...) go to the PIL path instead. If
a DALI batch still fails, its images are decoded one by one to find the culprit; an image DALI
cannot decode is tried with PIL, and is reported as corrupt only if PIL fails too.

Precompute
----------
:func:`iter_tar_records` (webdataset shards in the DataComp layout) and
:func:`iter_folder_records` (an image folder with a JSONL file or an image list) yield
:class:`ImageRecord`; :func:`precompute_embeddings` runs them through the preprocessor and a frozen
encoder and writes caption shards (:class:`megatron_vlm.data.formats.EmbeddingShardWriter`).
Inputs are processed in a fixed order, rows fill shards in order, and encoder batches never
straddle a shard boundary, so an interrupted run resumes at the first unfinished shard and writes
the same files an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tarfile
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

logger = logging.getLogger("megatron_vlm")

from megatron_vlm.config import RESIZE_MODES  # noqa: E402  (one list for the tools and the config)
DECODERS = ("dali", "pil")
DEVICES = ("auto", "cpu", "cuda")
INTERPOLATIONS = ("bicubic", "bilinear")
DALI_PIN = "nvidia-dali-cuda120==2.4.0"

# Image formats (PIL's names) handed to DALI; anything else PIL can read goes to the PIL path.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
# End-of-image markers looked for near the end of the file; a file without one is truncated
# (or carries a long trailer) and is decoded with PIL, which tells the two apart.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096

# Reasons an image is skipped (the keys of PrecomputeSummary.skipped).
SKIP_MISSING = "missing"        # no image file / no image member for the key
SKIP_UNREADABLE = "unreadable"  # not an image PIL recognizes (empty, garbage, unknown format)
SKIP_CORRUPT = "corrupt"        # header fine, pixels undecodable (truncated, damaged)
SKIP_BAD_CAPTION = "bad_caption"  # caption file present but unreadable (webdataset inputs)

# Webdataset member extensions: images in order of preference, then caption files.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_CAPTION_EXTS = ("txt", "json")

MANIFEST_NAME = "precompute.json"
SKIPPED_NAME = "skipped.jsonl"
MANIFEST_FORMAT = "megatron-vlm image precompute"


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``reason`` is one of the SKIP_* names."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageNorm:
    """Per-channel mean and std (of pixel values scaled to [0, 1]) and the resize filter."""

    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"image mean/std need 3 values (RGB); got mean={self.mean}, std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"image std must be positive; got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"image interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")

    @property
    def fill(self) -> Tuple[int, int, int]:
        """Letterbox padding colour: the mean as 8-bit RGB."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def as_dict(self) -> Dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation}


SIGLIP_NORM = ImageNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


def encoder_image_norm(encoder_cfg) -> ImageNorm:
    """The mean/std/interpolation the encoder named by ``encoder_cfg`` was trained with.

    For an open_clip architecture: the architecture config's ``preprocess_cfg`` if it has one,
    else the first pretrained tag's config (SigLIP: 0.5/0.5, bicubic), else open_clip's defaults.
    For ``custom`` towers: SigLIP's 0.5/0.5, bicubic.
    """
    name = encoder_cfg.open_clip_model
    if name == "custom":
        return SIGLIP_NORM
    from megatron_vlm._compat.torchvision_shim import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"model.encoder.open_clip_model={name!r} is not an open_clip architecture "
                         f"known to this install, and is not 'custom'")
    cfg = dict(model_cfg.get("preprocess_cfg") or {})
    if "mean" not in cfg:
        for tag in open_clip.list_pretrained_tags_by_model(name):
            pre = open_clip.get_pretrained_cfg(name, tag)
            if pre.get("mean") is not None:
                cfg = {k: pre[k] for k in ("mean", "std", "interpolation") if k in pre}
                break
    mean = tuple(float(x) for x in cfg.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(float(x) for x in cfg.get("std", OPENAI_DATASET_STD))
    interp = cfg.get("interpolation") or "bicubic"
    if interp not in INTERPOLATIONS:
        logger.warning("encoder %s asks for %s interpolation; using bicubic", name, interp)
        interp = "bicubic"
    return ImageNorm(mean, std, interp)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Geometry and the PIL reference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How one image becomes ``S x S``: a window (padding where it leaves the image) and a resize.

    ``pad_first`` (letterbox): the window is taken from the original image, then resized to
    ``resize``. Otherwise the image is resized to ``resize`` first, then the window is taken.
    """

    anchor: Tuple[int, int]   # (y, x) of the window's top-left corner; negative = padding
    window: Tuple[int, int]   # (h, w) of the window
    resize: Tuple[int, int]   # (h, w) to resize to
    pad_first: bool


def resize_geometry(width: int, height: int, size: int, mode: str) -> Geometry:
    """The window and resize of an image of ``width x height`` for resize ``mode``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive; got {width}x{height}")
    s = int(size)
    if mode == "letterbox":
        m = max(width, height)
        return Geometry((-((m - height) // 2), -((m - width) // 2)), (m, m), (s, s), True)
    if mode == "resize-naive":
        return Geometry((0, 0), (s, s), (s, s), False)
    if mode == "resize-crop":
        if width <= height:
            new_w, new_h = s, int(s * height / width)
        else:
            new_w, new_h = int(s * width / height), s
        return Geometry((int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))), (s, s),
                        (new_h, new_w), False)
    raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


# Leading bytes of the formats read here: a file that starts like an image but cannot be read
# is "corrupt" (damaged or truncated), anything else "unreadable" (not an image).
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def sniff_format(data: bytes) -> Optional[str]:
    """The image format the leading bytes announce, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def probe_image(data: bytes) -> ImageInfo:
    """Format and size from the image header (no pixel decoding); ImageDecodeError if unusable."""
    from PIL import Image

    if not data:
        raise ImageDecodeError(SKIP_UNREADABLE, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format or "", im.size
    except Exception as err:  # PIL raises many types for garbage input
        sniffed = sniff_format(data)
        if sniffed is not None:
            raise ImageDecodeError(SKIP_CORRUPT, f"{sniffed} of {len(data)} bytes with an unreadable header "
                                                 f"({type(err).__name__}: {err})") from None
        raise ImageDecodeError(SKIP_UNREADABLE, f"not an image file ({type(err).__name__}: {err}; "
                                                f"starts with {data[:8]!r})") from None
    if w <= 0 or h <= 0:
        raise ImageDecodeError(SKIP_UNREADABLE, f"image has size {w}x{h}")
    return ImageInfo(fmt, int(w), int(h))


def looks_truncated(data: bytes, fmt: str) -> bool:
    """True when a JPEG/PNG lacks its end-of-image marker near the end of the file."""
    marker = _END_MARKERS.get(fmt)
    return marker is not None and marker not in data[-_TAIL_BYTES:]


_PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_truncation():
    """Make PIL raise on truncated files even if some library enabled LOAD_TRUNCATED_IMAGES."""
    from PIL import ImageFile

    with _PIL_LOCK:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def decode_pil(data: bytes):
    """Decode fully with PIL and convert to RGB; ImageDecodeError naming why if that fails."""
    from PIL import Image

    info = probe_image(data)
    try:
        with _strict_truncation():
            im = Image.open(io.BytesIO(data))
            im.load()
        return im.convert("RGB")
    except Exception as err:
        raise ImageDecodeError(SKIP_CORRUPT, f"{info.format} {info.width}x{info.height}: "
                                             f"{type(err).__name__}: {err}") from None


def _pil_resample(interpolation: str):
    from PIL import Image

    return Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR


def _pil_window(im, geometry: Geometry, fill: Tuple[int, int, int]):
    from PIL import Image

    (ay, ax), (wh, ww) = geometry.anchor, geometry.window
    if (ay, ax) == (0, 0) and (wh, ww) == (im.height, im.width):
        return im
    out = Image.new("RGB", (ww, wh), fill)
    out.paste(im, (-ax, -ay))
    return out


def pil_preprocess(data: bytes, image_size: int, resize_mode: str, norm: ImageNorm = SIGLIP_NORM) -> torch.Tensor:
    """The reference path: PIL decode, the same geometry, normalize -> float32 ``[3, S, S]``."""
    im = decode_pil(data)
    g = resize_geometry(im.width, im.height, image_size, resize_mode)
    resample = _pil_resample(norm.interpolation)
    if g.pad_first:
        im = _pil_window(im, g, norm.fill)
    if (im.height, im.width) != g.resize:
        im = im.resize((g.resize[1], g.resize[0]), resample)
    if not g.pad_first:
        im = _pil_window(im, g, norm.fill)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
    return ((arr - mean) / std).contiguous()


# --------------------------------------------------------------------------------------------
# The batch preprocessor (DALI, with the PIL path for what DALI should not or cannot decode)
# --------------------------------------------------------------------------------------------


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
                logger.info("image decode: DALI CPU mode (no CUDA), %d threads, %s, %dx%d",
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


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """One image-caption pair to embed. ``source`` says where it came from, for messages."""

    key: str
    source: str
    data: Optional[bytes] = None       # the encoded image (webdataset inputs)
    path: Optional[str] = None         # the image file, read when needed (folder inputs)
    caption: Optional[str] = None
    problem: Optional[Tuple[str, str]] = None   # (skip reason, detail) known before decoding

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ImageDecodeError(SKIP_MISSING, "no image")
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ImageDecodeError(SKIP_MISSING, f"no such file: {self.path}") from None
        except OSError as err:
            raise ImageDecodeError(SKIP_UNREADABLE, f"cannot read {self.path}: {err}") from None


def expand_tar_inputs(paths: Sequence[str]) -> List[str]:
    """Tar files in processing order: each path as given, a directory as its sorted ``*.tar``."""
    out: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            tars = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tar"))
            if not tars:
                raise FileNotFoundError(f"--tar {path}: directory holds no *.tar files")
            out.extend(tars)
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise FileNotFoundError(f"--tar {path}: no such file or directory")
    return out


def _split_member_name(name: str) -> Tuple[str, str]:
    """Webdataset convention: key = path up to the first dot of the base name; ext = the rest."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def _tar_record(tar_path: str, key: str, members: Dict[str, bytes]) -> ImageRecord:
    caption: Optional[str] = None
    problem: Optional[Tuple[str, str]] = None
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            problem = (SKIP_BAD_CAPTION, f"{key}.txt is not UTF-8 text ({err})")
    elif "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = (SKIP_BAD_CAPTION, f"{key}.json is not valid JSON ({err})")
        else:
            value = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            if value is not None and not isinstance(value, str):
                problem = (SKIP_BAD_CAPTION, f"{key}.json field 'caption' is {type(value).__name__}, not a string")
            elif value is not None:
                caption = value.strip()
    ext = next((e for e in TAR_IMAGE_EXTS if e in members), None)
    if ext is None:
        return ImageRecord(key, f"{tar_path}:{key}", caption=caption,
                           problem=(SKIP_MISSING, f"no image member ({'/'.join('.' + e for e in TAR_IMAGE_EXTS)}) "
                                                  f"for key {key!r} in {tar_path}"))
    return ImageRecord(key, f"{tar_path}:{key}.{ext}", data=members[ext], caption=caption, problem=problem)


def iter_tar_records(paths: Sequence[str], skip_keys: Optional[Set[str]] = None) -> Iterator[ImageRecord]:
    """Records of webdataset tar shards (DataComp layout: KEY.jpg/.png with KEY.txt/.json), streamed.

    Consecutive members with the same key form one record. Members of keys in ``skip_keys`` are
    not read into memory (their records come back without data).
    """
    wanted = set(TAR_IMAGE_EXTS) | set(TAR_CAPTION_EXTS)
    skip_keys = skip_keys or set()
    for tar_path in expand_tar_inputs(paths):
        current: Optional[str] = None
        members: Dict[str, bytes] = {}
        last_member = "(start of file)"
        try:
            with tarfile.open(tar_path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member_name(member.name)
                    if key != current:
                        if current is not None:
                            yield _tar_record(tar_path, current, members)
                        current, members = key, {}
                    if ext in wanted and key not in skip_keys:
                        handle = tar.extractfile(member)
                        members[ext] = handle.read() if handle is not None else b""
                    elif ext in wanted:
                        members[ext] = b""
                    last_member = member.name
                if current is not None:
                    yield _tar_record(tar_path, current, members)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{tar_path}: not a readable tar file after member {last_member!r} ({err})") from None


def _jsonl_records(image_folder: str, jsonl: str) -> Iterator[ImageRecord]:
    with open(jsonl, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{jsonl}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: a record must be a JSON object with 'image' (and 'key', "
                                 f"'caption'); got {type(rec).__name__}")
            image = rec.get("image")
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: field 'image' must be a non-empty string (a path relative to "
                                 f"{image_folder}); got {image!r}")
            key = rec.get("key", image)
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where}: field 'key' must be a non-empty string; got {key!r}")
            caption = rec.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise ValueError(f"{where}: field 'caption' of key {key!r} must be a string or null; "
                                 f"got {type(caption).__name__}")
            yield _folder_record(image_folder, key, image, caption, where)


def _image_list_records(image_folder: str, image_list: str) -> Iterator[ImageRecord]:
    with open(image_list, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            rel = line.strip()
            if not rel or rel.startswith("#"):
                continue
            yield _folder_record(image_folder, rel, rel, None, f"{image_list}:{lineno}")


def _folder_record(image_folder: str, key: str, rel: str, caption: Optional[str], where: str) -> ImageRecord:
    path = os.path.join(image_folder, rel)
    if not os.path.isfile(path):
        return ImageRecord(key, f"{where} ({path})", path=path, caption=caption,
                           problem=(SKIP_MISSING, f"no such file: {path}"))
    return ImageRecord(key, f"{where} ({path})", path=path,
                       caption=caption.strip() if caption is not None else None)


def count_folder_records(jsonl: Optional[str] = None, image_list: Optional[str] = None) -> int:
    """Number of records (non-blank lines) of a JSONL file or an image list, for progress bars."""
    path = jsonl or image_list
    n = 0
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if s and not (image_list and s.startswith("#")):
                n += 1
    return n


def iter_folder_records(image_folder: str, jsonl: Optional[str] = None,
                        image_list: Optional[str] = None) -> Iterator[ImageRecord]:
    """Records of an image folder with a JSONL file (``{"key", "image", "caption"}``, ``key``
    defaulting to ``image``; ``caption`` optional) or an image list (one relative path a line,
    the path being the key; no captions). A malformed JSONL line raises ValueError naming the
    file, the line and the field; a missing image file gives a record marked missing."""
    if (jsonl is None) == (image_list is None):
        raise ValueError("give exactly one of a JSONL file or an image list with an image folder")
    if not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder {image_folder}: no such directory")
    src = jsonl or image_list
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{'--jsonl' if jsonl else '--image-list'} {src}: no such file")
    if jsonl is not None:
        return _jsonl_records(image_folder, jsonl)
    return _image_list_records(image_folder, image_list)


# --------------------------------------------------------------------------------------------
# The precompute run
# --------------------------------------------------------------------------------------------


class SkipLimitExceeded(ValueError):
    """More images were skipped than ``max_skips`` allows."""


@dataclass
class SkippedImage:
    key: str
    reason: str
    detail: str
    source: str

    def as_dict(self) -> Dict[str, str]:
        return {"key": self.key, "reason": self.reason, "detail": self.detail, "source": self.source}


@dataclass
class PrecomputeSummary:
    """What a precompute run did (this run only; ``resumed`` rows were already in finished shards)."""

    embedded: int = 0
    resumed: int = 0
    skipped: List[SkippedImage] = field(default_factory=list)
    duplicates: int = 0
    shards: int = 0
    new_shards: int = 0
    seconds: float = 0.0
    pil_decoded: int = 0
    captions: int = 0
    caption_tokens: int = 0
    tokenized: bool = False
    output_dir: str = ""
    device: str = "cpu"
    decoder: str = "dali"

    @property
    def skipped_by_reason(self) -> Dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def lines(self, max_keys: int = 20) -> List[str]:
        by_reason = ", ".join(f"{r}: {n}" for r, n in self.skipped_by_reason.items()) or "none"
        captions = (f"{self.captions} with captions, {self.caption_tokens} caption tokens" if self.tokenized
                    else f"{self.captions} with captions, not stored: no --tokenizer")
        out = [
            f"precompute summary ({self.output_dir})",
            f"  images embedded   {self.embedded} ({captions}; {self.pil_decoded} decoded by the PIL path)",
            f"  already done      {self.resumed} (in finished shards, not redone)",
            f"  skipped           {len(self.skipped)} ({by_reason})",
            f"  duplicate keys    {self.duplicates} (later occurrences ignored)",
            f"  shards            {self.shards} ({self.new_shards} written by this run)",
            f"  seconds           {self.seconds:.1f}",
            f"  images/s          {self.images_per_second:.1f} ({self.decoder} decode on {self.device})",
        ]
        if self.skipped:
            shown = self.skipped[:max_keys]
            out.append("  skipped keys      " + ", ".join(f"{s.key} ({s.reason})" for s in shown)
                       + (f", ... ({len(self.skipped)} in all)" if len(self.skipped) > max_keys else ""))
            out.append(f"  full list         {os.path.join(self.output_dir, SKIPPED_NAME)}")
        return out

    def as_dict(self) -> Dict[str, Any]:
        return {"embedded": self.embedded, "resumed": self.resumed, "skipped": len(self.skipped),
                "skipped_by_reason": self.skipped_by_reason, "duplicates": self.duplicates,
                "shards": self.shards, "new_shards": self.new_shards, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 2), "pil_decoded": self.pil_decoded,
                "captions": self.captions, "caption_tokens": self.caption_tokens}


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_manifest(output_dir: str, settings: Dict[str, Any]) -> None:
    """Write ``precompute.json``; if the directory already has one, its settings must agree.

    ``settings["inputs"]`` is recorded but not compared (a resumed run may name more inputs).
    """
    path = os.path.join(output_dir, MANIFEST_NAME)
    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err}); delete it or use another --output") from None
        old_settings = old.get("settings", {}) if isinstance(old, dict) else {}
        diffs = [f"{k}: {old_settings.get(k)!r} before, {v!r} now" for k, v in settings.items()
                 if k != "inputs" and old_settings.get(k) != v]
        if diffs:
            raise ValueError(f"--output {output_dir} holds embeddings written with other settings ("
                             + "; ".join(diffs) + "); use a new --output directory or delete this one")
    _atomic_write_text(path, json.dumps({"format": MANIFEST_FORMAT, "settings": settings}, indent=1) + "\n")


def _write_skipped(output_dir: str, skipped: Sequence[SkippedImage]) -> str:
    path = os.path.join(output_dir, SKIPPED_NAME)
    _atomic_write_text(path, "".join(json.dumps(s.as_dict()) + "\n" for s in skipped))
    return path


def encode_images(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run the frozen encoder (eval, no autograd; bf16 autocast on CUDA) -> float32 on the CPU."""
    encoder.eval()
    with torch.inference_mode():
        if images.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = encoder(images)
        else:
            out = encoder(images)
    return out.float().cpu()


def precompute_embeddings(
    records: Iterable[ImageRecord] | Callable[[Set[str]], Iterable[ImageRecord]],
    *,
    encoder: torch.nn.Module,
    preprocessor: ImagePreprocessor,
    output_dir: str,
    n_img: int,
    d_enc: int,
    tokenizer=None,
    dtype: str = "bf16",
    rows_per_shard: int = 4096,
    max_skips: int = 0,
    settings: Optional[Dict[str, Any]] = None,
    total: Optional[int] = None,
    progress: bool = True,
    prefetch: int = 1,
) -> PrecomputeSummary:
    """Embed ``records`` into caption shards under ``output_dir`` and return the summary.

    ``records`` is an iterable, or a callable that gets the set of keys already in finished
    shards and returns one (so a reader can avoid loading those). Keys in finished shards of
    ``output_dir`` are not processed again; a resumed run starts a new shard after them.
    Encoder batches never straddle a shard boundary, so the rows of every shard (and their
    bytes) do not depend on where an earlier run stopped.

    Skipped images (missing, unreadable, corrupt, bad caption) are listed in ``skipped.jsonl``;
    more than ``max_skips`` of them stop the run with :class:`SkipLimitExceeded` naming the last
    key; the unfinished shard is dropped and the finished ones stay. A later occurrence of a key
    is ignored (counted in ``duplicates``). ``prefetch`` batches are read and decoded in a
    background thread while the encoder runs.
    """
    from tqdm import tqdm

    from megatron_vlm.data.formats import EmbeddingShardWriter

    if max_skips < 0:
        raise ValueError(f"--max-skips must be >= 0; got {max_skips}")
    if rows_per_shard < 1:
        raise ValueError(f"rows per shard must be >= 1; got {rows_per_shard}")
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    if settings is not None:
        check_manifest(output_dir, settings)
    summary = PrecomputeSummary(resumed=0, output_dir=output_dir, device=str(preprocessor.device),
                                decoder=preprocessor.decoder, tokenized=tokenizer is not None)
    batch_size = preprocessor.batch_size
    seen: Set[str] = set()
    pending: List[ImageRecord] = []
    # Decoded, not yet encoded: (key, image [3,S,S], caption tokens or None, has a caption)
    buffered: deque = deque()
    rows_in_shard = 0  # rows written into the current (unfinished) shard by this run
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") if prefetch > 0 else None
    in_flight: deque = deque()

    bar = tqdm(total=total, unit="img", desc="precompute", dynamic_ncols=True, disable=not progress,
               mininterval=1.0)

    def skip(key: str, reason: str, detail: str, source: str) -> None:
        summary.skipped.append(SkippedImage(key, reason, detail, source))
        bar.update(1)
        bar.set_postfix(skipped=len(summary.skipped), refresh=False)
        if len(summary.skipped) > max_skips:
            path = _write_skipped(output_dir, summary.skipped)
            raise SkipLimitExceeded(
                f"{len(summary.skipped)} images skipped, more than --max-skips={max_skips}; the last: "
                f"key {key!r} from {source}: {reason}: {detail}. All skipped keys are listed in {path}; "
                f"finished shards are kept and a rerun resumes after them")

    def tokens_of(record: ImageRecord) -> Optional[List[int]]:
        if tokenizer is None or record.caption is None:
            return None
        return list(tokenizer.encode(record.caption))

    def decode(batch: List[ImageRecord]):
        """Runs in the decode thread: read bytes and preprocess; returns what the main thread needs."""
        items: List[Tuple[str, bytes]] = []
        read_failures: List[Tuple[ImageRecord, ImageDecodeError]] = []
        for rec in batch:
            if rec.problem is not None:
                read_failures.append((rec, ImageDecodeError(*rec.problem)))
                continue
            try:
                items.append((rec.key, rec.read()))
            except ImageDecodeError as err:
                read_failures.append((rec, err))
        return batch, read_failures, preprocessor(items) if items else None

    def consume(result) -> None:
        batch, read_failures, pre = result
        by_key = {r.key: r for r in batch}
        failed = {rec.key: (err.reason, err.detail) for rec, err in read_failures}
        if pre is not None:
            for f in pre.failures:
                failed[f.key] = (f.reason, f.detail)
            summary.pil_decoded += pre.pil_decoded
        decoded = dict(zip(pre.keys, pre.images.unbind(0))) if pre is not None else {}
        for rec in batch:  # keep input order
            if rec.key in failed:
                reason, detail = failed[rec.key]
                skip(rec.key, reason, detail, rec.source)
            else:
                buffered.append((rec.key, decoded[rec.key], tokens_of(by_key[rec.key]),
                                 by_key[rec.key].caption is not None))
        flush(final=False)

    def flush(final: bool) -> None:
        nonlocal rows_in_shard
        while buffered:
            room = rows_per_shard - rows_in_shard
            n = min(batch_size, room)
            if len(buffered) < n and not final:
                return
            chunk = [buffered.popleft() for _ in range(min(n, len(buffered)))]
            emb = encode_images(encoder, torch.stack([c[1] for c in chunk]))
            for (key, _, toks, has_caption), row in zip(chunk, emb.unbind(0)):
                writer.add(key, row, toks)
                summary.captions += int(has_caption)
                summary.caption_tokens += len(toks) if toks is not None else 0
            summary.embedded += len(chunk)
            rows_in_shard = (rows_in_shard + len(chunk)) % rows_per_shard
            bar.update(len(chunk))

    def submit(batch: List[ImageRecord]) -> None:
        if pool is None:
            consume(decode(batch))
            return
        in_flight.append(pool.submit(decode, batch))
        while len(in_flight) > prefetch:
            consume(in_flight.popleft().result())

    writer = EmbeddingShardWriter(output_dir, n_img=n_img, d_enc=d_enc, dtype=dtype, rows_per_shard=rows_per_shard)
    ok = False
    try:
        done_keys = writer.written_keys()
        done_shards = len(writer.finished_shards())
        if done_keys:
            logger.info("resuming: %d images in %d finished shards of %s are kept",
                        len(done_keys), done_shards, output_dir)
        if callable(records):
            records = records(done_keys)
        for rec in records:
            if rec.key in done_keys:
                summary.resumed += 1
                bar.update(1)
                continue
            if rec.key in seen:
                summary.duplicates += 1
                bar.update(1)
                continue
            seen.add(rec.key)
            pending.append(rec)
            if len(pending) >= batch_size:
                submit(pending)
                pending = []
        if pending:
            submit(pending)
        while in_flight:
            consume(in_flight.popleft().result())
        flush(final=True)
        ok = True
    finally:
        bar.close()
        if pool is not None:
            for fut in in_flight:
                fut.cancel()
            pool.shutdown(wait=True)
        if ok:
            writer.close()
        else:
            writer.abort()
    _write_skipped(output_dir, summary.skipped)
    summary.seconds = time.perf_counter() - start
    summary.shards = len(writer.finished_shards())
    summary.new_shards = summary.shards - done_shards
    return summary
