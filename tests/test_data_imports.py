"""Training reads shards without the image stack: importing the training path and serving blend
batches imports neither PIL nor nvidia.dali. They belong to the modules that decode images
(image_io, dali_pipeline, precompute: the precompute tool and the evaluation's image path), and
each check runs in a fresh interpreter so that nothing another test imported can hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_vlm.config import load_config

# The image modules and the preprocessing drivers the tools call: the data flows from them to
# the shards, never back, so serving batches loads none of them.
TOOL_SIDE_MODULES = (
    "megatron_vlm.data.image_io", "megatron_vlm.data.dali_pipeline",
    "megatron_vlm.data.image_sources", "megatron_vlm.data.precompute",
    "megatron_vlm.data.text_preprocess", "megatron_vlm.data.llava_preprocess",
)

_REPORT = """
import json, sys
print(json.dumps({"image_stack": sorted(m for m in sys.modules
                                        if m.split(".")[0] == "PIL" or m.startswith("nvidia.dali")),
                  "loaded": sorted(m for m in sys.modules if m.startswith("megatron_vlm."))}))
"""

# What a training run imports: the loop, the step, the model, and every data module it reads.
TRAINING_MODULES = (
    "megatron_vlm.training.loop", "megatron_vlm.training.step", "megatron_vlm.model.build",
    "megatron_vlm.data.loader", "megatron_vlm.data.blend", "megatron_vlm.data.samples",
    "megatron_vlm.data.batch", "megatron_vlm.data.tokenizer", "megatron_vlm.data.shard_io",
    "megatron_vlm.data.embedding_shards", "megatron_vlm.data.instruction_shards",
    "megatron_vlm.data.text_shards", "megatron_vlm.data.text_windows",
)

_SERVE_BATCHES = """
import json, sys
from megatron_vlm.config import load_config
from megatron_vlm.data.loader import BlendLoader, DataSources, build_index

cfg = load_config("tiny", sys.argv[1:])
enc = cfg.model.encoder
sources = DataSources(cfg.data, cfg.train.seq_length, enc.num_image_tokens, enc.embed_dim,
                      cfg.model.decoder.vocab_size)
index = build_index(sources, cfg)
batches = BlendLoader(sources, index, 0, 1, cfg.train.micro_batch_size).next_step()
print(json.dumps({"sources": sorted({int(s) for mb in batches for s in mb["source_ids"]}),
                  "images": sum(int(mb["image_embeddings"].shape[0]) for mb in batches
                                if "image_embeddings" in mb)}))
"""


def _run(script: str, *args: str) -> tuple[dict, str]:
    """Runs ``script`` + the report in a fresh interpreter: (report, the script's own output)."""
    proc = subprocess.run([sys.executable, "-c", script + _REPORT, *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *lines, last = proc.stdout.strip().splitlines()
    return json.loads(last), "\n".join(lines)


@pytest.mark.slow  # a fresh interpreter; the blend-batches import test stays
def test_importing_the_training_path_imports_no_image_stack():
    report, _ = _run("".join(f"import {m}\n" for m in TRAINING_MODULES))
    assert set(TRAINING_MODULES) <= set(report["loaded"])
    assert report["image_stack"] == [], (
        f"the training path imports {report['image_stack'][:5]}; import PIL/DALI inside the "
        f"functions that decode images instead")


def _write_shards(root) -> list[str]:
    """Text, caption and instruction shards for the tiny recipe, written with the real writers;
    returns the config overrides that point a blend at them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_vlm.data.embedding_shards import EmbeddingShardWriter
    from megatron_vlm.data.instruction_shards import InstructionShardWriter
    from megatron_vlm.data.text_preprocess import preprocess_text

    enc = load_config("tiny").model.encoder
    vocab = {f"t{i}": i for i in range(2, 256)} | {"<|endoftext|>": 0, "<|sep|>": 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|sep|>"])
    tokenizer = str(root / "tokenizer.json")
    tok.save(tokenizer)
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"text": " ".join(f"t{t}" for t in rng.integers(2, 256, size=n))}) + "\n"
        for n in rng.integers(20, 200, size=60)))
    preprocess_text([str(corpus)], tokenizer, str(root / "text" / "corpus"), progress=False)
    gen = torch.Generator().manual_seed(0)
    with EmbeddingShardWriter(root / "captions", enc.num_image_tokens, enc.embed_dim) as w:
        for i in range(12):
            w.add(f"cap{i}", torch.randn(enc.num_image_tokens, enc.embed_dim, generator=gen),
                  rng.integers(2, 256, size=10).tolist())
    with EmbeddingShardWriter(root / "images", enc.num_image_tokens, enc.embed_dim) as w:
        for i in range(3):
            w.add(f"img{i}.png", torch.randn(enc.num_image_tokens, enc.embed_dim, generator=gen))
    with InstructionShardWriter(root / "instructions") as w:
        for i in range(12):
            w.add(f"conv{i}", rng.integers(2, 256, size=30).tolist(), [0] * 15 + [1] * 15,
                  image_key=f"img{i % 3}.png" if i % 2 == 0 else None)
    return ["data.kind=blend", f"data.tokenizer={tokenizer}", f"data.text={root}/text/corpus",
            f"data.captions={root}/captions", f"data.instructions={root}/instructions",
            f"data.instruction_images={root}/images", f"output_dir={root}/run",
            "data.ratios={text: 0.4, captions: 0.3, instructions: 0.3}", "train.train_iters=4"]


def test_serving_blend_batches_with_images_imports_no_image_stack(tmp_path):
    report, output = _run(_SERVE_BATCHES, *_write_shards(tmp_path))
    served = json.loads(output.splitlines()[-1])
    # The batches really came from all three sources and carried image embeddings.
    assert served["sources"] == [0, 1, 2] and served["images"] > 0, served
    assert report["image_stack"] == [], (
        f"serving batches imports {report['image_stack'][:5]}; the loader reads precomputed "
        f"embeddings and must not need PIL or DALI")
    assert not set(TOOL_SIDE_MODULES) & set(report["loaded"]), sorted(
        set(TOOL_SIDE_MODULES) & set(report["loaded"]))
