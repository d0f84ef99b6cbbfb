"""The batch contract between data and model, and deterministic random batches that follow it.

A batch is a dict of tensors (see :mod:`megatron_vlm.model.vlm` for the meaning of each key):
``tokens``, ``labels``, ``loss_mask``, ``image_mask`` [b, s] and ``image_embeddings``
[k, n_img, d_enc] (or ``images`` [k, 3, H, W]) with one entry per row that has image positions.
"""

from __future__ import annotations

import torch

IMAGE_KEYS = ("image_embeddings", "images")


def slice_rows(batch: dict, start: int, end: int) -> dict:
    """Rows ``start:end`` of a batch, with the per-image tensors of exactly those rows."""
    out = {k: v[start:end] for k, v in batch.items() if k not in IMAGE_KEYS}
    rows_with_image = batch["image_mask"].any(dim=1)
    first = int(rows_with_image[:start].sum())
    last = first + int(rows_with_image[start:end].sum())
    for key in IMAGE_KEYS:
        if batch.get(key) is not None:
            out[key] = batch[key][first:last]
    return out


def split_microbatches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Consecutive micro-batches of ``micro_batch_size`` rows."""
    rows = batch["tokens"].shape[0]
    if rows % micro_batch_size:
        raise ValueError(f"batch of {rows} rows does not split into micro-batches of {micro_batch_size}")
    return [slice_rows(batch, i, i + micro_batch_size) for i in range(0, rows, micro_batch_size)]


def random_batch(generator: torch.Generator, rows: int, seq_length: int, vocab_size: int,
                 num_image_tokens: int, embed_dim: int, image_every: int = 2,
                 image_size: int | None = None) -> dict:
    """A learnable random batch: every ``image_every``-th row starts with an image.

    Text follows a fixed affine recurrence modulo the vocabulary from a random start, and the
    first caption token after an image is a function of the image, so a model can lower its
    loss on both. Image positions carry no loss, as in caption samples. With ``image_size`` the
    batch holds raw ``images`` (for an online encoder) instead of ``image_embeddings``.
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
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "image_mask": image_mask, key: pixels}
