"""Loads a checkpoint's weights into the tiny model on one device and writes logits of a fixed
batch; optionally saves the weights again (a checkpoint written on that device).

    python tests/scripts/checkpoint_logits.py CHECKPOINT --device cpu --out logits.pt [--save DIR]
"""

import argparse
import os

import torch

from megatron_vlm.config import load_config
from megatron_vlm.data.batch import random_batch
from megatron_vlm.model.build import build_model
from megatron_vlm.runtime import current_device, initialize, shutdown
from megatron_vlm.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_vlm.training.device_batches import to_device

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save", default=None)
    args = parser.parse_args()

    os.environ.setdefault("MASTER_PORT", "29611")
    cfg = load_config("tiny", [f"parallel.device={args.device}", "train.params_dtype=fp32"])
    initialize(1, 1, seed=5, device=args.device)
    model = build_model(cfg)
    common = load_checkpoint(args.checkpoint, model, optimizer=None, with_rng=False)
    enc = cfg.model.encoder
    batch = random_batch(torch.Generator().manual_seed(9), 2, cfg.train.seq_length,
                         cfg.model.decoder.vocab_size, enc.num_image_tokens, enc.embed_dim)
    batch = to_device(batch, current_device())
    model.eval()
    with torch.no_grad():
        logits = model(tokens=batch["tokens"], image_mask=batch["image_mask"],
                       image_embeddings=batch["image_embeddings"])
    torch.save(logits.float().cpu(), args.out)
    if args.save:
        save_checkpoint(args.save, model, None, {**common, "step": common.get("step", 0)},
                        update_latest=False)
    shutdown()


if __name__ == "__main__":  # megatron's checkpoint writer starts helper processes
    main()
