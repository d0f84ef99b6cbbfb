"""Merge trees for the blend index: every candidate tree, its proved error bound, the best one.

A blend merges its sources by ideal time along a small tree (a flat merge is the tree of depth
one); the bound on how far a source can stray from its target depends on the tree, and
docs/blend.md proves it. This module enumerates trees and ranks them by that bound.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import product
from typing import Iterator, Sequence, Union

import numpy as np

_EXHAUSTIVE_TREE_SEARCH_MAX_SOURCES = 6

Tree = Union[int, tuple]


def _set_partitions(items: tuple) -> Iterator[list[tuple]]:
    if len(items) == 1:
        yield [items]
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [(first,) + part[i]] + part[i + 1:]
        yield [(first,)] + part


@lru_cache(maxsize=None)
def _all_trees(items: tuple) -> tuple:
    """Every rooted tree (any arity >= 2) whose leaves are ``items``."""
    if len(items) == 1:
        return (items[0],)
    out = []
    for blocks in _set_partitions(items):
        if len(blocks) < 2:
            continue
        for combo in product(*(_all_trees(b) for b in blocks)):
            out.append(tuple(combo))
    return tuple(out)


def tree_leaves(tree: Tree) -> list[int]:
    return [tree] if isinstance(tree, int) else [x for ch in tree for x in tree_leaves(ch)]


def _internal_nodes(tree: Tree) -> int:
    return 0 if isinstance(tree, int) else 1 + sum(_internal_nodes(ch) for ch in tree)


def tree_error_bounds(tree: Tree, fractions: np.ndarray, max_tokens: Sequence[int]) -> np.ndarray:
    """Proved bound, in tokens, on |source tokens - fraction * total tokens| over every prefix
    of an order merged along ``tree`` (docs/blend.md gives the argument).

    In a node merging streams with relative fractions h_c and largest sequences M_c, a child's
    own error is at most ((1 - h_c) M_c + h_c * sum_{d != c} M_d) / 2; a leaf adds, for every
    node above it, that node's bound times the leaf's share of the node."""
    out = np.zeros(len(fractions))

    def frac(node: Tree) -> float:
        return float(sum(fractions[i] for i in tree_leaves(node)))

    def mtok(node: Tree) -> float:
        return float(max(max_tokens[i] for i in tree_leaves(node)))

    def visit(node: Tree, node_bound: float) -> None:
        if isinstance(node, int):
            out[node] = node_bound
            return
        g = [frac(ch) for ch in node]
        m = [mtok(ch) for ch in node]
        gs, ms = sum(g), sum(m)
        for ch, gc, mc in zip(node, g, m):
            h = gc / gs
            visit(ch, ((1 - h) * mc + h * (ms - mc)) / 2 + h * node_bound)

    visit(tree, 0.0)
    return out


def _weight_balanced_tree(items: list[int], fractions: np.ndarray) -> Tree:
    if len(items) <= 2:
        return items[0] if len(items) == 1 else tuple(items)
    groups: tuple[list[int], list[int]] = ([], [])
    weights = [0.0, 0.0]
    for i in sorted(items, key=lambda j: -fractions[j]):
        side = 0 if weights[0] <= weights[1] else 1
        groups[side].append(i)
        weights[side] += fractions[i]
    return tuple(_weight_balanced_tree(g, fractions) for g in groups)


def _huffman_tree(items: list[int], fractions: np.ndarray) -> Tree:
    nodes: list[tuple[float, int, Tree]] = [(float(fractions[i]), i, i) for i in items]
    tie = len(items)
    while len(nodes) > 1:
        nodes.sort(key=lambda x: (x[0], x[1]))
        (wa, _, a), (wb, _, b) = nodes[0], nodes[1]
        nodes = nodes[2:] + [(wa + wb, tie, (a, b))]
        tie += 1
    return nodes[0][2]


def _candidate_trees(items: tuple, fractions: np.ndarray, max_tokens: Sequence[int],
                     memo: dict) -> list[Tree]:
    """Every tree for up to six leaves; beyond that a few shapes: flat, weight-balanced and
    Huffman binary, and "the t largest leaves beside the best tree of the rest" for every t."""
    if len(items) <= _EXHAUSTIVE_TREE_SEARCH_MAX_SOURCES:
        return list(_all_trees(items))
    order = sorted(items, key=lambda i: -fractions[i])
    candidates = [tuple(items), _weight_balanced_tree(list(items), fractions),
                  _huffman_tree(list(items), fractions)]
    for t in range(1, len(items) - 1):
        rest = tuple(sorted(order[t:]))
        candidates.append(tuple(order[:t]) + (_ranked_trees(rest, fractions, max_tokens, memo)[0],))
    return candidates


def _ranked_trees(items: tuple, fractions: np.ndarray, max_tokens: Sequence[int],
                  memo: dict) -> list[Tree]:
    """Trees over ``items`` from the smallest largest proved error (fewest merge levels on
    ties), judged as if ``items`` were the whole blend."""
    if len(items) == 1:
        return [items[0]]
    if items not in memo:
        sub_f = np.zeros(len(fractions))
        sub_f[list(items)] = fractions[list(items)] / fractions[list(items)].sum()
        scored = []
        for n, tree in enumerate(_candidate_trees(items, fractions, max_tokens, memo)):
            bounds = tree_error_bounds(tree, sub_f, max_tokens)
            scored.append((round(float(bounds.max()), 9), _internal_nodes(tree), n, tree))
        scored.sort(key=lambda x: x[:3])
        memo[items] = [x[3] for x in scored]
    return memo[items]


def choose_merge_trees(fractions: np.ndarray, max_tokens: Sequence[int],
                       count: int = 1) -> list[tuple[Tree, np.ndarray]]:
    """The ``count`` merge trees with the smallest largest proved error, best first, each with
    its bound per source in tokens."""
    fractions = np.asarray(fractions, dtype=np.float64)
    trees = _ranked_trees(tuple(range(len(fractions))), fractions, max_tokens, {})[:count]
    return [(t, tree_error_bounds(t, fractions, max_tokens)) for t in trees]


def choose_merge_tree(fractions: np.ndarray, max_tokens: Sequence[int]) -> tuple[Tree, np.ndarray]:
    """The merge tree with the smallest largest proved error and its bound per source."""
    return choose_merge_trees(fractions, max_tokens)[0]


def format_tree(tree: Tree, names: Sequence[str]) -> str:
    if isinstance(tree, int):
        return names[tree]
    return "(" + ", ".join(format_tree(ch, names) for ch in tree) + ")"
