"""Image shards: encoded images with each record's key and caption, for an online encoder.

A directory of shards (:mod:`megatron_vlm.data.shard_io`: crash-safe, resumable, indexed by
``index.json`` with format ``megatron-vlm-images``) holding, per record, the encoded image file
exactly as it was read (JPEG, PNG, WebP, BMP or TIFF bytes), the record's key and its tokenized
caption (possibly empty), the caption stored exactly as in image-embedding shards so that the
blend index counts a caption sequence the same way for both kinds. Byte layout: docs/data.md.

* :class:`ImageShardWriter` writes them (``tools/precompute_image_embeddings.py --store
  images``, :func:`megatron_vlm.data.precompute.store_images`, which decodes every image once
  with the loader's preprocessor so that only decodable images are stored); ``add`` itself
  refuses bytes whose header is not a readable image.
* :class:`ImageDataset` reads them memory-mapped (the training loader with
  ``model.encoder.mode=online``, the blend index).
* :func:`open_image_store` opens either kind of image directory (embeddings or images) by the
  format its ``index.json`` names.

The images are stored undecoded: the loader's workers decode, resize and normalize them for the
encoder of the run (:mod:`megatron_vlm.data.dali_pipeline`), so one directory serves any
encoder image size. How they are resized is the directory's: ``index.json`` records the resize
mode (``resize``, one of :data:`megatron_vlm.config.RESIZE_MODES`) the images were written for,
and the loader applies exactly that mode (the precompute tool also records it in
``precompute.json``'s settings, where the evaluation reads it).

Neither torch, PIL nor DALI is imported here at module level (training reads these files).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from megatron_vlm.config import RESIZE_MODES
from megatron_vlm.data.embedding_shards import EMBEDDING_FORMAT, EmbeddingDataset
from megatron_vlm.data.shard_io import (
    CaptionedShardReader,
    ShardWriter,
    as_int_array,
    shard_format,
)

IMAGE_FORMAT = "megatron-vlm-images"

# What each format holds, for messages (the config key's value names the directory).
STORE_KINDS = {EMBEDDING_FORMAT: "embeddings", IMAGE_FORMAT: "images"}


class ImageShardWriter(ShardWriter):
    """Writes encoded images, keys and caption tokens into shards of a directory.

    ``resize_mode`` is the resize mode the images are meant to be loaded with; it is recorded in
    ``index.json`` and a directory holding shards written for another mode is refused. Resumes
    like :class:`~megatron_vlm.data.embedding_shards.EmbeddingShardWriter` (``written_keys()``
    etc.); adding a key that is already written raises ValueError.
    """

    FORMAT = IMAGE_FORMAT
    FILE_KINDS = {"images": ".img", "image_offsets": ".imgoff", "captions": ".cap",
                  "offsets": ".capoff", "records": ".records.jsonl"}

    def __init__(self, directory: str | os.PathLike, resize_mode: str = "letterbox",
                 rows_per_shard: int = 4096):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {resize_mode!r} is not one of {RESIZE_MODES}")
        self.resize_mode = resize_mode
        super().__init__(directory, rows_per_shard, {"resize": resize_mode})
        self._image_end = 0
        self._cap_end = 0

    def _start_shard(self, files):
        self._image_end = self._cap_end = 0
        files["image_offsets"].write(np.zeros(1, dtype="<i8").tobytes())
        files["offsets"].write(np.zeros(1, dtype="<i8").tobytes())

    def add(self, key: str, image: bytes, caption_tokens: Optional[Sequence[int]] = None) -> None:
        """Adds one record: ``image`` is the encoded file's bytes, stored as they are."""
        from megatron_vlm.data.image_io import ImageDecodeError, probe_image

        key = self._check_new_key(key)
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise ValueError(f"record {key!r}: image must be the encoded file's bytes, got "
                             f"{type(image).__name__}")
        data = bytes(image)
        try:
            info = probe_image(data)
        except ImageDecodeError as err:
            raise ValueError(f"record {key!r}: image is not usable ({err})") from None
        tokens = (np.zeros(0, dtype="<i4") if caption_tokens is None else
                  as_int_array(key, "caption_tokens", caption_tokens, "<i4", 0, 2**31))
        files = self._begin_row(key)
        files["images"].write(data)
        self._image_end += len(data)
        files["image_offsets"].write(np.array([self._image_end], dtype="<i8").tobytes())
        files["captions"].write(tokens.tobytes())
        self._cap_end += tokens.size
        files["offsets"].write(np.array([self._cap_end], dtype="<i8").tobytes())
        self._end_row(key, {"key": key, "format": info.format, "size": [info.width, info.height]})


class ImageDataset(CaptionedShardReader):
    """All records of an image-shard directory, memory-mapped; ``resize_mode`` is the mode the
    directory's images are to be loaded with. ``verify=True`` recomputes every file's sha256."""

    FORMAT = IMAGE_FORMAT

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        super().__init__(directory, verify)
        self.resize_mode = self.index.get("resize")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"{self.directory}: index.json field 'resize' is "
                             f"{self.resize_mode!r}, not one of {RESIZE_MODES}")

    def image_bytes(self, i: int) -> bytes:
        """Record ``i``'s encoded image, as it was written."""
        shard, row = self._locate(i)
        off = self._map(shard, "image_offsets", "<i8")
        return self._map(shard, "images", "u1")[off[row]:off[row + 1]].tobytes()

    def image_format(self, i: int) -> str:
        """The image format of record ``i`` as PIL named it when it was written (e.g. JPEG)."""
        self._locate(i)
        return self._records[int(i) % len(self)]["format"]



ImageStore = Union[EmbeddingDataset, ImageDataset]


def open_image_store(directory: str | os.PathLike, verify: bool = False) -> ImageStore:
    """The image directory ``directory`` as an :class:`EmbeddingDataset` (precomputed encoder
    outputs) or an :class:`ImageDataset` (encoded images), by the format its index.json names."""
    fmt = shard_format(directory)
    if fmt == EMBEDDING_FORMAT:
        return EmbeddingDataset(directory, verify)
    if fmt == IMAGE_FORMAT:
        return ImageDataset(directory, verify)
    raise ValueError(f"{os.fspath(directory)}: index.json format {fmt!r} holds no images; "
                     f"expected {EMBEDDING_FORMAT!r} or {IMAGE_FORMAT!r}")
