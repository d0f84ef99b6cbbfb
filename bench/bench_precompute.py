#!/usr/bin/env python
"""Benchmark of the image-embedding precompute: images/s of decode + resize (DALI and PIL) and of
the whole precompute (decode, the tiny recipe's encoder, shard writing), all in this process.

Images are drawn in memory (JPEG, web-photo sizes 320..640 x 240..480) before timing starts.
Figures per configuration are the best of --repeats runs (configurations take turns). Printed: images/s, the ratio of each
DALI figure to the PIL baseline, and DALI's mean absolute difference from the PIL reference.

  python bench/bench_precompute.py [--images 256] [--batch-size 64] [--repeats 5] [--json]
"""

from megatron_vlm.logs import configure_logging

import argparse
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np


def make_images(n: int, seed: int = 0):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append((f"img{i:06d}", buf.getvalue()))
    return out


def best_rates(runs: dict, n_images: int, repeats: int) -> dict:
    """Best images/s of each configuration; the configurations take turns in every repeat so that
    load from other processes on a shared machine hits them alike."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: n_images / min(t) for name, t in times.items()}


def main() -> int:
    configure_logging(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: CPU count, at most 8)")
    p.add_argument("--resize", default="letterbox")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    args = p.parse_args()

    import torch

    from megatron_vlm.config import RESIZE_MODES, load_config
    from megatron_vlm.data.dali_pipeline import ImagePreprocessor
    from megatron_vlm.data.image_io import SIGLIP_NORM, pil_preprocess
    from megatron_vlm.data.image_sources import ImageRecord
    from megatron_vlm.data.precompute import precompute_embeddings
    from megatron_vlm.model.vision_encoder import build_vision_encoder

    cfg = load_config("tiny")
    enc_cfg = cfg.model.encoder
    torch.manual_seed(0)
    encoder = build_vision_encoder(enc_cfg).eval()
    data = make_images(args.images)
    mb = sum(len(d) for _, d in data) / 2**20
    print(f"{len(data)} JPEGs ({mb:.1f} MiB, mean {1024 * mb / len(data):.0f} KiB), resize {args.resize}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}")

    def preprocessor(decoder: str, size: int):
        return ImagePreprocessor(size, args.resize, SIGLIP_NORM, batch_size=args.batch_size,
                                 device=args.device, decoder=decoder, num_threads=args.threads)

    def decode_only(pre):
        def run():
            for s in range(0, len(data), args.batch_size):
                pre(data[s:s + args.batch_size])
        return run

    def full_precompute(pre):
        encoder.to(pre.device)

        def run():
            with tempfile.TemporaryDirectory() as out:
                records = [ImageRecord(k, "bench", data=d) for k, d in data]
                precompute_embeddings(records, encoder=encoder, preprocessor=pre, output_dir=out,
                                      n_img=enc_cfg.num_image_tokens, d_enc=enc_cfg.embed_dim,
                                      rows_per_shard=4096, max_skips=0, progress=False)
        return run

    tiny = enc_cfg.image_size
    runs = {}
    for decoder in ("dali", "pil"):
        pre_tiny = preprocessor(decoder, tiny)
        pre_384 = preprocessor(decoder, 384)
        runs[f"{decoder}_decode_{tiny}"] = decode_only(pre_tiny)
        runs[f"{decoder}_decode_384"] = decode_only(pre_384)
        runs[f"{decoder}_precompute_tiny"] = full_precompute(pre_tiny)
    for fn in runs.values():  # warm-up: pipeline start, allocator, first encoder call
        fn()
    results = best_rates(runs, len(data), args.repeats)

    # Accuracy of the DALI path against the PIL reference, per resize mode (first 32 images).
    diffs = {}
    for mode in RESIZE_MODES:
        for size in (tiny, 384):
            pre = ImagePreprocessor(size, mode, batch_size=32, device=args.device, num_threads=args.threads)
            got = pre(data[:32]).images.cpu()
            ref = torch.stack([pil_preprocess(d, size, mode) for _, d in data[:32]])
            per_image = (got - ref).abs().flatten(1).mean(1)
            diffs[f"{mode}_{size}"] = {"mean": float(per_image.mean()), "max": float(per_image.max())}

    rows = [
        (f"DALI decode + resize to {tiny}", "dali_decode_%d" % tiny, "pil_decode_%d" % tiny),
        ("DALI decode + resize to 384", "dali_decode_384", "pil_decode_384"),
        (f"DALI decode + tiny encoder + shards", "dali_precompute_tiny", "pil_precompute_tiny"),
    ]
    print(f"\n{'configuration':42s} {'DALI img/s':>10s} {'PIL img/s':>10s} {'DALI/PIL':>9s}")
    for label, d, pl in rows:
        print(f"{label:42s} {results[d]:10.1f} {results[pl]:10.1f} {results[d] / results[pl]:9.2f}")
    print("\nDALI vs PIL reference, mean abs difference per image after normalization (range [-1, 1]):")
    for name, v in diffs.items():
        print(f"  {name:22s} mean {v['mean']:.4f}  max {v['max']:.4f}")
    if args.json:
        print(json.dumps({"images": len(data), "batch_size": args.batch_size, "rates": results,
                          "ratios": {d: results[d] / results[pl] for _, d, pl in rows},
                          "dali_vs_pil": diffs, "python": platform.python_version()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
