#!/usr/bin/env python
"""Shows where every result of a run or sweep directory came from: the tree of runs (a text
run, the image-text runs branched from its x% checkpoints, the fine-tuning runs from those),
the evaluations of their checkpoints with their vision and text stable scores, and each run's
real tokens per data source, as text and as a picture.

    python tools/lineage.py runs/sweeps/fig4_checkpoint_pct_tiny_cpu
    python tools/lineage.py runs/quickstart --output runs/quickstart/plots/lineage.png
    python tools/lineage.py runs/tiny_cpu/finetune_1ep      # one run: its parents outside it

Prints the tree, then writes DIR/lineage.png (or --output) and the Graphviz DOT file beside it
(lineage.dot, always). The PNG is rendered by Graphviz's `dot` when it is on PATH, else drawn
with matplotlib. What the tree is read from: every checkpoint's lineage record (common.json)
and every results.json under the directory (docs/experiments.md, "Lineage").
"""

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import argparse
from pathlib import Path

from megatron_vlm.cli import run_main

PROG = "lineage"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/lineage.py",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a run directory or a sweep's output root")
    parser.add_argument("--output", metavar="FILE",
                        help="the PNG to write (default: DIRECTORY/lineage.png); the DOT file "
                             "goes beside it with the suffix .dot")
    return parser


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    from megatron_vlm.experiments.lineage_graph import write_graph
    from megatron_vlm.experiments.lineage_tree import scan, tree_text

    tree = scan(args.directory)
    print(tree_text(tree))
    png = Path(args.output) if args.output else Path(args.directory) / "lineage.png"
    dot, png, drawn_by = write_graph(tree, png)
    print(f"wrote {dot}")
    print(f"wrote {png} ({drawn_by})")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
