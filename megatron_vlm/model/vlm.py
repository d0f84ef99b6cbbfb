"""The vision-language model: projected image embeddings spliced into a megatron GPT decoder.

Batch contract (the same for both encoder modes):

* ``tokens`` [b, s] int64, ``labels`` [b, s] int64, ``loss_mask`` [b, s] float;
* ``image_mask`` [b, s] bool: the positions whose input embedding is an image patch;
* ``image_embeddings`` [k, n_img, d_enc] (precomputed mode) or ``images`` [k, 3, H, W] (online
  mode): one entry per row of the batch that has image positions, in row order, so text-only
  rows cost no projector work. Each such row has exactly ``n_img`` image positions.

On the first pipeline stage the projector (and the online encoder) run and their output
replaces the token embeddings at the image positions; later stages receive hidden states from
megatron's pipeline schedule through :meth:`set_input_tensor`.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class VLMModel(MegatronModule):
    """Projector (+ optional online vision encoder) in front of a megatron-core GPTModel."""

    def __init__(self, config: TransformerConfig, language_model: GPTModel,
                 projector: Optional[torch.nn.Module], vision_encoder: Optional[torch.nn.Module],
                 num_image_tokens: int):
        super().__init__(config=config)
        self.language_model = language_model
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.projector = projector
        self.vision_encoder = vision_encoder
        self.num_image_tokens = num_image_tokens
        # megatron's DDP and schedules look for these attributes on the wrapped module.
        self.share_embeddings_and_output_weights = False
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_features(self, image_embeddings: Optional[torch.Tensor],
                       images: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Projected image features [k, n_img, d_model], or None when the batch has no image."""
        if images is not None:
            if self.vision_encoder is None:
                raise ValueError("batch has 'images' but model.encoder.mode is 'precomputed'; "
                                 "give 'image_embeddings' or set model.encoder.mode=online")
            image_embeddings = self.vision_encoder(images)
        if image_embeddings is None or image_embeddings.shape[0] == 0:
            return None
        if image_embeddings.dim() != 3 or image_embeddings.shape[1] != self.num_image_tokens:
            raise ValueError(f"image embeddings have shape {tuple(image_embeddings.shape)}; "
                             f"expected [k, {self.num_image_tokens}, d_enc]")
        # The projector runs in megatron's [tokens, ..., hidden] layout; rows stay independent.
        projected = self.projector(image_embeddings.to(self.config.params_dtype))
        if isinstance(projected, tuple):  # megatron linear layers return (output, bias)
            projected = projected[0]
        return projected

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor,
              image_mask: Optional[torch.Tensor], image_embeddings: Optional[torch.Tensor],
              images: Optional[torch.Tensor]) -> torch.Tensor:
        """Decoder input [s, b, d_model]: token embeddings with image positions replaced."""
        embeddings = self.language_model.embedding(input_ids=tokens, position_ids=position_ids)
        features = self.image_features(image_embeddings, images)
        if features is None:
            if image_mask is not None and bool(image_mask.any()):
                raise ValueError("image_mask marks image positions but the batch has no images")
            return embeddings
        rows_with_image = image_mask.any(dim=1)
        counts = image_mask.sum(dim=1)[rows_with_image]
        if features.shape[0] != int(rows_with_image.sum()) or bool((counts != self.num_image_tokens).any()):
            raise ValueError(
                f"image_mask has {int(rows_with_image.sum())} rows with image positions "
                f"(counts {counts.tolist()}) but {features.shape[0]} images of "
                f"{self.num_image_tokens} tokens were given")
        # masked_scatter fills positions in row-major order, matching the row order of features.
        by_batch = embeddings.transpose(0, 1)
        spliced = by_batch.masked_scatter(image_mask.unsqueeze(-1), features.to(by_batch.dtype))
        return spliced.transpose(0, 1).contiguous()

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None,
                image_embeddings: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token loss [b, s] when ``labels`` are given, else logits [b, s, vocab/TP]."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(tokens, position_ids, image_mask, image_embeddings, images)
        return self.language_model(
            input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
            decoder_input=decoder_input, labels=labels)
