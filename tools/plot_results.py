#!/usr/bin/env python
"""Draws the paper's figures from a sweep's results table (tools/sweep.py's results.csv) as
PNGs: metrics against the text-checkpoint %, the image ratio, the instruction share or the
fine-tuning epochs, per-task bars, and the seed-ablation comparison.

    python tools/plot_results.py runs/sweeps/fig4_checkpoint_pct_tiny_cpu/results.csv \\
        --out runs/sweeps/fig4_checkpoint_pct_tiny_cpu/plots
    python tools/plot_results.py TABLE.csv --out DIR --kind finetune_epochs tasks
    python tools/plot_results.py TABLE.csv --out DIR --kind text_checkpoint \\
        --metrics stable_score.vision stable_score.text vision.vqav2 text.arc_easy

Without --kind the figures follow the table's grid columns that vary: the ablation comparison
(frozen/unfrozen x 2-layer/1-layer: vision and text stable score, VQAv2, ARC-easy, or their
ShapesWorld counterparts) when encoder or projector varies, else one figure per varying axis
among text_checkpoint, image_ratio, instruction_fraction and finetune_epochs (vision and text
stable score side by side); the per-task bars always. Each figure is DIR/<kind>.png, titled with
the sweep's name; rows without results are left out. Figure kinds and what they show:
docs/experiments.md.
"""

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import argparse
from pathlib import Path

from megatron_vlm.cli import run_main

PROG = "plot_results"


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.experiments.plots import KINDS

    parser = argparse.ArgumentParser(prog="tools/plot_results.py",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a results.csv written by tools/sweep.py")
    parser.add_argument("--out", required=True, help="directory for the PNGs (created)")
    parser.add_argument("--kind", nargs="+", choices=KINDS, metavar="KIND",
                        help=f"figures to draw ({', '.join(KINDS)}); default: chosen from the "
                             "grid columns that vary")
    parser.add_argument("--metrics", nargs="+", metavar="COLUMN",
                        help="metric columns to plot instead of the defaults, e.g. "
                             "stable_score.vision text.arc_easy vision.vqav2")
    parser.add_argument("--title", help="name in the figure titles (default: the table's sweep)")
    return parser


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    from megatron_vlm.experiments.plots import plot_table
    from megatron_vlm.experiments.results_table import read_table

    table = read_table(args.table)
    for path in plot_table(table, Path(args.out), args.kind, args.metrics, args.title):
        print(path)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
