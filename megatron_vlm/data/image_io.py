"""Image I/O for the embedding precompute: checks, normalization, geometry and the PIL path.

What one encoded image (JPEG, PNG, WebP, BMP, TIFF bytes) needs before an encoder sees it,
independent of how a batch is decoded (:mod:`megatron_vlm.data.dali_pipeline`):

* **Checks.** :func:`sniff_format` names the format its leading bytes announce;
  :func:`probe_image` reads format and size from the header with PIL (cheap: no pixel decoding);
  :func:`looks_truncated` finds JPEG/PNG files whose end-of-image marker is missing (truncated
  downloads). An unusable image raises :class:`ImageDecodeError` whose ``reason`` is one of the
  ``SKIP_*`` names: a file that starts like an image but cannot be read is ``corrupt``
  (damaged or truncated), anything else ``unreadable`` (not an image).
* **Normalization.** :class:`ImageNorm` holds the encoder's per-channel mean and std and its
  resize filter; normalization is ``(x / 255 - mean) / std``. :func:`encoder_image_norm` reads
  them from the encoder's preprocessing config (bicubic, 0.5/0.5 for SigLIP).
* **Geometry.** The three resize modes, computed on the host from the image header by
  :func:`resize_geometry` (a window, padding where it leaves the image, and a resize):

  - ``letterbox``: keep the aspect ratio; pad the image to a square of side ``max(w, h)`` with
    the encoder's mean colour (``int(255 * mean)`` per channel, the image centred with the
    extra pixel, if any, on the bottom/right), then resize the square to ``S x S``. This is the
    "letterbox" of the paper's fine-tuning recipe.
  - ``resize-naive``: stretch to ``S x S``.
  - ``resize-crop``: resize the shorter side to ``S`` (the longer one to
    ``int(S * long / short)``), then take the centred ``S x S`` window (offset
    ``round((side - S) / 2)``).

* **The PIL reference.** :func:`decode_pil` decodes fully with PIL (raising on truncated files
  even if some library enabled ``LOAD_TRUNCATED_IMAGES``) and :func:`pil_preprocess` applies
  the same geometry and normalization -> float32 ``[3, S, S]``. The DALI pipeline is fed the
  same geometry, so the two cut and pad exactly the same pixels and differ only by
  interpolation rounding. EXIF orientation is ignored, as by PIL-based loaders.

PIL and open_clip are imported only by the functions that use them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from megatron_vlm.config import RESIZE_MODES

logger = logging.getLogger("megatron_vlm")

INTERPOLATIONS = ("bicubic", "bilinear")

# End-of-image markers looked for near the end of the file; a file without one is truncated
# (or carries a long trailer) and is decoded with PIL, which tells the two apart.
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096

# Reasons an image is skipped (the reasons counted in precompute.PrecomputeSummary.skipped).
SKIP_MISSING = "missing"        # no image file / no image member for the key
SKIP_UNREADABLE = "unreadable"  # not an image PIL recognizes (empty, garbage, unknown format)
SKIP_CORRUPT = "corrupt"        # header fine, pixels undecodable (truncated, damaged)
SKIP_BAD_CAPTION = "bad_caption"  # caption file present but unreadable (webdataset inputs)


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
