"""The batch contract between data and model, and deterministic random batches that follow it.

A batch is a dict of tensors (see :mod:`megatron_vlm.model.vlm` for the meaning of each key):
``tokens``, ``labels``, ``loss_mask``, ``image_mask`` [b, s] and ``image_embeddings``
[k, n_img, d_enc] (or ``images`` [k, 3, H, W]) with one entry per row that has image positions;
with document attention also ``segment_ids`` [b, s], ``cu_seqlens`` [n + 1] int32 and
``max_seqlen`` (an int). :func:`check_batch` checks the contract where batches are assembled, on
the CPU, so that the model's forward pass needs no host synchronisation.
"""

from __future__ import annotations

import torch

IMAGE_KEYS = ("image_embeddings", "images")
DOCUMENT_KEYS = ("cu_seqlens", "max_seqlen")


def check_batch(batch: dict, num_image_tokens: int, where: str = "batch") -> None:
    """ValueError naming ``where`` unless ``batch`` follows the contract: [b, s] tensors of one
    shape, exactly ``num_image_tokens`` image positions in every row that has any, one image
    entry per such row, and document boundaries that cover the flattened batch."""
    tokens = batch["tokens"]
    if tokens.dim() != 2:
        raise ValueError(f"{where}: tokens have shape {tuple(tokens.shape)}; expected [b, s]")
    for key in ("labels", "loss_mask", "image_mask", "segment_ids"):
        if key in batch and tuple(batch[key].shape) != tuple(tokens.shape):
            raise ValueError(f"{where}: {key} has shape {tuple(batch[key].shape)}, tokens "
                             f"{tuple(tokens.shape)}")
    image_mask = batch.get("image_mask")
    counts = image_mask.sum(dim=1) if image_mask is not None else torch.zeros(tokens.shape[0])
    rows_with_image = int((counts > 0).sum())
    wrong = [(row, int(c)) for row, c in enumerate(counts.tolist()) if c and c != num_image_tokens]
    if wrong:
        raise ValueError(f"{where}: rows {[r for r, _ in wrong]} have {[c for _, c in wrong]} "
                         f"image positions; every image takes {num_image_tokens}")
    images = [batch[k] for k in IMAGE_KEYS if batch.get(k) is not None]
    given = images[0].shape[0] if images else 0
    if given != rows_with_image:
        raise ValueError(f"{where}: image_mask marks {rows_with_image} rows with image positions "
                         f"but {given} images were given")
    if "image_embeddings" in batch and given and batch["image_embeddings"].shape[1] != num_image_tokens:
        raise ValueError(f"{where}: image_embeddings have shape "
                         f"{tuple(batch['image_embeddings'].shape)}; expected [k, "
                         f"{num_image_tokens}, d_enc]")
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"]
        lengths = cu[1:] - cu[:-1]
        if (int(cu[0]) != 0 or int(cu[-1]) != tokens.numel() or bool((lengths <= 0).any())
                or int(lengths.max()) != batch.get("max_seqlen")):
            raise ValueError(f"{where}: cu_seqlens {cu.tolist()[:8]}... / max_seqlen "
                             f"{batch.get('max_seqlen')} do not cut the {tokens.numel()} "
                             "positions of the batch into documents")


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [b, 1, s, s], True = masked out (megatron's convention), on the ids' device.

    A position attends to earlier-or-same positions of its own segment; a padding position
    (segment -1) attends only to itself, so no row is fully masked.
    """
    seg = torch.as_tensor(segment_ids)
    if seg.dim() == 1:
        seg = seg.unsqueeze(0)
    s = seg.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
    same = (seg.unsqueeze(2) == seg.unsqueeze(1)) & (seg >= 0).unsqueeze(2)
    allowed = same & causal
    allowed |= torch.eye(s, dtype=torch.bool, device=seg.device)
    return (~allowed).unsqueeze(1)


def document_boundaries(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [n + 1], max_seqlen) of the flattened [b * s] batch: one sub-sequence
    per run of equal segment ids in a row (a row's padding is one run), rows never joined."""
    seg = torch.as_tensor(segment_ids)
    b, s = seg.shape
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat([first, torch.tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def slice_rows(batch: dict, start: int, end: int) -> dict:
    """Rows ``start:end`` of a batch, with the per-image tensors and the document boundaries of
    exactly those rows."""
    out = {k: v[start:end] for k, v in batch.items()
           if k not in IMAGE_KEYS and k not in DOCUMENT_KEYS}
    rows_with_image = batch["image_mask"].any(dim=1)
    first = int(rows_with_image[:start].sum())
    last = first + int(rows_with_image[start:end].sum())
    for key in IMAGE_KEYS:
        if batch.get(key) is not None:
            out[key] = batch[key][first:last]
    if "cu_seqlens" in batch:
        out["cu_seqlens"], out["max_seqlen"] = document_boundaries(out["segment_ids"])
    return out


def split_microbatches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Consecutive micro-batches of ``micro_batch_size`` rows."""
    rows = batch["tokens"].shape[0]
    if rows % micro_batch_size:
        raise ValueError(f"batch of {rows} rows does not split into micro-batches of {micro_batch_size}")
    return [slice_rows(batch, i, i + micro_batch_size) for i in range(0, rows, micro_batch_size)]


def random_batch(generator: torch.Generator, rows: int, seq_length: int, vocab_size: int,
                 num_image_tokens: int, embed_dim: int, image_every: int = 2,
                 image_size: int | None = None, documents: bool = False) -> dict:
    """A learnable random batch: every ``image_every``-th row starts with an image.

    Text follows a fixed affine recurrence modulo the vocabulary from a random start, and the
    first caption token after an image is a function of the image, so a model can lower its
    loss on both. Image positions carry no loss, as in caption samples. With ``image_size`` the
    batch holds raw ``images`` (for an online encoder) instead of ``image_embeddings``. With
    ``documents`` every row is cut at two random points after its image into three documents
    that attend only inside themselves (``segment_ids``, ``cu_seqlens``, ``max_seqlen``); the
    last position of each document carries no loss, as at the end of a packed document.
    """
    starts = torch.randint(0, vocab_size, (rows, 1), generator=generator)
    steps = torch.arange(seq_length + 1).unsqueeze(0)
    stream = (starts * 7 + steps * 13) % vocab_size
    tokens, labels = stream[:, :-1].clone(), stream[:, 1:].clone()
    loss_mask = torch.ones(rows, seq_length)
    image_mask = torch.zeros(rows, seq_length, dtype=torch.bool)
    image_rows = [r for r in range(rows) if r % image_every == 0]
    if image_size is None:
        pixels = torch.randn(len(image_rows), num_image_tokens, embed_dim, generator=generator)
    else:
        pixels = torch.rand(len(image_rows), 3, image_size, image_size, generator=generator)
    for i, r in enumerate(image_rows):
        image_mask[r, :num_image_tokens] = True
        loss_mask[r, : num_image_tokens - 1] = 0.0
        labels[r, num_image_tokens - 1] = int(pixels[i].flatten()[0] > pixels[i].mean()) + 1
    key = "image_embeddings" if image_size is None else "images"
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
             "image_mask": image_mask, key: pixels}
    if documents:
        segments = torch.zeros(rows, seq_length, dtype=torch.int32)
        for r in range(rows):
            cuts = sorted(torch.randint(num_image_tokens + 2, seq_length - 1, (2,),
                                        generator=generator).tolist())
            segments[r, cuts[0]:] += 1
            segments[r, cuts[1]:] += 1
            loss_mask[r, [cuts[0] - 1, cuts[1] - 1]] = 0.0
        batch["segment_ids"] = segments
        batch["cu_seqlens"], batch["max_seqlen"] = document_boundaries(segments)
    return batch
