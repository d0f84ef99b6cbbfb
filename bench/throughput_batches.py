"""The synthetic batches of bench/train_throughput.py, made once on the device the bench measures.

A step that generated its batch on the host, or copied one from the host, would time the host's
random number generator and the PCIe link as well as the GPU; so the global batch is drawn by a
generator on the device itself, split into micro-batches there once, and every step of every
variant reuses those same tensors. The project's train step hands tensors that are already on
its device through untouched (megatron_vlm.training.device_batches).
"""

from __future__ import annotations

import torch


def mixed_batch(rows: int, seq_length: int, vocab_size: int, num_image_tokens: int,
                embed_dim: int, caption_fraction: float, seed: int = 0,
                device: torch.device | str = "cpu") -> dict:
    """One global batch on ``device`` in the project's batch contract: text rows of random
    tokens, and ``round(caption_fraction * rows)`` caption rows (spread evenly) holding an
    image's ``num_image_tokens`` positions, then caption tokens. Image positions carry no loss
    except the last, which predicts the first caption token; embeddings are bf16, as stored.
    The numbers come from a generator on ``device`` (so they differ between CPU and CUDA)."""
    if vocab_size < 3:
        raise ValueError(f"model.decoder.vocab_size={vocab_size} is too small for random tokens")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    stream = torch.randint(2, vocab_size, (rows, seq_length + 1), generator=gen, device=device)
    loss_mask = torch.ones(rows, seq_length, device=device)
    image_mask = torch.zeros(rows, seq_length, dtype=torch.bool, device=device)
    captions = round(caption_fraction * rows)
    for i in range(captions):
        r = int((i + 0.5) * rows / captions)
        stream[r, :num_image_tokens] = 0  # placeholder ids: the splice replaces them
        image_mask[r, :num_image_tokens] = True
        loss_mask[r, : num_image_tokens - 1] = 0.0
    embeddings = torch.randn(captions, num_image_tokens, embed_dim, generator=gen, device=device)
    return {"tokens": stream[:, :-1].contiguous(), "labels": stream[:, 1:].contiguous(),
            "loss_mask": loss_mask, "image_mask": image_mask,
            "image_embeddings": embeddings.to(torch.bfloat16)}


def device_microbatches(rows: int, micro_batch_size: int, seq_length: int, vocab_size: int,
                        num_image_tokens: int, embed_dim: int, caption_fraction: float,
                        device: torch.device) -> tuple[dict, list[dict]]:
    """The global batch (:func:`mixed_batch`) and its micro-batches of ``micro_batch_size``
    rows, all on ``device``: built here once, then reused by every step."""
    from megatron_vlm.data.batch import split_microbatches

    batch = mixed_batch(rows, seq_length, vocab_size, num_image_tokens, embed_dim,
                        caption_fraction, device=device)
    microbatches = split_microbatches(batch, micro_batch_size)
    check_on_device(microbatches, device)
    return batch, microbatches


def check_on_device(microbatches: list[dict], device: torch.device) -> None:
    """Raises RuntimeError when a micro-batch tensor is not on ``device`` exactly (the train
    step would copy it every step: ``cuda`` and ``cuda:0`` count as different devices there)."""
    for i, mb in enumerate(microbatches):
        for key, value in mb.items():
            if isinstance(value, torch.Tensor) and value.device != device:
                raise RuntimeError(f"micro-batch {i} {key} is on {value.device}, not on the "
                                   f"bench's device {device}: each step would copy it")
