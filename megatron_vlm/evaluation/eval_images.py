"""The image input of evaluation prompts, prepared as in training.

Three sources, chosen once per run (:func:`image_source`):

* a precomputed embedding directory (``evaluation.image_embeddings``): written by
  tools/precompute_image_embeddings.py over the evaluation images with the training resize mode;
  the key of an image is its path relative to its task's image folder (``Example.image``);
* the model's own online encoder (``model.encoder.mode=online``, e.g. the unfrozen-encoder
  ablation): images are decoded and resized here and the engine runs the checkpoint's encoder;
* otherwise the frozen encoder of the checkpoint's config (``model.encoder``: architecture and
  ``weights_path``) encodes the images in this process, as the precompute tool would.

Images are resized with the training strategy: ``evaluation.resize_mode``, by default the one
recorded in the training caption embeddings' precompute.json.

``evaluation.blank_images=true`` replaces every image by one blank image (the encoder's fill
colour, which normalizes to zeros), encoded the same way: the difference between a normal and a
blank run is what the model's answers take from the images.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

import torch

from megatron_vlm.evaluation.records import Example

logger = logging.getLogger("megatron_vlm")


def training_resize_mode(cfg) -> str:
    """``evaluation.resize_mode``, else the mode of the training caption embeddings, else
    letterbox."""
    if cfg.evaluation.resize_mode is not None:
        return cfg.evaluation.resize_mode
    captions = cfg.data.captions
    manifest = os.path.join(captions, "precompute.json") if captions else None
    if manifest and os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            mode = json.load(f).get("settings", {}).get("resize")
        if mode:
            return mode
    return "letterbox"


class ImageSource:
    """``images(examples)`` -> one tensor per example (None for text-only examples): an
    embedding [n_img, d_enc] or, for an online encoder, a preprocessed image [3, S, S]."""

    def __init__(self, cfg, embeddings_dir: Optional[str] = None, blank: bool = False):
        self.cfg = cfg
        self.online = cfg.model.encoder.mode == "online"
        self.resize_mode = training_resize_mode(cfg)
        self.blank = blank
        self.embeddings = None
        self.encoder = None
        self.preprocessor = None
        self._blank_image: Optional[torch.Tensor] = None
        if embeddings_dir is not None and self.online:
            # A config inherited from a frozen-encoder stage may name them: the checkpoint's own,
            # possibly trained, encoder must see the images instead.
            logger.info("evaluation.image_embeddings is not used: the checkpoint's encoder runs "
                        "online (model.encoder.mode=online) and sees the images itself")
            embeddings_dir = None
        if embeddings_dir is not None and not blank:
            from megatron_vlm.data.embedding_shards import EmbeddingDataset

            self.embeddings = EmbeddingDataset(embeddings_dir)
            enc = cfg.model.encoder
            if (self.embeddings.n_img, self.embeddings.d_enc) != (enc.num_image_tokens,
                                                                  enc.embed_dim):
                raise ValueError(
                    f"evaluation.image_embeddings {embeddings_dir} holds [{self.embeddings.n_img}, "
                    f"{self.embeddings.d_enc}] embeddings; the checkpoint's encoder gives "
                    f"[{enc.num_image_tokens}, {enc.embed_dim}]")

    def describe(self) -> str:
        if self.blank:
            what = "the checkpoint's online encoder" if self.online else "the frozen encoder"
            return f"BLANK images ({self.cfg.model.encoder.image_size} px) through {what}"
        if self.embeddings is not None:
            return f"precomputed embeddings in {self.embeddings.directory}"
        what = "the checkpoint's online encoder" if self.online else "the frozen encoder"
        return f"{what} ({self.cfg.model.encoder.open_clip_model}), resize {self.resize_mode}"

    def _pixels(self, examples: Sequence[Example]) -> torch.Tensor:
        """Decoded, resized, normalized images [k, 3, S, S] through the precompute tool's
        preprocessor (DALI where it decodes, PIL otherwise), on the runtime's device."""
        from megatron_vlm.data.dali_pipeline import ImagePreprocessor
        from megatron_vlm.data.image_io import encoder_image_norm
        from megatron_vlm.runtime import current_device

        if self.preprocessor is None:
            enc = self.cfg.model.encoder
            self.preprocessor = ImagePreprocessor(
                enc.image_size, self.resize_mode, encoder_image_norm(enc),
                device="cuda" if current_device().type == "cuda" else "cpu")
        items = []
        for ex in examples:
            try:
                with open(ex.image_path, "rb") as f:
                    items.append((ex.example_id, f.read()))
            except OSError as err:
                raise FileNotFoundError(f"task {ex.task}, example {ex.example_id}: cannot read "
                                        f"image {ex.image_path} ({err.strerror})") from None
        batch = self.preprocessor(items)
        if batch.failures:
            bad = batch.failures[0]
            ex = next(e for e in examples if e.example_id == bad.key)
            raise ValueError(f"task {ex.task}, example {ex.example_id}: cannot decode image "
                             f"{ex.image_path} ({bad.reason}: {bad.detail})")
        return batch.images.to(current_device())

    def _frozen_encoder(self) -> torch.nn.Module:
        if self.encoder is None:
            from megatron_vlm.model.vision_encoder import build_vision_encoder
            from megatron_vlm.runtime import current_device

            enc = self.cfg.model.encoder
            if enc.weights_path is None:
                logger.warning("model.encoder.weights_path is null: the evaluation images are "
                               "encoded by a randomly initialised encoder, seeded as "
                               "tools/precompute_image_embeddings.py seeds it")
            # The precompute tool's seeding: a random-init (test) encoder is the same one.
            devices = [current_device()] if current_device().type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.cfg.seed)
                encoder = build_vision_encoder(enc)
            encoder.set_frozen(True)
            self.encoder = encoder.to(current_device()).eval()
        return self.encoder

    def _blank(self) -> torch.Tensor:
        """The one blank image, as the model takes it (pixels or an embedding)."""
        if self._blank_image is None:
            import io

            from PIL import Image

            from megatron_vlm.data.dali_pipeline import ImagePreprocessor
            from megatron_vlm.data.image_io import encoder_image_norm
            from megatron_vlm.runtime import current_device

            enc = self.cfg.model.encoder
            norm = encoder_image_norm(enc)
            buffer = io.BytesIO()
            Image.new("RGB", (enc.image_size, enc.image_size), norm.fill).save(buffer, "PNG")
            pixels = ImagePreprocessor(enc.image_size, self.resize_mode, norm, device="cpu",
                                       decoder="pil")([("blank", buffer.getvalue())]).images
            pixels = pixels.to(current_device())
            if self.online:
                self._blank_image = pixels[0]
            else:
                from megatron_vlm.data.precompute import encode_images

                self._blank_image = encode_images(self._frozen_encoder(), pixels)[0]
        return self._blank_image

    def images(self, examples: Sequence[Example]) -> list[Optional[torch.Tensor]]:
        out: list[Optional[torch.Tensor]] = [None] * len(examples)
        todo = [i for i, ex in enumerate(examples) if ex.image is not None]
        if not todo:
            return out
        if self.blank:
            for i in todo:
                out[i] = self._blank()
            return out
        if self.embeddings is not None:
            for i in todo:
                key = examples[i].image
                if key not in self.embeddings:
                    raise ValueError(f"task {examples[i].task}, example {examples[i].example_id}: "
                                     f"image {key!r} has no embedding in "
                                     f"{self.embeddings.directory}")
                out[i] = self.embeddings.embedding(self.embeddings.index_of(key))
            return out
        pixels = self._pixels([examples[i] for i in todo])
        if self.online:
            for row, i in enumerate(todo):
                out[i] = pixels[row]
            return out
        from megatron_vlm.data.precompute import encode_images

        encoded = encode_images(self._frozen_encoder(), pixels)
        for row, i in enumerate(todo):
            out[i] = encoded[row]
        return out
