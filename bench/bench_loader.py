"""Loader throughput: sequences/s of one worker for a 90/10 text/caption blend.

    python bench/bench_loader.py [--seq-length 1024] [--captions 400] [--steps 40]

Writes throwaway shards (random text tokens; captions with random 729 x 1152 bf16 embeddings,
the SigLIP so400m shape) to a temporary directory, builds the blend index, then times this
project's loader in the calling process (``num_workers=0``, i.e. the work of one worker) for a
90/10 text/caption mix and, as the baseline in the same process, for text alone. Prints both
figures and their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_shards(root: Path, seq_length: int, captions: int, n_img: int, d_enc: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_vlm.data.embedding_shards import EmbeddingShardWriter
    from megatron_vlm.data.text_shards import write_text_dataset

    vocab = {f"t{i}": i for i in range(4096)}
    vocab.update({"<|endoftext|>": 0, "<|sep|>": 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|sep|>"])
    tokenizer_path = root / "tokenizer.json"
    tok.save(str(tokenizer_path))

    rng = np.random.default_rng(0)
    docs = (np.append(rng.integers(2, 4096, size=int(n)), 0)
            for n in rng.integers(200, 3000, size=12_000))
    prefix = root / "text" / "corpus_00000"
    prefix.parent.mkdir(parents=True)
    write_text_dataset(str(prefix), docs)
    (root / "text" / "corpus.manifest.json").write_text(json.dumps(
        {"shards": {"0": {"prefix": "corpus_00000"}}}))
    gen = torch.Generator().manual_seed(0)
    with EmbeddingShardWriter(root / "captions", n_img, d_enc, rows_per_shard=256) as writer:
        for i in range(captions):
            writer.add(f"img{i:06d}", torch.randn(n_img, d_enc, generator=gen),
                       rng.integers(2, 4096, size=int(rng.integers(8, 60))).tolist())
    return str(tokenizer_path)


def time_loader(root: Path, tokenizer: str, ratios: str, steps: int, seq_length: int,
                n_img: int, d_enc: int) -> float:
    from megatron_vlm.config import load_config
    from megatron_vlm.data.loader import BlendLoader, DataSources, build_index

    cfg = load_config("1b", [
        "data.kind=blend", f"data.tokenizer={tokenizer}", f"data.text={root}/text/corpus",
        f"data.captions={root}/captions", f"data.ratios={ratios}", f"output_dir={root}/run",
        f"train.seq_length={seq_length}", "train.global_batch_size=256", "train.micro_batch_size=8",
        f"train.train_iters={steps}", f"model.encoder.num_image_tokens={n_img}",
        f"model.encoder.embed_dim={d_enc}", "model.decoder.vocab_size=50432"])
    sources = DataSources(cfg.data, seq_length, n_img, d_enc, cfg.model.decoder.vocab_size)
    index = build_index(sources, cfg)
    loader = BlendLoader(sources, index, 0, 1, cfg.train.micro_batch_size, num_workers=0)
    loader.next_step()  # warm the memory maps
    start = time.perf_counter()
    sequences = 0
    for _ in range(steps - 1):
        sequences += sum(mb["tokens"].shape[0] for mb in loader.next_step())
    return sequences / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--captions", type=int, default=400, help="distinct caption rows")
    parser.add_argument("--steps", type=int, default=40, help="global batches of 256 timed")
    args = parser.parse_args()
    n_img, d_enc = 729, 1152
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = write_shards(root, args.seq_length, args.captions, n_img, d_enc)
        mixed = time_loader(root, tokenizer, "{text: 0.9, captions: 0.1}", args.steps,
                            args.seq_length, n_img, d_enc)
        text = time_loader(root, tokenizer, "{text: 1.0}", args.steps, args.seq_length,
                           n_img, d_enc)
    print(json.dumps({"mix_90_10_sequences_per_s_per_worker": round(mixed),
                      "text_only_sequences_per_s_per_worker": round(text),
                      "ratio_mix_over_text_only": round(mixed / text, 3)}))


if __name__ == "__main__":
    main()
