"""Training steps and weight copies shared by the GPU tests (marker ``gpu``).

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu`` (tools/gpu_check.py does, after
installing from a wheelhouse). The fixtures ``cuda_runtime`` (one CUDA runtime per module) and
``transformer_engine`` are in tests/conftest.py.
"""

from __future__ import annotations

import torch

from megatron_vlm.config import load_config


def tiny_cuda_config(*overrides: str):
    """The tiny recipe on CUDA, bf16 unless overridden."""
    return load_config("tiny", ["parallel.device=cuda", "train.params_dtype=bf16",
                                "data.kind=random", *overrides])


def build(cfg, te: bool, seed: int = 0, **kwargs):
    from megatron_vlm.model.build import build_model

    torch.manual_seed(seed)
    return build_model(cfg, use_transformer_engine=te, **kwargs)


def copy_weights(source, target) -> None:
    """``source``'s weights into ``target`` (TE and local specs share parameter names; TE's
    ``_extra_state`` entries are left as they are)."""
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)


def train(cfg, model, steps: int) -> list[float]:
    """``steps`` optimizer steps on the config's random batches; per-step losses."""
    from megatron_vlm.training.loop import make_batches
    from megatron_vlm.training.step import setup_training, train_step

    state = setup_training(model, cfg)
    next_step, _ = make_batches(cfg, 0, 1, None)
    losses = []
    for _ in range(steps):
        microbatches = next_step()
        losses.append(train_step(state, microbatches, len(microbatches), cfg)["loss"])
    return losses


def batch_on_cuda(cfg, rows: int = 2, documents: bool = False, seed: int = 5) -> dict:
    from megatron_vlm.data.batch import random_batch
    from megatron_vlm.training.device_batches import to_device

    enc = cfg.model.encoder
    host = random_batch(torch.Generator().manual_seed(seed), rows, cfg.train.seq_length,
                        cfg.model.decoder.vocab_size, enc.num_image_tokens, enc.embed_dim,
                        documents=documents)
    return to_device(host, torch.device("cuda", torch.cuda.current_device()))


def per_token_loss(model, batch, **extra):
    return model(tokens=batch["tokens"], labels=batch["labels"], image_mask=batch["image_mask"],
                 image_embeddings=batch.get("image_embeddings"), **extra)
