"""The lineage tree as a picture: Graphviz DOT, rendered by ``dot`` or, without it, matplotlib.

A run is a box (stage, directory, run name, checkpoints, real tokens per source), an
evaluation a note (the step it scored, vision and text stable scores); an arrow goes from a run
to each run that started from one of its checkpoints, labelled with that checkpoint's step and
share of the schedule, and to each evaluation of its checkpoints. A run whose parent is not
under the directory gets a dashed node naming that parent. :func:`write_graph` always writes
the DOT file and renders the PNG with ``dot`` when the binary is on PATH, else draws the same
graph with matplotlib (a layered layout: one column per generation).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from megatron_vlm.experiments.lineage_tree import (
    Evaluation,
    LineageTree,
    Run,
    children,
    parent_label,
    percent_text,
    score_text,
)

STAGE_COLORS = {"text": "#dbe9f6", "image_text": "#e4f2df", "finetune": "#fbe5d0"}
OTHER_COLOR = "#eeeeee"


@dataclass
class Node:
    """One box of the picture."""

    id: str
    """The DOT node id."""
    label: str
    """Its text (lines separated by newlines)."""
    color: str
    """Its fill colour."""
    shape: str = "box"
    """DOT shape: ``box`` (a run), ``note`` (an evaluation), ``plaintext`` (a parent outside)."""


@dataclass
class Edge:
    """One arrow of the picture."""

    source: str
    """Id of the node it starts at."""
    target: str
    """Id of the node it points to."""
    label: str = ""
    """Its text (the checkpoint it goes through)."""


@dataclass
class Graph:
    """The picture's nodes and arrows: a forest, roots first."""

    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)


def graph_of(tree: LineageTree) -> Graph:
    """The nodes and arrows of ``tree``."""
    graph = Graph()
    ids: dict[int, str] = {}

    def node_id(item: object) -> str:
        return ids.setdefault(id(item), f"n{len(ids)}")

    def add_run(run: Run) -> None:
        tokens = "\n".join(f"{name}: {n:,}" for name, n in run.real_tokens.items())
        steps = ", ".join(str(c.step) for c in run.checkpoints)
        label = "\n".join(part for part in (
            run.stage, tree.relative(run.directory), run.name and f"[{run.name}]",
            f"checkpoints: {steps}", tokens and f"real tokens\n{tokens}") if part)
        graph.nodes.append(Node(node_id(run), label, STAGE_COLORS.get(run.stage, OTHER_COLOR)))
        for checkpoint, item in children(run):
            if isinstance(item, Run):
                add_run(item)
                step = f"step {checkpoint.step}{percent_text(checkpoint.fraction)}"
                graph.edges.append(Edge(node_id(run), node_id(item), step))
            else:
                add_evaluation(item)
                graph.edges.append(Edge(node_id(run), node_id(item), f"step {checkpoint.step}"))

    def add_evaluation(evaluation: Evaluation) -> None:
        graph.nodes.append(Node(node_id(evaluation),
                                f"eval step {evaluation.step}\n"
                                f"vision {score_text(evaluation.scores['vision'])}\n"
                                f"text {score_text(evaluation.scores['text'])}",
                                "#ffffff", shape="note"))

    for run in tree.roots:
        if run.parent is not None:
            outside = f"outside{len(ids)}"
            graph.nodes.append(Node(outside, parent_label(tree, run), "#ffffff", "plaintext"))
            add_run(run)
            graph.edges.append(Edge(outside, node_id(run)))
        else:
            add_run(run)
    for evaluation in tree.unmatched:
        add_evaluation(evaluation)
    return graph


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph, title: str) -> str:
    """The graph in Graphviz's DOT language (left to right)."""
    lines = [f"digraph lineage {{", f"  label={_quote(title)}; labelloc=t; rankdir=LR;",
             '  node [fontname="Helvetica", fontsize=10, style=filled];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for node in graph.nodes:
        style = ', style="dashed"' if node.shape == "plaintext" else ""
        lines.append(f"  {node.id} [label={_quote(node.label)}, shape={node.shape}, "
                     f"fillcolor={_quote(node.color)}{style}];")
    for edge in graph.edges:
        label = f" [label={_quote(edge.label)}]" if edge.label else ""
        lines.append(f"  {edge.source} -> {edge.target}{label};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _layout(graph: Graph) -> dict[str, tuple[float, float]]:
    """(column, row) of each node: a column per generation, leaves one row apart, a parent
    level with the middle of its children."""
    kids: dict[str, list[str]] = {}
    has_parent = set()
    for edge in graph.edges:
        kids.setdefault(edge.source, []).append(edge.target)
        has_parent.add(edge.target)
    where: dict[str, tuple[float, float]] = {}
    next_row = [0.0]

    def place(node: str, depth: int) -> float:
        below = [place(k, depth + 1) for k in kids.get(node, [])]
        if below:
            row = sum(below) / len(below)
        else:
            row, next_row[0] = next_row[0], next_row[0] + 1
        where[node] = (float(depth), row)
        return row

    for node in graph.nodes:
        if node.id not in has_parent:
            place(node.id, 0)
    return where


def draw_with_matplotlib(graph: Graph, title: str, path: Path) -> None:
    """The graph as a PNG without Graphviz."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = _layout(graph)
    columns = max((x for x, _ in where.values()), default=0) + 1
    rows = max((y for _, y in where.values()), default=0) + 1
    lines = max((n.label.count("\n") + 1 for n in graph.nodes), default=1)
    fig, ax = plt.subplots(figsize=(3.6 * columns + 1, (0.16 * lines + 0.5) * rows + 1))
    ax.set_xlim(-0.5, columns - 0.3)
    ax.set_ylim(rows - 0.5, -0.7)
    ax.axis("off")
    ax.set_title(title)
    for edge in graph.edges:
        (x0, y0), (x1, y1) = where[edge.source], where[edge.target]
        ax.annotate("", xy=(x1 - 0.33, y1), xytext=(x0 + 0.33, y0),
                    arrowprops={"arrowstyle": "->", "color": "#555555"})
        if edge.label:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 - 0.12, edge.label, fontsize=7,
                    ha="center", va="bottom", color="#333333")
    for node in graph.nodes:
        x, y = where[node.id]
        style = "round,pad=0.4" if node.shape == "note" else "square,pad=0.4"
        ax.text(x, y, node.label, fontsize=7, ha="center", va="center",
                bbox={"boxstyle": style, "facecolor": node.color,
                      "edgecolor": "#999999" if node.shape == "plaintext" else "#333333",
                      "linestyle": "--" if node.shape == "plaintext" else "-"})
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_graph(tree: LineageTree, png: Path) -> tuple[Path, Path, str]:
    """Writes ``png`` and the DOT file beside it (``.dot``); returns (dot path, png path, what
    drew the PNG: ``graphviz dot``, or ``matplotlib`` when dot is missing or failed)."""
    title = f"lineage of {tree.root}"
    graph = graph_of(tree)
    png.parent.mkdir(parents=True, exist_ok=True)
    dot_path = png.with_suffix(".dot")
    dot_path.write_text(to_dot(graph, title), encoding="utf-8")
    dot = shutil.which("dot")
    if dot is not None:
        done = subprocess.run([dot, "-Tpng", str(dot_path), "-o", str(png)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return dot_path, png, "graphviz dot"
        failed = (done.stderr.strip().splitlines() or ["no message"])[-1]
        draw_with_matplotlib(graph, title, png)
        return dot_path, png, f"matplotlib (dot failed: {failed})"
    draw_with_matplotlib(graph, title, png)
    return dot_path, png, "matplotlib"
