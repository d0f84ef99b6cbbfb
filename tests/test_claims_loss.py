"""One training step's loss, gradients and per-source losses against the same numbers computed
by hand from the model's logits.

The loss is the per-token mean over the whole global batch, sum(loss x mask) / sum(mask): the
gradients megatron's step leaves in the DDP buffers must be those of that expression (not of the
sum, nor of a mean per micro-batch), and each ``loss/<source>`` is the masked mean over exactly
the rows of that source. The batch is built so that every wrong reduction gives other numbers:
the micro-batches hold very different numbers of loss tokens, and the sources are mixed inside
micro-batches.
"""

import pytest
import torch

from megatron_vlm.config import DATA_SOURCES, load_config

# Two micro-batches of two rows; rows 0 and 2 start with an image (random_batch).
ROWS, SEQ, MICRO = 4, 32, 2
# Each row keeps a different share of its loss positions, so micro-batch 0 has about four times
# fewer loss tokens than micro-batch 1 (a mean per micro-batch would weigh them equally).
KEEP = (0.15, 0.3, 0.9, 1.0)
# Sources mixed inside each micro-batch, in an order unlike DATA_SOURCES' own.
SOURCES = ("captions", "text", "instructions", "text")


def token_losses_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position, -log softmax(logits)[label], in float64."""
    logits = logits.double()
    return logits.logsumexp(-1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def step(runtime):
    """By-hand reference (loss, per-source means, gradients) and one train_step on the same
    weights and micro-batches."""
    from megatron_vlm.data.batch import random_batch, split_microbatches
    from megatron_vlm.model.build import build_model
    from megatron_vlm.training.checkpointing import unwrap
    from megatron_vlm.training.step import setup_training, train_step

    # No clipping (the buffers then hold the raw gradients); the model has no dropout, so the
    # reference forward pass below and the step's see the same function.
    cfg = load_config("tiny", [f"train.seq_length={SEQ}", f"train.micro_batch_size={MICRO}",
                               f"train.global_batch_size={ROWS}", "train.clip_grad=1e9"])
    torch.manual_seed(3)
    state = setup_training(build_model(cfg), cfg)
    model = unwrap(state.model)

    gen = torch.Generator().manual_seed(11)
    batch = random_batch(gen, ROWS, SEQ, cfg.model.decoder.vocab_size,
                         cfg.model.encoder.num_image_tokens, cfg.model.encoder.embed_dim)
    keep = torch.rand(ROWS, SEQ, generator=gen) < torch.tensor(KEEP).unsqueeze(1)
    batch["loss_mask"] = batch["loss_mask"] * keep
    batch["source_ids"] = torch.tensor([DATA_SOURCES.index(s) for s in SOURCES])
    microbatches = split_microbatches(batch, MICRO)
    tokens_per_mb = [int(mb["loss_mask"].sum()) for mb in microbatches]
    assert tokens_per_mb[1] > 3 * tokens_per_mb[0] > 0, tokens_per_mb

    losses = []
    for mb in microbatches:
        logits = model(tokens=mb["tokens"], labels=None, image_mask=mb["image_mask"],
                       image_embeddings=mb["image_embeddings"])
        losses.append(token_losses_by_hand(logits, mb["labels"]))
    token_loss = torch.cat(losses)  # [ROWS, SEQ], rows in batch order
    mask = batch["loss_mask"].double()
    loss = (token_loss * mask).sum() / mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    token_loss = token_loss.detach()
    by_source = {}
    for name in set(SOURCES):
        rows = torch.tensor([s == name for s in SOURCES])
        by_source[name] = float((token_loss[rows] * mask[rows]).sum() / mask[rows].sum())

    out = train_step(state, microbatches, len(microbatches), cfg)
    return {"loss": float(loss), "by_source": by_source, "params": params,
            "grads": [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)],
            "out": out}


def test_gradients_are_those_of_the_per_token_mean_over_the_global_batch(step):
    # megatron leaves each parameter's gradient in its DDP buffer (main_grad) until the next
    # step zeroes it; the optimizer step does not touch it without clipping.
    checked = 0
    for p, expected in zip(step["params"], step["grads"]):
        torch.testing.assert_close(p.main_grad.double(), expected.double(), rtol=1e-4,
                                   atol=1e-7)
        checked += bool(expected.abs().sum() > 0)
    assert checked > 10  # decoder and projector weights took part
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in step["grads"]))
    assert step["out"]["grad_norm"] == pytest.approx(float(norm), rel=1e-4)


def test_logged_loss_is_the_per_token_mean(step):
    assert step["out"]["loss"] == pytest.approx(step["loss"], rel=1e-6)


def test_each_source_loss_is_the_masked_mean_over_its_own_rows(step):
    logged = {k[len("loss/"):]: v for k, v in step["out"].items() if k.startswith("loss/")}
    assert logged.keys() == step["by_source"].keys()
    for name, expected in step["by_source"].items():
        assert logged[name] == pytest.approx(expected, rel=1e-6), name
    # The sources' means differ by more than the tolerance: a swap would show.
    values = sorted(step["by_source"].values())
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-4 * values[-1]
