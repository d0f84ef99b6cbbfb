"""The images of a micro-batch for an online encoder: decoded, resized and normalized in the
loader's processes.

With ``model.encoder.mode=online`` the blend loader reads encoded images from image shards
(:mod:`megatron_vlm.data.image_shards`) and :class:`OnlineImageDecoder` turns those of one
micro-batch into the float32 tensor ``[k, 3, S, S]`` the encoder takes (``S`` =
``model.encoder.image_size``), with the precompute tool's preprocessor
(:class:`~megatron_vlm.data.dali_pipeline.ImagePreprocessor`: DALI, with its PIL path for what
DALI cannot decode), the encoder's normalization (:func:`~megatron_vlm.data.image_io.
encoder_image_norm`) and each directory's recorded resize mode, so training sees the pixels
the precompute tool and the evaluation make of the same file.

Where it runs. The decoding happens where micro-batches are built: in each of the
``data.num_workers`` loader processes (or the training process with 0 workers). DALI runs in
its CPU mode there, also on GPU nodes: the workers are forked from a training process that has
already initialized CUDA, and CUDA cannot be used in a forked child; the batch's images reach
the GPU with the rest of the batch (pinned, copied on a side stream). Each process builds its
own pipelines on first use (a pipeline's threads do not survive a fork and it does not pickle),
with :data:`DALI_THREADS` threads. Without DALI installed the PIL path decodes everything (one
warning at start; the pixels differ from DALI's by interpolation rounding only).

An image that fails to decode here was decodable when the precompute tool wrote it, so its
bytes or the decoders changed since: that stops the run with an error naming the directory,
the key and the reason (it is never replaced by something else).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional, Sequence

import torch

logger = logging.getLogger("megatron_vlm")

# DALI CPU threads per loader process: several processes per rank and several ranks per node
# share the CPUs, so each takes a few.
DALI_THREADS = max(1, min(4, os.cpu_count() or 1))
# Largest DALI batch; a micro-batch with more images is decoded in several runs.
DALI_BATCH = 32


class OnlineImageDecoder:
    """Decodes (image directory, key) requests to ``[k, 3, S, S]`` float32 on the CPU."""

    def __init__(self, encoder_cfg):
        from megatron_vlm.data.image_io import encoder_image_norm

        self.image_size = int(encoder_cfg.image_size)
        self.norm = encoder_image_norm(encoder_cfg)
        self.decoder = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "pil"
        if self.decoder == "pil":
            logger.warning("data: DALI is not installed; the loader decodes images with PIL "
                           "(slower; pixels differ from DALI's by interpolation rounding)")
        self._preprocessors: dict = {}
        self._pid: Optional[int] = None

    def __getstate__(self):
        # Pipelines are built again in each process (they hold threads and do not pickle).
        state = self.__dict__.copy()
        state["_preprocessors"], state["_pid"] = {}, None
        return state

    def _preprocessor(self, resize_mode: str):
        from megatron_vlm.data.dali_pipeline import ImagePreprocessor

        if self._pid != os.getpid():  # a forked copy: the parent's pipelines have no threads here
            self._preprocessors, self._pid = {}, os.getpid()
        pre = self._preprocessors.get(resize_mode)
        if pre is None:
            pre = ImagePreprocessor(self.image_size, resize_mode, self.norm, batch_size=DALI_BATCH,
                                    device="cpu", decoder=self.decoder, num_threads=DALI_THREADS)
            self._preprocessors[resize_mode] = pre
        return pre

    def decode(self, requests: Sequence[tuple]) -> torch.Tensor:
        """``requests``: ``(ImageDataset, key)`` pairs in row order -> their images
        ``[len(requests), 3, S, S]``, each resized with its directory's resize mode."""
        s = self.image_size
        out = torch.empty((len(requests), 3, s, s), dtype=torch.float32)
        by_store: dict = {}
        for row, (store, key) in enumerate(requests):
            by_store.setdefault(id(store), (store, []))[1].append((row, key))
        for store, wanted in by_store.values():
            items = [(key, store.image_bytes(store.index_of(key))) for _, key in wanted]
            result = self._preprocessor(store.resize_mode)(items)
            if result.failures:
                bad = result.failures[0]
                raise ValueError(
                    f"{store.directory}: image {bad.key!r} does not decode in the loader "
                    f"({bad.reason}: {bad.detail}); it decoded when it was written, so its bytes "
                    f"or the decoders changed since (check the directory with "
                    f"ImageDataset(..., verify=True))")
            decoded = dict(zip(result.keys, result.images))
            for row, key in wanted:
                out[row] = decoded[key]
        return out
