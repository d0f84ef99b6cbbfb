#!/usr/bin/env python
"""Generates ShapesWorld: synthetic images of coloured shapes with captions, LLaVA
conversations, VQAv2/POPE/RefCOCO evaluation files, a text corpus with lm-eval tasks and
tokenizers, as raw files in the real formats (layout: docs/synthetic.md).

    python tools/make_synthetic_data.py --out data/shapesworld [--seed 0] [--images 256]

The same seed and options give byte-identical files. A directory already holding the same
complete data set is verified and left as is; an interrupted run is redone from scratch.
"""

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import argparse
import json
import sys
from dataclasses import fields

from megatron_vlm.cli import run_main

PROG = "make_synthetic_data"


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.synthetic import ShapesWorldConfig

    parser = argparse.ArgumentParser(
        prog="tools/make_synthetic_data.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    docs = ShapesWorldConfig.field_docs()
    defaults = ShapesWorldConfig()
    for f in fields(ShapesWorldConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if f.name != "llava_images" else None
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=docs.get(f.name, ""))
        else:
            kind = float if "float" in str(f.type) else int
            parser.add_argument(flag, type=kind, default=default, help=docs.get(f.name, ""))
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if the data set is already there, and write into a "
                             "non-empty directory that holds no ShapesWorld data set")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object instead of text")
    return parser


def main(argv=None) -> int:
    logger = configure_logging()
    from megatron_vlm.synthetic import ShapesWorldConfig, generate

    args = build_parser().parse_args(argv)
    cfg = ShapesWorldConfig(**{f.name: getattr(args, f.name) for f in fields(ShapesWorldConfig)})
    summary = generate(args.out, cfg, progress=not args.no_progress, force=args.force)
    if args.json:
        out = {k: v for k, v in summary.items() if k != "files"}
        out["files"] = len(summary["files"])
        print(json.dumps(out))
        return 0
    counts, secs = summary["counts"], summary["seconds"]
    if summary["skipped"]:
        logger.info("%s already holds this data set (verified %d files); nothing to do",
                    args.out, len(summary["files"]))
    lines = [f"ShapesWorld seed {summary['seed']} -> {args.out} "
             f"({len(summary['files'])} files, {summary['image_size']} px images)"]
    lines += [f"  {k:22s} {v}" for k, v in counts.items()]
    lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items()))
    if summary["corrupt"]:
        lines.append("  corrupt items: " + ", ".join(
            f"{c['key']} ({c['kind']}, {c['set']})" for c in summary["corrupt"]))
    print("\n".join(lines), file=sys.stdout)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
