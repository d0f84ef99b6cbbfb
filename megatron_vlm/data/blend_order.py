"""The blend's merge order as a function: the sources' position after any number of slots.

Every source is an endless stream of its sequences, epoch after epoch, each epoch a keyed
permutation (megatron_vlm/data/permutation.py). A merge-tree node merges its children's streams by
ideal time: a child's sequence whose doubled midpoint (tokens before it in the child's stream,
times two, plus its own tokens) is ``m`` gets the key ``m / (2 h)``, ``h`` the child's fraction
of the node; ties go to the earlier child. docs/blend.md proves the ratio bound for this order.

Nothing here materialises the order. A *state* holds, per source, how many of its sequences a
prefix of the order has used (an int64 array, one entry per source; a node reads the entries of
its own sources). From a state, :meth:`BlendOrder.advance` merges the next ``K`` elements of any
node (each child supplies at most ``K``). :meth:`BlendOrder.state_at` finds the state after any
``p`` slots: the prefix of all elements with root key <= theta is, per child, the prefix whose
doubled midpoints are <= an integer bound; for a source that bound is one search (a formula for
constant-length sources, a binary search in one epoch's prefix sums otherwise), for an inner
node it is the prefix of its own keys up to a slightly smaller threshold (the proved bound says
how much smaller) followed by a short local merge. A few secant steps on theta land just before
``p``; a local merge covers the rest. All of it is exact integer or float64 work that repeats
the same divisions as the merge itself, so the state equals that of the materialised order.

Variable-length sources need prefix sums of their epochs. A small one's epoch is an exact
permutation whose prefix sums (one array the size of the source) are cached for a few epochs; a
large one (``_SMALL_SOURCE`` sequences or more) is shuffled in blocks (permutation.py,
BlockedPermutation), so a lookup sums block totals and one block, whatever the epoch.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Optional, Sequence, Union

import numpy as np

from megatron_vlm.data.blend_sources import BlendSource
from megatron_vlm.data.blend_trees import Tree, tree_leaves
from megatron_vlm.data.permutation import BlockedPermutation, KeyedPermutation, endless_order

_EPOCH_CACHE_BYTES = 128 << 20  # per source: cached epochs, or blocks and block totals
_EPOCH_CACHE_ENTRIES = 256      # ... and at most this many of them (tiny sources, many epochs)
_SMALL_SOURCE = 1 << 16        # smaller sources read spans of several epochs in one pass
_LANDING_GAP = 256              # state_at lands at most this many slots before the target


def source_permutation(n: int, seed: int, name: str, variable: bool):
    """A source's per-epoch shuffle: a keyed permutation of the whole source, or for a large
    variable-length source a blocked one, whose prefix sums a lookup reaches in
    O(n / block + block) (docs/blend.md, "Variable-length sources")."""
    if variable and n >= _SMALL_SOURCE:
        return BlockedPermutation(n, seed, name)
    return KeyedPermutation(n, seed, name)


def _count_in(prefix: np.ndarray, z: int) -> int:
    """How many leading sequences of a stretch with prefix sums ``prefix`` (from 0) have a
    doubled midpoint ``prefix[r] + prefix[r + 1] <= z``; its last sequence ends beyond ``z / 2``
    unless all of them count."""
    # 2 P[r] < midpoint(r) < 2 P[r + 1]: every r with 2 P[r + 1] <= z counts, then maybe one.
    a = int(np.searchsorted(prefix[1:], z // 2, side="right"))
    if a < prefix.shape[0] - 1 and int(prefix[a]) + int(prefix[a + 1]) <= z:
        a += 1
    return a


def _groups(values: np.ndarray) -> list:
    """(value, where) for each distinct value; one slice when all are equal, as they mostly
    are (a lookup rarely crosses a block)."""
    if values.shape[0] == 0:
        return []
    first = values[0]
    if (values == first).all():
        return [(int(first), slice(None))]
    # Sorted once, so that many groups (a whole epoch's blocks) cost O(n log n), not O(n) each.
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    cuts = [0, *(np.flatnonzero(ordered[1:] != ordered[:-1]) + 1), values.shape[0]]
    return [(int(ordered[a]), order[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


class Leaf:
    """One source's endless stream of sequences."""

    def __init__(self, source: BlendSource, c: int, seed: int):
        self.c = c
        self.leaves = [c]
        self.n = source.num_sequences
        tps = source.tokens_per_sequence
        self.constant: Optional[int] = tps if isinstance(tps, int) else None
        self.tps = None if isinstance(tps, int) else tps
        self.perm = source_permutation(self.n, seed, source.name, self.tps is not None)
        self.blocked = isinstance(self.perm, BlockedPermutation)
        # read() leaves ids to fill_ids (-1) for constant lengths and blocked shuffles.
        self.lazy_ids = self.constant is not None or self.blocked
        self._block_tokens: Optional[np.ndarray] = None     # blocked: tokens per block
        self.epoch_tokens = source.epoch_tokens
        self.max_tokens = source.max_tokens
        self.mean_tokens = source.mean_tokens
        # Exact shuffle: per epoch, the permutation and prefix sums of its first positions
        # (grown on demand). Blocked: per epoch the prefix sums of its blocks' tokens, and per
        # (epoch, slot) one block's members and prefix sums.
        self._epochs: OrderedDict = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__, _epochs=OrderedDict(), _cached_bytes=0)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _cached(self, key):
        with self._lock:
            got = self._epochs.get(key)
            if got is not None:
                self._epochs.move_to_end(key)
            return got

    def _cache(self, key, arrays: tuple[np.ndarray, ...]) -> None:
        with self._lock:
            old = self._epochs.pop(key, None)
            if old is not None:
                self._cached_bytes -= sum(a.nbytes for a in old)
            self._epochs[key] = arrays
            self._cached_bytes += sum(a.nbytes for a in arrays)
            while len(self._epochs) > 1 and (self._cached_bytes > _EPOCH_CACHE_BYTES
                                             or len(self._epochs) > _EPOCH_CACHE_ENTRIES):
                _, dropped = self._epochs.popitem(last=False)
                self._cached_bytes -= sum(a.nbytes for a in dropped)

    def ids(self, j: np.ndarray) -> np.ndarray:
        """Sample ids of stream positions ``j``."""
        if self.blocked:
            return self.perm.base_ids()[self._base_positions(j)].astype(np.int64)
        return endless_order(self.perm, j)

    def _base_positions(self, j: np.ndarray) -> np.ndarray:
        """Blocked shuffle: base positions of stream positions ``j``, from the cached blocks
        (what ``self.perm`` computes, without evaluating networks for every lookup)."""
        epochs, offsets = np.divmod(np.asarray(j, dtype=np.int64), self.n)
        out = np.empty(epochs.shape[0], dtype=np.int64)
        for e, in_e in _groups(epochs):
            starts = self.blocks(e)[0]
            r = offsets[in_e]
            found = np.empty(r.shape[0], dtype=np.int64)
            slots = np.searchsorted(starts, r, side="right") - 1
            for slot, in_slot in _groups(slots):
                found[in_slot] = self.block(e, slot)[0][r[in_slot] - starts[slot]]
            out[in_e] = found
        return out

    def epoch(self, e: int, upto: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact shuffle: epoch ``e``'s permutation and prefix sums (variable lengths; ``[0]``
        otherwise) over at least its first ``upto`` positions. Reading an epoch from its start
        costs only what is read; the grown arrays of a few epochs are cached."""
        perm, prefix = self._cached(e) or (np.zeros(0, np.int32), np.zeros(1, np.int64))
        have = perm.shape[0]
        if have >= upto:
            return perm, prefix
        # Grow geometrically so that reading an epoch position by position stays linear.
        grow = min(self.n, max(upto, 2 * have, 1 << 16))
        new = self.perm(np.arange(have, grow, dtype=np.int64), e)
        perm = np.concatenate([perm, new.astype(perm.dtype if self.n < 2**31 else np.int64)])
        if self.tps is not None:
            more = np.cumsum(self.tps[new], dtype=np.int64)
            more += prefix[-1]
            prefix = np.concatenate([prefix, more])
        self._cache(e, (perm, prefix))
        return perm, prefix

    def blocks(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocked shuffle: the epoch position each block of epoch ``e`` starts at and the
        tokens before it, in visiting order (``num_blocks + 1`` entries each)."""
        got = self._cached(("blocks", e))
        if got is not None:
            return got
        if self._block_tokens is None:      # once per source: O(n), n / block int64s kept
            tokens = self.tps[self.perm.base_ids()].astype(np.int64)
            self._block_tokens = np.add.reduceat(tokens, np.arange(0, self.n, self.perm.block))
        order, starts = self.perm.layout(e)
        before = np.zeros(order.shape[0] + 1, dtype=np.int64)
        np.cumsum(self._block_tokens[order], out=before[1:])
        self._cache(("blocks", e), (starts, before))
        return starts, before

    def block(self, e: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Blocked shuffle: the base positions and prefix sums (from 0) of epoch ``e``'s
        ``slot``-th block (after :meth:`blocks` of that epoch)."""
        got = self._cached((e, slot))
        if got is None:
            positions = self.perm.block_positions(e, slot)
            prefix = np.zeros(positions.shape[0] + 1, dtype=np.int64)
            np.cumsum(self.tps[self.perm.base_ids()[positions]], out=prefix[1:])
            got = (positions, prefix)
            self._cache((e, slot), got)
        return got

    def read(self, j0: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, sample ids) of stream positions ``j0 .. j0 + count - 1``; ids are -1 where
        ``lazy_ids`` (computed only where needed, by :meth:`ids`)."""
        if self.constant is not None:
            return (np.full(count, self.constant, dtype=np.int64),
                    np.full(count, -1, dtype=np.int64))
        if self.blocked:
            # Ids only for the elements a batch keeps (fill_ids): the merge reads past them.
            ids = self.perm.base_ids()[self._base_positions(j0 + np.arange(count, dtype=np.int64))]
            return self.tps[ids].astype(np.int64), np.full(count, -1, dtype=np.int64)
        if count > self.n and self.n < _SMALL_SOURCE:
            # Many epochs of a small source at once: every position with its own epoch's keys.
            ids = self.ids(j0 + np.arange(count, dtype=np.int64))
            return self.tps[ids].astype(np.int64), ids
        tokens, ids = np.empty(count, np.int64), np.empty(count, np.int64)
        done = 0
        while done < count:
            e, r = divmod(j0 + done, self.n)
            take = min(count - done, self.n - r)
            perm, prefix = self.epoch(e, r + take)
            np.subtract(prefix[r + 1:r + take + 1], prefix[r:r + take],
                        out=tokens[done:done + take])
            ids[done:done + take] = perm[r:r + take]
            done += take
        return tokens, ids

    def before(self, j: int) -> int:
        """Tokens of the stream's first ``j`` sequences."""
        if self.constant is not None:
            return j * self.constant
        e, r = divmod(j, self.n)
        if not self.blocked:
            return e * self.epoch_tokens + int(self.epoch(e, r)[1][r])
        starts, before = self.blocks(e)
        slot = int(np.searchsorted(starts, r, side="right")) - 1
        if slot == starts.shape[0] - 1:      # r == n: the whole epoch
            return (e + 1) * self.epoch_tokens
        inside = int(self.block(e, slot)[1][r - int(starts[slot])])
        return e * self.epoch_tokens + int(before[slot]) + inside

    def count_mid2(self, y: int) -> int:
        """How many sequences have a doubled midpoint ``2 * before(j) + tokens(j) <= y``."""
        if y <= 0:
            return 0
        if self.constant is not None:
            return (y // self.constant + 1) // 2          # (2j + 1) t <= y
        # Doubled midpoints of epoch e lie strictly between 2 e E and 2 (e + 1) E.
        e, z = divmod(y, 2 * self.epoch_tokens)
        if self.blocked:
            # A block's doubled midpoints lie between twice its first and last prefix sums:
            # count the blocks that end by z / 2, then inside the next one (there is one: z < 2E).
            starts, before = self.blocks(e)
            slot = int(np.searchsorted(before[1:], z // 2, side="right"))
            inside = _count_in(self.block(e, slot)[1], z - 2 * int(before[slot]))
            return e * self.n + int(starts[slot]) + inside
        upto = min(self.n, int(z / (2 * self.mean_tokens) * 1.05) + 1024)
        while True:
            prefix = self.epoch(e, upto)[1]
            have = prefix.shape[0] - 1
            # Enough is read once the last sequence read ends beyond z / 2.
            if have == self.n or 2 * int(prefix[have]) > z:
                break
            upto = min(self.n, 2 * have)
        return e * self.n + _count_in(prefix, z)


class Node:
    """An inner node of the merge tree: children and their fractions of the node."""

    def __init__(self, children: list[Union["Node", Leaf]], h: Sequence[float]):
        self.children = children
        self.denominators = [2.0 * float(x) for x in h]   # key = doubled midpoint / (2 h)
        self.leaves = [c for ch in children for c in ch.leaves]
        self.max_tokens = max(ch.max_tokens for ch in children)
        # |tokens of a prefix - key of its last element| <= sum of the children's M / 2.
        self.spread = sum(ch.max_tokens for ch in children) / 2.0
        per_token = [float(x) / ch.mean_tokens for x, ch in zip(h, children)]
        self.mean_tokens = 1.0 / sum(per_token)
        # The share of the node's sequences each child supplies, on average.
        self.shares = [x * self.mean_tokens for x in per_token]


def _y_max(theta: float, denominator: float) -> int:
    """The largest integer y with ``y / denominator <= theta`` (-1 when none >= 0 is)."""
    if theta < 0:
        return -1
    y = math.floor(theta * denominator)
    while (y + 1) / denominator <= theta:
        y += 1
    while y >= 0 and y / denominator > theta:
        y -= 1
    return y


Part = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]   # sources, positions, tokens, ids


class BlendOrder:
    """The merge order of ``sources`` along ``tree`` with normalized ``fractions``."""

    def __init__(self, sources: Sequence[BlendSource], fractions: np.ndarray, tree: Tree,
                 seed: int):
        self.leaves = [Leaf(s, c, seed) for c, s in enumerate(sources)]
        self.k = len(self.leaves)
        self.fractions = np.asarray(fractions, dtype=np.float64)
        self.root = self._node(tree)
        # Sequences per token of root key, to aim the search for a slot.
        self.slope = float(sum(f / lf.mean_tokens for f, lf in zip(self.fractions, self.leaves)))

    def _node(self, tree: Tree) -> Union[Node, Leaf]:
        if isinstance(tree, int):
            return self.leaves[tree]
        g = np.array([sum(self.fractions[i] for i in tree_leaves(ch)) for ch in tree])
        return Node([self._node(ch) for ch in tree], g / g.sum())

    def tokens_at(self, node: Union[Node, Leaf], state: np.ndarray) -> int:
        return sum(self.leaves[c].before(int(state[c])) for c in node.leaves)

    # ------------------------------------------------------------------ local merge

    def advance(self, node: Union[Node, Leaf], state: np.ndarray, count: int) -> Part:
        """The next ``count`` elements of ``node``'s stream after ``state``: per element its
        source, its position in that source's stream, its tokens and its sample id (-1 where
        the source's ``lazy_ids``; see :meth:`fill_ids`)."""
        if isinstance(node, Leaf):
            j0 = int(state[node.c])
            tokens, ids = node.read(j0, count)
            return (np.full(count, node.c, dtype=np.int8),
                    j0 + np.arange(count, dtype=np.int64), tokens, ids)
        # Each child supplies at most ``count``; ask for its expected share with a margin and
        # ask again for more when all of it was used (the child's next element might belong).
        asked = [min(count, int(count * share * 1.25) + 16) for share in node.shares]
        bases = [2 * self.tokens_at(ch, state) for ch in node.children]
        while True:
            parts = [self.advance(ch, state, m) for ch, m in zip(node.children, asked)]
            keys = []
            for base, den, (_, _, tok, _) in zip(bases, node.denominators, parts):
                mid2 = np.cumsum(tok)
                mid2 *= 2
                mid2 -= tok
                mid2 += base
                keys.append(mid2.astype(np.float64) / den)
            order = np.argsort(np.concatenate(keys), kind="stable")[:count]
            used = np.bincount(np.searchsorted(np.cumsum(asked), order, side="right"),
                               minlength=len(asked))
            short = [i for i, m in enumerate(asked) if m < count and used[i] == m]
            if not short:
                break
            for i in short:
                asked[i] = min(count, 2 * asked[i])
        return tuple(np.concatenate([p[i] for p in parts])[order] for i in range(4))

    # ------------------------------------------------------------------ states by threshold

    def _state_mid2(self, node: Union[Node, Leaf], y: int, state: np.ndarray) -> None:
        """Set ``state`` for ``node``'s sources to the prefix of ``node``'s stream whose
        doubled midpoints are ``<= y``."""
        if isinstance(node, Leaf):
            state[node.c] = node.count_mid2(y)
            return
        state[node.leaves] = 0
        tokens = 0
        if y > 0:
            # Elements whose own key is below y/2 - spread end before y/2 (the node's bound).
            margin = node.spread + node.max_tokens + 1.0
            while y / 2 - margin >= 0:
                self._state_key(node, y / 2 - margin, state)
                tokens = self.tokens_at(node, state)
                if 2 * tokens <= y:     # the last element taken has a midpoint below y / 2
                    break
                # Only a wrong bound gets here; widen until the prefix is safely short.
                margin = 2 * abs(margin) + node.max_tokens
            else:
                state[node.leaves] = 0
                tokens = 0
        count = 16
        while True:
            labels, _, tok, _ = self.advance(node, state, count)
            mid2 = np.cumsum(tok)
            mid2 *= 2
            mid2 -= tok
            mid2 += 2 * tokens
            take = int(np.searchsorted(mid2, y, side="right"))
            if take < count:
                break
            count *= 4
        state += np.bincount(labels[:take], minlength=self.k)

    def _state_key(self, node: Node, theta: float, state: np.ndarray) -> None:
        """Set ``state`` for ``node``'s sources to every element with node key ``<= theta``."""
        for ch, den in zip(node.children, node.denominators):
            self._state_mid2(ch, _y_max(theta, den), state)

    def state_at(self, p: int) -> tuple[np.ndarray, int]:
        """A state of at most ``p`` slots, at most _LANDING_GAP before ``p``, and its size."""
        state = np.zeros(self.k, dtype=np.int64)
        if p == 0:
            return state, 0
        if isinstance(self.root, Leaf):
            state[self.root.c] = p
            return state, p
        aim = p - _LANDING_GAP // 2
        low = high = None
        theta = max(0.0, aim / self.slope)
        for _ in range(200):
            state[:] = 0
            self._state_key(self.root, theta, state)
            got = int(state.sum())
            if got <= p:
                if p - got <= _LANDING_GAP:
                    return state, got
                low = theta
            else:
                high = theta
            step = theta + (aim - got) / self.slope
            if low is not None and high is not None and not low < step < high:
                step = (low + high) / 2
            theta = max(0.0, step)
        raise RuntimeError(f"blend order: no state found for slot {p}; this is a bug")

    def run(self, p: int, count: int) -> tuple[np.ndarray, Part]:
        """The state after ``p`` slots and the ``count`` elements that follow."""
        state, got = self.state_at(p)
        part = self.advance(self.root, state, p - got + count)
        skip = p - got
        state += np.bincount(part[0][:skip], minlength=self.k)
        return state, tuple(x[skip:] for x in part)

    def fill_ids(self, part: Part) -> np.ndarray:
        """Sample ids of a part, computing those of constant-length sources."""
        labels, j, _, ids = part
        ids = ids.copy()
        # Exactly shuffled variable-length sources carry their ids already; the others get
        # them here, for the kept elements only.
        for c, leaf in enumerate(self.leaves):
            if leaf.lazy_ids:
                mask = labels == c
                if mask.any():
                    ids[mask] = leaf.ids(j[mask])
        return ids

    def source_tokens(self, state: np.ndarray) -> np.ndarray:
        """Tokens per source of the prefix ``state``."""
        return np.array([lf.before(int(state[c])) for c, lf in enumerate(self.leaves)],
                        dtype=np.int64)
