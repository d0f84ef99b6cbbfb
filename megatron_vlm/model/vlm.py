"""The vision-language model: projected image embeddings spliced into a megatron GPT decoder.

Batch contract (the same for both encoder modes; :func:`megatron_vlm.data.batch.check_batch`
checks it where batches are assembled, on the CPU, so the forward pass needs no host
synchronisation):

* ``tokens`` [b, s] int64, ``labels`` [b, s] int64, ``loss_mask`` [b, s] float;
* ``image_mask`` [b, s] bool: the positions whose input embedding is an image patch;
* ``image_embeddings`` [k, n_img, d_enc] (precomputed mode) or ``images`` [k, 3, H, W] (online
  mode): one entry per row of the batch that has image positions, in row order, so text-only
  rows cost no projector work. Each such row has exactly ``n_img`` image positions;
* optional document attention (packed filler text, ``data.caption_fill=text``):
  ``segment_ids`` [b, s] int (documents numbered from 0 per row, padding -1), ``cu_seqlens``
  [n + 1] int32 (the boundaries of every run of one segment in the flattened [b * s] batch, row
  boundaries included) and ``max_seqlen`` (a Python int, the longest run).

Document attention reaches the attention kernel in one of two forms. With ``packed_documents``
(the Transformer Engine spec) the batch is flattened into megatron's packed "thd" layout: one
sequence of b * s positions cut by ``cu_seqlens`` (image positions count inside their sequence),
with rotary positions restarting per document; attention never crosses a boundary. Otherwise a
dense [b, 1, s, s] mask is built on the device from ``segment_ids`` (the SDPA attention honours
it). Both give the same result on every position that carries loss: rotary embeddings are
relative, so where a document starts in its row does not matter. A dense ``attention_mask`` in
the batch is refused with the packed form (TE would ignore it).

On the first pipeline stage the projector (and the online encoder) run and their output
replaces the token embeddings at the image positions, before the sequence is scattered over
tensor-parallel ranks when sequence parallelism is on; later stages receive hidden states from
megatron's pipeline schedule through :meth:`set_input_tensor`.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.data.batch import attention_mask_from_segments


def splice_image_features(embeddings: torch.Tensor, image_mask: torch.Tensor,
                          features: torch.Tensor) -> torch.Tensor:
    """``embeddings`` [s, b, d] with the positions of ``image_mask`` [b, s] replaced, in
    row-major order, by the rows of ``features`` [k, n_img, d] (what ``masked_scatter`` does).

    Written as a gather and a select so that neither direction makes the host wait: the
    running count of image positions (a cumulative sum on the device) is each position's row
    in the flattened features, and ``torch.where`` keeps the token embedding elsewhere.
    ``masked_scatter``'s backward selects the masked gradient with ``masked_select``, whose
    output size the host must read. The counts were checked when the batch was assembled.
    """
    s, b, d = embeddings.shape
    flat_mask = image_mask.reshape(b * s)
    # Positions before the first image point at row 0; the where discards them.
    rows = (torch.cumsum(flat_mask, 0) - 1).clamp_(min=0)
    gathered = features.reshape(-1, d).to(embeddings.dtype).index_select(0, rows)
    by_batch = embeddings.transpose(0, 1).reshape(b * s, d)
    spliced = torch.where(flat_mask.unsqueeze(-1), gathered, by_batch)
    return spliced.reshape(b, s, d).transpose(0, 1).contiguous()


class VLMModel(MegatronModule):
    """Projector (+ optional online vision encoder) in front of a megatron-core GPTModel."""

    def __init__(self, config: TransformerConfig, language_model: GPTModel,
                 projector: Optional[torch.nn.Module], vision_encoder: Optional[torch.nn.Module],
                 num_image_tokens: int, packed_documents: bool = False):
        super().__init__(config=config)
        self.language_model = language_model
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.projector = projector
        self.vision_encoder = vision_encoder
        self.num_image_tokens = num_image_tokens
        self.packed_documents = packed_documents
        # megatron's DDP and schedules look for these attributes on the wrapped module.
        self.share_embeddings_and_output_weights = False
        self.model_type = ModelType.encoder_or_decoder
        if self.pre_process:
            # The image splice needs the whole sequence: the embedding must not reduce-scatter or
            # scatter it over the sequence-parallel ranks; :meth:`embed` scatters after the splice.
            embedding = language_model.embedding
            embedding.reduce_scatter_embeddings = False
            embedding.word_embeddings.reduce_scatter_embeddings = False
            embedding.scatter_to_sequence_parallel = False

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_features(self, image_embeddings: Optional[torch.Tensor],
                       images: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Projected image features [k, n_img, d_model], or None when the batch has no image."""
        if images is not None:
            if self.vision_encoder is None:
                raise RuntimeError("batch has 'images' but model.encoder.mode is 'precomputed'; "
                                   "give 'image_embeddings' or set model.encoder.mode=online")
            if images.shape[0] == 0:  # a micro-batch of text rows only: nothing to encode
                return None
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

    def embed(self, tokens: torch.Tensor, image_mask: Optional[torch.Tensor],
              image_embeddings: Optional[torch.Tensor],
              images: Optional[torch.Tensor]) -> torch.Tensor:
        """Decoder input [s, b, d_model] of the whole sequence (not yet scattered for sequence
        parallelism): token embeddings with the image positions replaced."""
        embeddings = self.language_model.embedding(input_ids=tokens, position_ids=None)
        features = self.image_features(image_embeddings, images)
        if features is None:
            return self._keep_image_path_in_graph(embeddings)
        return splice_image_features(embeddings, image_mask, features)

    def _keep_image_path_in_graph(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` plus an exact zero that depends on every trainable parameter of the
        projector and the online encoder.

        megatron-core's DDP with overlapped gradient reduction counts, per bucket, the
        parameters whose gradient is ready and expects all of them in every micro-batch; a
        micro-batch without an image would leave the projector out of the graph and stop the
        run. One element of each parameter times 0.0 adds nothing to the activations and a zero
        gradient, the gradient these parameters get from such a micro-batch anyway.
        """
        if not torch.is_grad_enabled():
            return embeddings
        modules = [m for m in (self.projector, self.vision_encoder) if m is not None]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if not params:
            return embeddings
        zero = torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0
        return embeddings + zero.to(embeddings.dtype)

    def _scatter_sequence(self, decoder_input: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the sequence under sequence parallelism (as megatron's embedding
        would have scattered it), cloned so the whole sequence can be freed."""
        if not self.config.sequence_parallel:
            return decoder_input
        part = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return part.clone() if self.config.clone_scatter_output_in_embedding else part

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None,
                image_embeddings: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None,
                decoder_input: Optional[torch.Tensor] = None,
                inference_context=None,
                runtime_gather_output: Optional[bool] = None) -> torch.Tensor:
        """Per-token loss [b, s] when ``labels`` are given, else logits [b, s, vocab/TP].

        Generation (:mod:`megatron_vlm.evaluation.engine`) passes ``decoder_input`` [s, b, d_model]
        on the first stage (input embeddings it built itself, e.g. :meth:`embed` of the prompt
        or a generated token's embedding: ``tokens`` then only give the shape, and the image
        arguments are unused) and megatron's ``inference_context`` (a KV cache: the positions
        continue where the cache stands). With an inference context the logits are gathered
        over tensor-parallel ranks (megatron requires it) and, for a static context, cover the
        last position only ([b, 1, vocab]).
        """
        b, s = tokens.shape
        if inference_context is not None:
            if self.config.sequence_parallel:
                raise ValueError("generation with a KV cache runs without sequence parallelism "
                                 "(set performance.sequence_parallel=false)")
            if runtime_gather_output is None:
                runtime_gather_output = True
        packed = cu_seqlens is not None and self.packed_documents
        if attention_mask is not None and self.packed_documents:
            raise RuntimeError("the Transformer Engine attention ignores a dense attention_mask; "
                               "give document boundaries (segment_ids, cu_seqlens, max_seqlen) "
                               "instead")
        if cu_seqlens is not None and not packed:
            if segment_ids is None:
                raise RuntimeError("a batch with cu_seqlens needs segment_ids for the dense "
                                   "document mask")
            attention_mask = attention_mask_from_segments(segment_ids)
        if position_ids is None and not packed:
            position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand_as(tokens)
        packed_seq_params = None
        if not self.pre_process:
            decoder_input = None  # later stages take the previous stage's output
        elif decoder_input is None:
            decoder_input = self.embed(tokens, image_mask, image_embeddings, images)
        if packed:
            if max_seqlen is None:
                raise RuntimeError("a batch with cu_seqlens needs max_seqlen (a Python int)")
            # [s, b, h] -> one packed sequence [b * s, 1, h] in row-major order, as cu_seqlens
            # counts it.
            if decoder_input is not None:
                decoder_input = decoder_input.transpose(0, 1).reshape(b * s, 1, -1)
            packed_seq_params = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))
            if labels is not None:
                labels = labels.reshape(1, b * s)
        if decoder_input is not None:
            decoder_input = self._scatter_sequence(decoder_input)
        out = self.language_model(
            input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask,
            decoder_input=decoder_input, labels=labels, packed_seq_params=packed_seq_params,
            inference_context=inference_context, runtime_gather_output=runtime_gather_output)
        if packed and self.post_process:
            out = out.reshape(b, s, *out.shape[2:])
        return out
