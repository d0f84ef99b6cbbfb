"""Benchmark: the exact token-ratio blend index, at the paper's image-text scale against
megatron-core's compiled blending helper, and at the scale of its 4.3T-token text run.

    python bench/bench_blend_index.py                          # every case, 3 repeats each
    python bench/bench_blend_index.py --case 28b --repeat 5 --json

Cases (synthetic per-sequence positions, no data):

* ``28b``: 28B tokens, L=1024, global batch 256, text 0.8 / caption 0.1 / instruction 0.1 of
  tokens. Text 25M packed windows of 1024 positions; caption 3M records of [729 image
  positions][SEP][caption][EOS], caption lengths log-normal (mean about 30 tokens); instruction
  665K conversations, 90% with an image, log-normal lengths cut at 1024. megatron-core 0.16.1's
  ``build_blending_indices`` (the compiled ``helpers_cpp`` extension shipped in its wheel, called
  as ``BlendedDataset._build_indices`` calls it, allocation of its two arrays included) builds
  the same number of samples with the same weights.
* ``4.3t-text``: DCLM-1B's text run, 4.3T tokens at L=2048, global batch 1024: one text source
  of 2,099,609,375 windows (about 2.1 billion sequences, one epoch).
* ``4.3t-captions``: the same with 10% of tokens from the caption source above (3M records,
  about 762 positions each, about 190 epochs).

Every build runs in a fresh subprocess, which reports its build seconds and peak RSS
(``ru_maxrss``; ``rss_before`` is the same figure just before the build: interpreter, numpy and
the source arrays). megatron's helper is loaded straight from its ``.so`` so its process imports
numpy only, as ours does; after its measurement the worker also reports the token fractions its
per-sample weights give with the 28b case's sequence lengths. Fetch times are per global batch:
``random`` over the whole run (a large variable-length source then computes a few blocks of a
new epoch), ``warm`` over random batches of the last 2000 (epochs already read),
``sequential`` reading on as the loader does.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

CASES = ("28b", "4.3t-text", "4.3t-captions")
FRACTIONS_28B = {"text": 0.8, "caption": 0.1, "instruction": 0.1}
TEXT_4T_WINDOWS = 4_300_000_000_000 // 2048


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def caption_positions(seq_length: int, n_img: int = 729, count: int = 3_000_000,
                      seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    caption_len = np.clip(np.rint(rng.lognormal(3.3, 0.5, count)), 3, 200).astype(np.int32)
    return np.minimum(n_img + 2 + caption_len, seq_length).astype(np.uint16)


def make_case(case: str):
    """(sources, fractions, total tokens, L, B) of a case."""
    from megatron_vlm.data.blend import BlendSource

    if case == "28b":
        L, n_img = 1024, 729
        rng = np.random.default_rng(1)
        has_image = rng.random(665_000) < 0.9
        conv_len = np.clip(np.rint(rng.lognormal(5.2, 0.6, 665_000)), 20, 4000).astype(np.int32)
        instruction = np.minimum(np.where(has_image, n_img, 0) + conv_len + 1, L).astype(np.uint16)
        sources = [BlendSource("text", 25_000_000, L),
                   BlendSource("caption", 3_000_000, caption_positions(L), image_positions=n_img),
                   BlendSource("instruction", instruction.shape[0], instruction,
                               image_positions=np.where(has_image, n_img, 0).astype(np.uint16))]
        return sources, FRACTIONS_28B, 28 * 10**9, L, 256
    L, B, total = 2048, 1024, 4_300_000_000_000
    text = BlendSource("text", TEXT_4T_WINDOWS, L)
    if case == "4.3t-text":
        return [text], {"text": 1.0}, total, L, B
    caption = BlendSource("caption", 3_000_000, caption_positions(L), image_positions=729)
    return [text, caption], {"text": 0.9, "caption": 0.1}, total, L, B


def _median_ms(index, batches) -> float:
    times = []
    for i in batches:
        t0 = time.perf_counter()
        index.batch(int(i))
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 4)


def worker_ours(case: str, seed: int) -> dict:
    from megatron_vlm.data.blend import build_blend_index

    sources, fractions, total, L, B = make_case(case)
    before = rss_mib()
    t0 = time.perf_counter()
    index = build_blend_index(sources, fractions, total, L, B, seed=seed)
    build = time.perf_counter() - t0
    peak = rss_mib()
    nb = index.num_batches
    rng = np.random.default_rng(seed)
    random_ms = _median_ms(index, rng.integers(0, nb, 100))
    warm_ms = _median_ms(index, rng.integers(max(0, nb - 2000), nb, 500))
    sequential_ms = _median_ms(index, range(nb // 2, nb // 2 + 1000))
    s = index.summary()
    return {"build_seconds": round(build, 4), "peak_rss_mib": round(peak, 1),
            "rss_before_mib": round(before, 1), "peak_rss_after_fetches_mib": round(rss_mib(), 1),
            "fetch_random_ms": random_ms, "fetch_warm_ms": warm_ms,
            "fetch_sequential_ms": sequential_ms, "num_sequences": s["num_sequences"],
            "num_batches": nb, "max_abs_error_sequences": s["max_abs_error_sequences"],
            "error_bound_sequences": s["error_bound_sequences"],
            "boundaries_checked_at_build": s["boundaries_checked_at_build"],
            "merge_tree": s["merge_tree"],
            "achieved_fractions": {x["name"]: x["achieved_fraction"] for x in s["sources"]},
            "epochs": {x["name"]: round(x["epochs"], 4) for x in s["sources"]}}


def _megatron_helpers():
    """megatron-core's compiled ``helpers_cpp`` module, loaded without importing megatron.core
    (which would import torch and dwarf the helper's own memory)."""
    spec = importlib.util.find_spec("megatron")
    where = os.path.join(list(spec.submodule_search_locations)[0], "core", "datasets")
    found = glob.glob(os.path.join(where, "helpers_cpp*.so"))
    if not found:
        raise FileNotFoundError(f"no compiled helpers_cpp extension under {where}")
    loaded = importlib.util.spec_from_file_location("helpers_cpp", found[0])
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def worker_megatron(samples: int, global_batch: int) -> dict:
    helpers = _megatron_helpers()
    weights = list(FRACTIONS_28B.values())
    before = rss_mib()
    t0 = time.perf_counter()
    dataset_index = np.zeros(samples, dtype=np.int16)
    dataset_sample_index = np.zeros(samples, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index,
                                   np.asarray(weights, dtype=np.float64), len(weights), samples,
                                   False)
    result = {"build_seconds": round(time.perf_counter() - t0, 4),
              "peak_rss_mib": round(rss_mib(), 1), "rss_before_mib": round(before, 1)}
    # After the measurement: what its per-sample weights do to token fractions with the 28b
    # case's sequence lengths, at every global-batch boundary.
    sources, _, _, L, _ = make_case("28b")
    nb = samples // global_batch
    tokens = np.zeros((nb + 1, len(weights)), dtype=np.int64)
    for c, s in enumerate(sources):
        mask = dataset_index[:nb * global_batch] == c
        tps = s.tokens_per_sequence
        tok = mask * tps if isinstance(tps, int) else np.where(
            mask, tps[dataset_sample_index[:nb * global_batch] % s.num_sequences], 0)
        tokens[1:, c] = np.cumsum(tok.reshape(nb, global_batch).sum(axis=1))
    seen = tokens.sum(axis=1)
    err = np.abs(tokens - seen[:, None] * np.asarray(weights)[None, :]).max()
    result["token_fractions"] = {s.name: round(float(tokens[-1, c] / seen[-1]), 4)
                                 for c, s in enumerate(sources)}
    result["max_abs_token_error_sequences"] = round(float(err) / L, 1)
    return result


def run_worker(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _med(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=CASES, action="append", help="default: every case")
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per case")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--worker", choices=("ours", "megatron"), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "ours":
        print(json.dumps(worker_ours(args.case[0], args.seed)))
        return 0
    if args.worker == "megatron":
        print(json.dumps(worker_megatron(args.samples, args.global_batch)))
        return 0

    result = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()}-core CPU",
              "date": time.strftime("%Y-%m-%d"), "numpy": np.__version__,
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "cases": {}}
    for case in args.case or CASES:
        ours, theirs = [], []
        for r in range(args.repeat):
            ours.append(run_worker(["--worker", "ours", "--case", case, "--seed", str(r)]))
            print(f"{case} ours repeat {r}: {ours[-1]['build_seconds']} s, "
                  f"{ours[-1]['peak_rss_mib']} MiB", file=sys.stderr)
            if case == "28b":     # interleaved, so both see the same load
                theirs.append(run_worker(["--worker", "megatron", "--samples",
                                          str(ours[-1]["num_sequences"]), "--global-batch",
                                          str(ours[-1]["num_sequences"] // ours[-1]["num_batches"])]))
                print(f"{case} megatron repeat {r}: {theirs[-1]['build_seconds']} s, "
                      f"{theirs[-1]['peak_rss_mib']} MiB", file=sys.stderr)
        entry = {"ours_build_seconds": [r["build_seconds"] for r in ours],
                 "ours_median_build_seconds": _med(ours, "build_seconds"),
                 "ours_median_peak_rss_mib": _med(ours, "peak_rss_mib"),
                 "ours_median_rss_before_mib": _med(ours, "rss_before_mib"),
                 "ours_median_fetch_random_ms": _med(ours, "fetch_random_ms"),
                 "ours_median_fetch_warm_ms": _med(ours, "fetch_warm_ms"),
                 "ours_median_fetch_sequential_ms": _med(ours, "fetch_sequential_ms"),
                 "ours_median_peak_rss_after_fetches_mib": _med(ours, "peak_rss_after_fetches_mib"),
                 "ours_last_run": ours[-1]}
        if theirs:
            entry.update({
                "megatron_build_seconds": [r["build_seconds"] for r in theirs],
                "megatron_median_build_seconds": _med(theirs, "build_seconds"),
                "megatron_median_peak_rss_mib": _med(theirs, "peak_rss_mib"),
                "megatron_median_rss_before_mib": _med(theirs, "rss_before_mib"),
                "ratio_build_seconds_ours_over_megatron": round(
                    _med(ours, "build_seconds") / _med(theirs, "build_seconds"), 3),
                "ratio_peak_rss_ours_over_megatron": round(
                    _med(ours, "peak_rss_mib") / _med(theirs, "peak_rss_mib"), 3),
                "megatron_token_fractions": theirs[-1]["token_fractions"],
                "megatron_max_abs_token_error_sequences":
                    theirs[-1]["max_abs_token_error_sequences"]})
        result["cases"][case] = entry
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
