"""Document attention in both forms the model gives it to the attention kernel.

With ``data.caption_fill=text`` a caption row holds packed text documents that must not see
each other or the caption. The Transformer Engine spec takes the documents as packed sequences
(megatron's "thd" layout, ``cu_seqlens``); the local spec as a dense mask built from
``segment_ids``. The packed path runs on the CPU too (through the SDPA attention), so its
reshaping, boundaries and per-document rotary positions are checked here against the dense
path; on a GPU tests/gpu checks TE's packed attention against the same dense result.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config import load_config
from megatron_vlm.data.batch import check_batch
from megatron_vlm.data.samples import (
    build_caption_sample,
    build_instruction_sample,
    build_text_sample,
    collate,
)

EOS, SEP, PAD = 0, 1, 0


def _document_batch(cfg, seed=0):
    """Two caption rows filled with text documents (one ends in padding), an instruction row
    and a text row, as the loader collates them."""
    n_img, d_enc = cfg.model.encoder.num_image_tokens, cfg.model.encoder.embed_dim
    L = cfg.train.seq_length
    g = torch.Generator().manual_seed(seed)

    def doc(n):
        return [int(t) for t in torch.randint(5, 400, (n,), generator=g)] + [EOS]

    docs = iter([doc(11), doc(30), doc(7), doc(50), doc(19)])
    short_docs = iter([doc(9)])  # runs out: the row ends in padding
    conversation = [int(t) for t in torch.randint(5, 400, (40,), generator=g)]
    targets = [0] * 10 + [1] * 30
    samples = [
        build_caption_sample([40, 41, 42], n_img, SEP, EOS, L, PAD, fill="text",
                             text_tokens_iter=docs, image_key="a"),
        build_caption_sample([43, 44], n_img, SEP, EOS, L, PAD, fill="text",
                             text_tokens_iter=short_docs, image_key="b"),
        build_instruction_sample(conversation, targets, n_img, L, PAD, EOS, image_key="c"),
        build_text_sample([int(t) for t in torch.randint(5, 400, (L + 1,), generator=g)],
                          eos_id=EOS),
    ]
    table = {k: torch.randn(n_img, d_enc, generator=g) for k in "abc"}
    batch = collate(samples, table.__getitem__, documents=True)
    check_batch(batch, n_img)
    return batch


def _loss_and_grads(model, batch):
    model.zero_grad()
    per_token = model(tokens=batch["tokens"], labels=batch["labels"],
                      image_mask=batch["image_mask"], image_embeddings=batch["image_embeddings"],
                      segment_ids=batch["segment_ids"], cu_seqlens=batch["cu_seqlens"],
                      max_seqlen=batch["max_seqlen"])
    mask = batch["loss_mask"]
    ((per_token * mask).sum() / mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_token.detach(), grads


def test_packed_documents_equal_the_dense_document_mask(runtime):
    from megatron_vlm.model.build import build_model

    cfg = load_config("tiny", ["train.seq_length=64"])
    model = build_model(cfg)
    batch = _document_batch(cfg)
    assert int(batch["segment_ids"][0].max()) >= 2  # several documents in a caption row
    assert bool((batch["segment_ids"][1] == -1).any())  # and a row ending in padding
    model.packed_documents = False
    dense, dense_grads = _loss_and_grads(model, batch)
    model.packed_documents = True
    packed, packed_grads = _loss_and_grads(model, batch)
    carries_loss = batch["loss_mask"] > 0
    torch.testing.assert_close(packed[carries_loss], dense[carries_loss], atol=2e-5, rtol=1e-5)
    assert dense_grads.keys() == packed_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(packed_grads[name], dense_grads[name], atol=2e-5, rtol=1e-4,
                                   msg=name)
    # and documents really are cut: plain causal attention over the rows differs
    model.packed_documents = False
    with torch.no_grad():
        causal = model(tokens=batch["tokens"], labels=batch["labels"],
                       image_mask=batch["image_mask"], image_embeddings=batch["image_embeddings"])
    assert not torch.allclose(causal[carries_loss], dense[carries_loss], atol=1e-3)


def test_packed_form_refuses_a_dense_mask(runtime):
    from megatron_vlm.data.batch import attention_mask_from_segments
    from megatron_vlm.model.build import build_model

    cfg = load_config("tiny", ["train.seq_length=64"])
    model = build_model(cfg, packed_documents=True)
    batch = _document_batch(cfg)
    with pytest.raises(RuntimeError, match="ignores a dense attention_mask"):
        model(tokens=batch["tokens"], labels=batch["labels"], image_mask=batch["image_mask"],
              image_embeddings=batch["image_embeddings"],
              attention_mask=attention_mask_from_segments(batch["segment_ids"]))


def test_document_boundaries_cut_rows_and_runs():
    from megatron_vlm.data.batch import document_boundaries

    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    cu, longest = document_boundaries(seg)
    assert cu.tolist() == [0, 2, 5, 6, 12] and cu.dtype == torch.int32 and longest == 6
    # rows are never joined, even where one ends in the segment the next starts with
    assert document_boundaries(torch.zeros(3, 4, dtype=torch.int32))[0].tolist() == [0, 4, 8, 12]
    bad = {"tokens": torch.zeros(2, 6, dtype=torch.long), "cu_seqlens": cu[:-1],
           "max_seqlen": longest}
    with pytest.raises(ValueError, match="do not cut the 12 positions"):
        check_batch(bad, 4)
