"""The exact token-ratio blend index.

A blend names sources and the fraction of training tokens each one supplies. The index decides,
for every sequence slot of every global batch, which source fills it and with which of that
source's sequences, such that at every global-batch boundary each source's token count is
within one sequence (``seq_length`` positions) of ``fraction * tokens so far``. The proof of that
bound is in docs/blend.md; every build also checks it exactly and raises if it does not hold.

What a "token" is here: the sequence positions a sequence's own source fills (a caption sequence
counts its image positions, separator, caption and EOS; padding counts for nobody). The caller
supplies that number per sequence (``BlendSource.tokens_per_sequence``), so the index does not
depend on how samples are laid out.

How the order is made (vectorized, no loop over slots): each source's sequences are drawn in
epochs, each epoch a fresh seeded permutation of the source. A sequence's "ideal time" is the
source's token count up to the middle of that sequence divided by the source's fraction; sources
are merged in order of ideal time along a small merge tree, the one with the smallest proved
error bound (for example ``(text, (caption, instruction))``). Merging is a stable argsort of
concatenated, already sorted runs. Positions per source at every batch end then come from one
count per batch, and the error bound is checked there.

    index = build_blend_index(
        [BlendSource("text", 25_000_000, 1024), BlendSource("caption", 3_000_000, caption_lengths)],
        {"text": 0.9, "caption": 0.1}, total_tokens=28 * 10**9, seq_length=1024,
        global_batch_size=256, seed=0, cache_dir="runs/blend-cache")
    source_ids, sample_ids = index.batch(step)
    print(index.summary()["max_abs_error_sequences"])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger("megatron_vlm.data.blend")

FORMAT_VERSION = 1
"""Bumped whenever the index produced for the same inputs changes; part of the cache key."""

FRACTION_SUM_TOLERANCE = 1e-6
"""How far the blend fractions may sum away from 1."""

_EXHAUSTIVE_TREE_SEARCH_MAX_SOURCES = 6
_TREES_TO_TRY = 4               # next-best merge trees tried if a 5+ source blend misses the bound
_SMALL_SOURCE_BLOCK = 1 << 20   # sources below 2**16 sequences draw epochs in blocks this large
_SMALL_SOURCE = 1 << 16
_FILES = ("source_ids", "sample_ids", "cumulative_tokens", "cumulative_sequences")

PerSequence = Union[int, np.ndarray]


def _per_sequence(value: Any, num_sequences: int, source: str, what: str, minimum: int,
                  maximum: Optional[int] = None) -> PerSequence:
    """``value`` as a constant int or a 1-D integer array of ``num_sequences`` entries."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = int(value)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise ValueError(f"blend source {source!r}: {what}={value} must be {bound}")
        return value
    arr = np.asarray(value)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"blend source {source!r}: {what} must be an int or a 1-D integer "
                         f"array, got {arr.dtype} with shape {arr.shape}")
    if arr.shape[0] != num_sequences:
        raise ValueError(f"blend source {source!r}: {what} has {arr.shape[0]} entries but the "
                         f"source has num_sequences={num_sequences}")
    low = int(arr.min())
    if low < minimum:
        at = int(np.argmax(arr < minimum))
        raise ValueError(f"blend source {source!r}: {what}[{at}]={int(arr[at])} must be "
                         f">= {minimum}")
    if maximum is not None:
        high = int(arr.max())
        if high > maximum:
            at = int(np.argmax(arr > maximum))
            raise ValueError(f"blend source {source!r}: {what}[{at}]={int(arr[at])} must be "
                             f"<= {maximum}")
    return arr


@dataclass(eq=False)
class BlendSource:
    """One source of a blend: its sequences and the positions each of them fills."""

    name: str
    """The source's name, as the blend's fractions refer to it."""
    num_sequences: int
    """How many sequences the source holds (one epoch)."""
    tokens_per_sequence: PerSequence
    """Positions each sequence fills for its own source (padding excluded): one int for every
    sequence, or an integer array with one entry per sequence. Each must be in [1, seq_length]."""
    loss_tokens: Optional[PerSequence] = None
    """Optional positions per sequence that carry loss; only totalled in the summary."""
    image_positions: Optional[PerSequence] = None
    """Optional image positions per sequence; only totalled in the summary."""
    max_tokens: int = field(init=False)
    """Largest ``tokens_per_sequence`` of the source."""
    epoch_tokens: int = field(init=False)
    """Tokens of one whole epoch of the source."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"blend source name must be a non-empty string, got {self.name!r}")
        n = self.num_sequences
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"blend source {self.name!r}: num_sequences={self.num_sequences!r} "
                             "must be an int >= 1")
        self.num_sequences = int(self.num_sequences)
        self.tokens_per_sequence = _per_sequence(self.tokens_per_sequence, self.num_sequences,
                                                 self.name, "tokens_per_sequence", 1)
        if self.loss_tokens is not None:
            self.loss_tokens = _per_sequence(self.loss_tokens, self.num_sequences, self.name,
                                             "loss_tokens", 0)
        if self.image_positions is not None:
            self.image_positions = _per_sequence(self.image_positions, self.num_sequences,
                                                 self.name, "image_positions", 0)
        tps = self.tokens_per_sequence
        if isinstance(tps, int):
            self.max_tokens = tps
            self.epoch_tokens = tps * self.num_sequences
        else:
            self.max_tokens = int(tps.max())
            self.epoch_tokens = int(tps.sum(dtype=np.int64))

    @property
    def mean_tokens(self) -> float:
        """Average positions per sequence over one epoch."""
        return self.epoch_tokens / self.num_sequences


# ----------------------------------------------------------------------------- validation


def normalized_fractions(sources: Sequence[BlendSource],
                         fractions: Mapping[str, float]) -> np.ndarray:
    """The fractions in source order, divided by their sum; a ValueError names every problem."""
    names = [s.name for s in sources]
    if not names:
        raise ValueError("a blend needs at least one source")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"blend source names must be unique; repeated: {', '.join(dups)}")
    unknown = [k for k in fractions if k not in names]
    if unknown:
        raise ValueError(f"blend fractions name unknown sources: {', '.join(map(str, unknown))} "
                         f"(sources: {', '.join(names)})")
    missing = [n for n in names if n not in fractions]
    if missing:
        raise ValueError(f"blend sources without a fraction: {', '.join(missing)}")
    values = []
    for n in names:
        try:
            v = float(fractions[n])
        except (TypeError, ValueError):
            raise ValueError(f"blend fraction {n}={fractions[n]!r} is not a number") from None
        values.append(v)
    listing = ", ".join(f"{n}={v!r}" for n, v in zip(names, values))
    bad = [f"{n}={v!r}" for n, v in zip(names, values) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"every blend fraction must be a finite number > 0: {', '.join(bad)}")
    total = math.fsum(values)
    if abs(total - 1.0) > FRACTION_SUM_TOLERANCE:
        raise ValueError(f"blend fractions must sum to 1 (within {FRACTION_SUM_TOLERANCE:g}) but "
                         f"sum to {total!r}: {listing}")
    return np.asarray(values, dtype=np.float64) / total


# ----------------------------------------------------------------------------- merge tree

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


def _leaves(tree: Tree) -> list[int]:
    return [tree] if isinstance(tree, int) else [x for ch in tree for x in _leaves(ch)]


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
        return float(sum(fractions[i] for i in _leaves(node)))

    def mtok(node: Tree) -> float:
        return float(max(max_tokens[i] for i in _leaves(node)))

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


# ----------------------------------------------------------------------------- sampling order


def _name_key(name: str) -> list[int]:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")]


def draw_epochs(num_sequences: int, count: int, seed: int, name: str,
                dtype: np.dtype = np.dtype(np.int32)) -> np.ndarray:
    """The first ``count`` sample ids of a source's endless order: epoch after epoch, each a
    fresh permutation of ``range(num_sequences)`` seeded by (seed, source name, epoch).

    The ids of a shorter draw are a prefix of a longer one's. Sources of at least 2**16
    sequences shuffle each epoch; smaller ones draw blocks of epochs at once (argsort of
    uniform keys per row), so a source repeated a million times stays vectorized."""
    n = num_sequences
    if n == 1:
        return np.zeros(count, dtype=dtype)
    key = _name_key(name)
    epochs = -(-count // n)
    if n >= _SMALL_SOURCE:
        if epochs == 1:
            perm = np.arange(n, dtype=dtype)
            np.random.default_rng([seed, *key, 0, 0]).shuffle(perm)
            return perm[:count]
        out = np.empty(count, dtype=dtype)
        for e in range(epochs):
            perm = np.arange(n, dtype=dtype)
            np.random.default_rng([seed, *key, 0, e]).shuffle(perm)
            start = e * n
            stop = min(count, start + n)
            out[start:stop] = perm[:stop - start]
        return out
    per_block = _SMALL_SOURCE_BLOCK // n
    out = np.empty(count, dtype=dtype)
    for b in range(-(-epochs // per_block)):
        rows = min(per_block, epochs - b * per_block)
        keys = np.random.default_rng([seed, *key, 1, b]).random((rows, n))
        perms = np.argsort(keys, axis=1).astype(dtype, copy=False).reshape(-1)
        start = b * per_block * n
        stop = min(count, start + rows * n)
        out[start:stop] = perms[:stop - start]
    return out


@dataclass(eq=False)
class _Stream:
    """A run of sequences in merge order: per element its source (or one leaf source), sample
    id and tokens (a constant or an array)."""

    n: int
    ids: np.ndarray
    tokens: PerSequence
    label: Optional[int] = None
    labels: Optional[np.ndarray] = None
    cum_tokens: Optional[np.ndarray] = None   # leaves with varying tokens: int64 [n + 1]


_CHUNK = 1 << 22


def _fill_keys(out: np.ndarray, tokens: PerSequence, h: float) -> None:
    """Ideal times of a stream: (tokens before the sequence + half of it) / fraction."""
    if isinstance(tokens, int):
        step = tokens / h
        for start in range(0, out.shape[0], _CHUNK):
            stop = min(out.shape[0], start + _CHUNK)
            np.multiply(np.arange(start, stop, dtype=np.float64) + 0.5, step, out=out[start:stop])
        return
    np.cumsum(tokens, dtype=np.float64, out=out)   # exact: integer sums stay below 2**53
    out *= 2.0
    np.subtract(out, tokens, out=out)
    np.divide(out, 2.0 * h, out=out)


def _merge(children: list[_Stream], h: Sequence[float], keep_tokens: bool) -> _Stream:
    total = sum(ch.n for ch in children)
    keys = np.empty(total, dtype=np.float64)
    pos = 0
    for ch, hc in zip(children, h):
        _fill_keys(keys[pos:pos + ch.n], ch.tokens, hc)
        pos += ch.n
    order = np.argsort(keys, kind="stable")
    del keys
    labels = np.empty(total, dtype=np.int8)
    pos = 0
    for ch in children:
        if ch.labels is None:
            labels[pos:pos + ch.n] = ch.label
        else:
            labels[pos:pos + ch.n] = ch.labels
        pos += ch.n
    labels = labels[order]
    ids = np.concatenate([ch.ids for ch in children])
    for ch in children:
        ch.ids = None  # type: ignore[assignment]
    ids = ids[order]
    tokens: PerSequence = 0
    if keep_tokens:
        dtype = np.result_type(*[np.min_scalar_type(ch.tokens) if isinstance(ch.tokens, int)
                                 else ch.tokens.dtype for ch in children])
        cat = np.empty(total, dtype=dtype)
        pos = 0
        for ch in children:
            cat[pos:pos + ch.n] = ch.tokens
            pos += ch.n
        tokens = cat[order]
    return _Stream(n=total, ids=ids, tokens=tokens, labels=labels)


# ----------------------------------------------------------------------------- the index


class BlendIndex:
    """Which source and which of its sequences fills every slot of every global batch.

    ``source_ids[s]`` (int8) is the source of slot ``s`` (an index into ``source_names``),
    ``sample_ids[s]`` the sequence of that source; slot ``s`` belongs to global batch
    ``s // global_batch_size``. ``cumulative_tokens[b, c]`` / ``cumulative_sequences[b, c]`` are
    source ``c``'s tokens / sequences in the first ``b`` global batches."""

    def __init__(self, source_names: Sequence[str], source_ids: np.ndarray, sample_ids: np.ndarray,
                 cumulative_tokens: np.ndarray, cumulative_sequences: np.ndarray,
                 seq_length: int, global_batch_size: int, summary: dict[str, Any],
                 cache_path: Optional[str] = None):
        self.source_names = tuple(source_names)
        self.source_ids = source_ids
        self.sample_ids = sample_ids
        self.cumulative_tokens = cumulative_tokens
        self.cumulative_sequences = cumulative_sequences
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.cache_path = cache_path
        self._summary = summary

    @property
    def num_sequences(self) -> int:
        return int(self.source_ids.shape[0])

    @property
    def num_batches(self) -> int:
        return self.num_sequences // self.global_batch_size

    def __len__(self) -> int:
        return self.num_sequences

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, sample ids) of global batch ``i``, ``global_batch_size`` of each."""
        if not 0 <= i < self.num_batches:
            raise IndexError(f"global batch {i} is outside the blend index's {self.num_batches} "
                             "batches")
        b = self.global_batch_size
        return self.source_ids[i * b:(i + 1) * b], self.sample_ids[i * b:(i + 1) * b]

    def summary(self) -> dict[str, Any]:
        """Per source and overall figures (see docs/blend.md for every key)."""
        return json.loads(json.dumps(self._summary))

    def __repr__(self) -> str:
        return (f"BlendIndex({', '.join(self.source_names)}: {self.num_sequences} sequences, "
                f"{self.num_batches} batches of {self.global_batch_size})")


def _total(per_seq: Optional[PerSequence], ids: np.ndarray) -> int:
    if per_seq is None:
        return 0
    if isinstance(per_seq, int):
        return per_seq * int(ids.shape[0])
    return int(per_seq[ids].sum(dtype=np.int64))


def _array_digest(value: Optional[PerSequence]) -> Any:
    if value is None or isinstance(value, int):
        return value
    arr = np.ascontiguousarray(value)
    h = hashlib.sha256()
    h.update(str(arr.dtype.newbyteorder("<")).encode())
    h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).data)
    return f"sha256:{h.hexdigest()}"


def cache_key(sources: Sequence[BlendSource], fractions: np.ndarray, total_tokens: Optional[int],
              num_batches: Optional[int], seq_length: int, global_batch_size: int,
              seed: int) -> dict[str, Any]:
    """Everything the index depends on, as a JSON-able dict (its hash names the cache)."""
    return {
        "format_version": FORMAT_VERSION,
        "sources": [{"name": s.name, "num_sequences": s.num_sequences,
                     "tokens_per_sequence": _array_digest(s.tokens_per_sequence),
                     "loss_tokens": _array_digest(s.loss_tokens),
                     "image_positions": _array_digest(s.image_positions)} for s in sources],
        "fractions": [repr(float(f)) for f in fractions],
        "total_tokens": total_tokens, "num_batches": num_batches, "seq_length": seq_length,
        "global_batch_size": global_batch_size, "seed": seed,
    }


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _crc32(path: Path) -> int:
    crc = 0
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
    return crc


def _save(index: BlendIndex, key: dict[str, Any], final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        files = {}
        for name in _FILES:
            path = tmp / f"{name}.npy"
            with open(path, "wb") as f:
                np.save(f, np.ascontiguousarray(getattr(index, name)))
                f.flush()
                os.fsync(f.fileno())
            files[name] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
        manifest = {"key": key, "key_hash": final.name, "files": files,
                    "source_names": list(index.source_names), "seq_length": index.seq_length,
                    "global_batch_size": index.global_batch_size, "summary": index._summary}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if final.exists():
            # Another process may have finished the same index meanwhile: keep a sound copy.
            if load_cached_index(final, key, quiet=True) is not None:
                return
            shutil.rmtree(final, ignore_errors=True)   # a corrupt earlier copy
        try:
            os.replace(tmp, final)
        except OSError:
            if load_cached_index(final, key, quiet=True) is None:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_cached_index(path: Union[str, Path], key: Optional[dict[str, Any]] = None,
                      verify: bool = True, quiet: bool = False) -> Optional[BlendIndex]:
    """The index cached at ``path`` (arrays memory-mapped), or None when it is missing,
    incomplete, corrupt (sizes or CRC32 checksums differ) or made for other inputs."""
    path = Path(path)
    warn = (lambda *a: None) if quiet else logger.warning
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        if path.exists():
            warn("blend index cache %s has no manifest; rebuilding", path)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if key is not None and manifest["key"] != json.loads(json.dumps(key)):
            warn("blend index cache %s was made for other inputs; rebuilding", path)
            return None
        arrays = {}
        for name in _FILES:
            fpath = path / f"{name}.npy"
            meta = manifest["files"][name]
            if fpath.stat().st_size != meta["bytes"]:
                raise ValueError(f"{fpath.name} has {fpath.stat().st_size} bytes, expected "
                                 f"{meta['bytes']}")
            if verify and _crc32(fpath) != meta["crc32"]:
                raise ValueError(f"{fpath.name} fails its CRC32 checksum")
            arrays[name] = np.load(fpath, mmap_mode="r")
        summary = manifest["summary"]
        n, nb = summary["num_sequences"], summary["num_batches"]
        k = len(manifest["source_names"])
        if (arrays["source_ids"].shape != (n,) or arrays["sample_ids"].shape != (n,)
                or arrays["cumulative_tokens"].shape != (nb + 1, k)
                or arrays["cumulative_sequences"].shape != (nb + 1, k)):
            raise ValueError("array shapes disagree with the manifest")
    except (OSError, ValueError, KeyError, TypeError) as err:
        warn("blend index cache %s is unreadable (%s); rebuilding", path, err)
        return None
    summary = dict(summary, from_cache=True, cache_path=str(path))
    return BlendIndex(manifest["source_names"], arrays["source_ids"], arrays["sample_ids"],
                      arrays["cumulative_tokens"], arrays["cumulative_sequences"],
                      manifest["seq_length"], manifest["global_batch_size"], summary,
                      cache_path=str(path))


def _check_int(value: Any, what: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what}={value!r} must be an int >= {minimum}")
    return int(value)


def build_blend_index(sources: Sequence[BlendSource], fractions: Mapping[str, float],
                      total_tokens: Optional[int], seq_length: int, global_batch_size: int,
                      seed: int = 0, cache_dir: Union[str, Path, None] = None, *,
                      num_batches: Optional[int] = None, progress: bool = False,
                      verify_cache: bool = True) -> BlendIndex:
    """Build (or load from ``cache_dir``) the blend index.

    ``total_tokens`` is the token budget: the index holds the fewest whole global batches whose
    tokens (summed over sources, padding excluded) reach it. Give ``num_batches`` instead (with
    ``total_tokens=None``) for an index of exactly that many global batches. A cached index is
    found under ``cache_dir/blend-<hash of every input>`` and memory-mapped; a missing or corrupt
    one is built and written atomically."""
    start = time.perf_counter()
    sources = list(sources)
    seq_length = _check_int(seq_length, "seq_length", 1)
    global_batch_size = _check_int(global_batch_size, "global_batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    if (total_tokens is None) == (num_batches is None):
        raise ValueError("give exactly one of total_tokens and num_batches")
    if total_tokens is not None:
        if isinstance(total_tokens, float) and total_tokens.is_integer():
            total_tokens = int(total_tokens)   # 28e9
        total_tokens = _check_int(total_tokens, "total_tokens", 1)
    if num_batches is not None:
        num_batches = _check_int(num_batches, "num_batches", 1)
    for s in sources:
        if not isinstance(s, BlendSource):
            raise ValueError(f"blend sources must be BlendSource objects, got {type(s).__name__}")
    f = normalized_fractions(sources, fractions)
    for s in sources:
        if s.max_tokens > seq_length:
            raise ValueError(f"blend source {s.name!r}: a sequence fills {s.max_tokens} "
                             f"positions, more than seq_length={seq_length}")
    if len(sources) > 127:
        raise ValueError(f"a blend holds at most 127 sources, got {len(sources)}")

    key = final = None
    if cache_dir is not None:
        key = cache_key(sources, f, total_tokens, num_batches, seq_length, global_batch_size, seed)
        final = Path(cache_dir) / f"blend-{_key_hash(key)}"
        cached = load_cached_index(final, key, verify=verify_cache)
        if cached is not None:
            cached._summary["load_seconds"] = round(time.perf_counter() - start, 4)
            logger.info("blend index loaded from %s", final)
            return cached

    index = _build(sources, f, total_tokens, num_batches, seq_length, global_batch_size, seed,
                   progress, start)
    if final is not None:
        t0 = time.perf_counter()
        index._summary["cache_path"] = str(final)
        _save(index, key, final)
        index.cache_path = str(final)
        index._summary["cache_write_seconds"] = round(time.perf_counter() - t0, 4)
    return index


def _build(sources: list[BlendSource], f: np.ndarray, total_tokens: Optional[int],
           num_batches: Optional[int], seq_length: int, global_batch_size: int, seed: int,
           progress: bool, start: float) -> BlendIndex:
    from tqdm import tqdm

    k, B, L = len(sources), global_batch_size, seq_length
    names = [s.name for s in sources]
    candidates = choose_merge_trees(f, [s.max_tokens for s in sources], count=_TREES_TO_TRY)
    bar = tqdm(total=k + 2, desc="blend index", unit="step", disable=not progress, leave=False)
    failures = []
    for tree, bounds in candidates:
        bar.reset()
        order = _ordered(sources, f, tree, bounds, total_tokens, num_batches, B, seed, bar)
        root, cum_seq, cum_tok, seen, nb = order
        # The guarantee, checked exactly at every global-batch boundary.
        err = np.abs(cum_tok - seen[:, None].astype(np.float64) * f[None, :])
        max_err = err.max(axis=0)
        worst_batch = err.argmax(axis=0)
        tol = 1e-3 + 1e-12 * float(seen[-1])
        for c in range(k):
            if max_err[c] > bounds[c] + tol:
                raise RuntimeError(
                    f"blend index check failed: source {names[c]!r} is {max_err[c]:.3f} tokens off "
                    f"its target after {int(worst_batch[c])} global batches, beyond the proved "
                    f"bound {bounds[c]:.3f}; this is a bug")
        c = int(max_err.argmax())
        if max_err[c] <= L + tol:
            break
        # Only possible with five or more sources, whose proved bound can exceed a sequence.
        failures.append(f"merge tree {format_tree(tree, names)}: source {names[c]!r} "
                        f"{max_err[c]:.1f} tokens off after {int(worst_batch[c])} global batches")
        del root, order
    else:
        raise ValueError(f"blend cannot keep every source within one sequence ({L} positions) of "
                         f"its target at every global-batch boundary; tried " + "; ".join(failures)
                         + ". Group small sources into one, or change the fractions.")
    bar.update(1)
    bar.close()
    build_seconds = time.perf_counter() - start
    n_seq = nb * B
    source_ids = root.labels[:n_seq]
    sample_ids = root.ids[:n_seq]

    total_seen = int(seen[-1])
    per_source = []
    for c, s in enumerate(sources):
        drawn = int(cum_seq[-1, c])
        toks = int(cum_tok[-1, c])
        need_ids = any(isinstance(v, np.ndarray) for v in (s.loss_tokens, s.image_positions))
        ids_c = sample_ids[source_ids == c] if need_ids else np.empty(drawn, dtype=np.int8)
        per_source.append({
            "name": s.name,
            "target_fraction": float(f[c]),
            "achieved_fraction": toks / total_seen if total_seen else 0.0,
            "source_sequences": s.num_sequences,
            "sequences": drawn,
            "tokens": toks,
            "mean_tokens_per_sequence": toks / drawn if drawn else 0.0,
            "loss_tokens": _total(s.loss_tokens, ids_c),
            "image_positions": _total(s.image_positions, ids_c),
            "epochs": drawn / s.num_sequences,
            "whole_epochs": drawn // s.num_sequences,
            "max_abs_error_tokens": float(max_err[c]),
            "max_abs_error_sequences": float(max_err[c]) / L,
            "max_abs_error_own_sequences": float(max_err[c]) / s.mean_tokens,
            "worst_batch": int(worst_batch[c]),
            "error_bound_tokens": float(bounds[c]),
        })
    summary = {
        "format_version": FORMAT_VERSION,
        "sources": per_source,
        "num_sequences": n_seq,
        "num_batches": nb,
        "global_batch_size": B,
        "seq_length": L,
        "seed": seed,
        "token_budget": total_tokens,
        "total_tokens": total_seen,
        "padding_positions": n_seq * L - total_seen,
        "max_abs_error_tokens": float(max_err.max()),
        "max_abs_error_sequences": float(max_err.max()) / L,
        "error_bound_sequences": float(bounds.max()) / L,
        "merge_tree": format_tree(tree, names),
        "build_seconds": round(build_seconds, 4),
        "from_cache": False,
        "cache_path": None,
    }
    logger.info("blend index: %d sequences in %d global batches, largest error %.4f sequences, "
                "built in %.2f s", n_seq, nb, summary["max_abs_error_sequences"], build_seconds)
    return BlendIndex(names, source_ids, sample_ids, cum_tok, cum_seq, L, B, summary)


def _ordered(sources: list[BlendSource], f: np.ndarray, tree: Tree, bounds: np.ndarray,
             total_tokens: Optional[int], num_batches: Optional[int], B: int, seed: int, bar):
    """Draw, merge along ``tree`` and count per global batch: (merged stream, sequences and
    tokens per source after each batch [nb + 1, k], total tokens [nb + 1], nb)."""
    k = len(sources)
    m_max = max(s.max_tokens for s in sources)
    largest = max(s.num_sequences for s in sources)
    id_dtype = np.dtype(np.int32) if largest < 2**31 else np.dtype(np.int64)
    # Tokens the blend will reach: the budget (or an estimate for a number of batches).
    if total_tokens is not None:
        target = float(total_tokens)
    else:
        per_seq = 1.0 / float(sum(fc / s.mean_tokens for fc, s in zip(f, sources)))
        target = num_batches * B * per_seq * 1.02
    margin = float((B + 4) * m_max)
    for attempt in range(8):
        leaves: list[_Stream] = []
        for c, s in enumerate(sources):
            bar.set_postfix_str(f"drawing {s.name}")
            need = f[c] * (target + margin) + 2 * m_max + float(bounds[c])
            leaves.append(_leaf_stream(s, c, need, seed, id_dtype))
            bar.update(1)
        lengths = [lf.n for lf in leaves]
        cum_leaf = [lf.cum_tokens for lf in leaves]
        bar.set_postfix_str("merging")
        root = _merge_tree(tree, leaves, f)
        del leaves
        bar.update(1)
        bar.set_postfix_str("checking")
        nb_max = root.n // B
        lab = root.labels[:nb_max * B].reshape(nb_max, B)
        cum_seq = np.zeros((nb_max + 1, k), dtype=np.int64)
        for c in range(k):
            np.cumsum(np.count_nonzero(lab == c, axis=1), out=cum_seq[1:, c])
        del lab
        cum_tok = np.empty_like(cum_seq)
        for c, s in enumerate(sources):
            if isinstance(s.tokens_per_sequence, int):
                np.multiply(cum_seq[:, c], s.tokens_per_sequence, out=cum_tok[:, c])
            else:
                cum_tok[:, c] = cum_leaf[c][cum_seq[:, c]]
        seen = cum_tok.sum(axis=1)
        nb = int(np.searchsorted(seen, total_tokens, side="left")) if total_tokens is not None \
            else num_batches
        # The order is exact while no source has used up the sequences drawn for it.
        if nb <= nb_max and all(cum_seq[nb, c] < lengths[c] for c in range(k)):
            return (root, np.ascontiguousarray(cum_seq[:nb + 1]),
                    np.ascontiguousarray(cum_tok[:nb + 1]), seen[:nb + 1], nb)
        target *= 1.5
        margin *= 2
        bar.reset()
        logger.info("blend index: drew too few sequences; drawing more (attempt %d)", attempt + 2)
    raise RuntimeError("blend index: could not draw enough sequences")  # pragma: no cover


def _leaf_stream(s: BlendSource, c: int, need_tokens: float, seed: int,
                 id_dtype: np.dtype) -> _Stream:
    """Source ``c``'s sequences in drawing order until they hold at least ``need_tokens``."""
    tps = s.tokens_per_sequence
    if isinstance(tps, int):
        count = int(need_tokens // tps) + 2
        ids = draw_epochs(s.num_sequences, count, seed, s.name, id_dtype)
        return _Stream(n=count, ids=ids, tokens=tps, label=c)
    if tps.dtype.itemsize > 2 and s.max_tokens < 2**16:
        tps = tps.astype(np.uint16)
    epochs = int(need_tokens // s.epoch_tokens) + 1
    count = epochs * s.num_sequences
    while True:
        ids = draw_epochs(s.num_sequences, count, seed, s.name, id_dtype)
        tokens = tps[ids]
        cum = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(tokens, out=cum[1:])
        if cum[-1] >= need_tokens + s.max_tokens:
            break
        count += s.num_sequences
    keep = int(np.searchsorted(cum, need_tokens, side="left")) + 1
    keep = min(keep, count)
    return _Stream(n=keep, ids=ids[:keep], tokens=tokens[:keep], label=c,
                   cum_tokens=cum[:keep + 1])


def _merge_tree(tree: Tree, leaves: list[_Stream], f: np.ndarray,
                keep_tokens: bool = False) -> _Stream:
    """Merge the leaves along ``tree``; inner nodes keep per-element tokens for their parent."""
    if isinstance(tree, int):   # a blend of one source
        leaf = leaves[tree]
        return _Stream(n=leaf.n, ids=leaf.ids, tokens=leaf.tokens,
                       labels=np.full(leaf.n, tree, dtype=np.int8))
    streams = [leaves[ch] if isinstance(ch, int) else _merge_tree(ch, leaves, f, keep_tokens=True)
               for ch in tree]
    g = np.array([sum(f[i] for i in _leaves(ch)) for ch in tree])
    return _merge(streams, g / g.sum(), keep_tokens)


# ----------------------------------------------------------------------------- real shards

SHARD_KINDS = ("text", "caption", "instruction")


def source_from_shards(name: str, kind: str, path: Union[str, Sequence[str]], seq_length: int, *,
                       n_img: Optional[int] = None, eos_id: Optional[int] = None,
                       count_padding: bool = False, progress: bool = False,
                       rows: Optional[np.ndarray] = None) -> BlendSource:
    """A :class:`BlendSource` for shards on disk, counting what each sequence fills.

    * ``text``: megatron-core IndexedDataset prefix(es) (several joined with commas); one
      sequence per packed window, ``(tokens - 1) // seq_length`` windows, each filling and
      training all ``seq_length`` positions.
    * ``caption``: an image-embedding or image-shard directory; one sequence per record:
      ``[image x n_img][SEP][caption][EOS]`` (caption cut to fit), loss on the separator and
      the caption. ``eos_id`` given: a caption stored with a trailing EOS is not counted twice.
      Embedding shards know their ``n_img``; image shards need it given (the encoder's).
    * ``instruction``: an instruction directory; one sequence per conversation:
      ``[image x n_img if it has one][conversation][EOS]`` cut at ``seq_length``, loss on the
      targets of its loss mask (``n_img`` is then required when any conversation has an image).

    Padding counts for nobody unless ``count_padding``, which makes every sequence count all
    ``seq_length`` positions for its source. ``rows`` (instruction shards) restricts the source
    to those records, in that order (e.g. leaving out conversations whose image is missing)."""
    from tqdm import tqdm

    from megatron_vlm.data.image_shards import ImageDataset, open_image_store
    from megatron_vlm.data.instruction_shards import InstructionDataset
    from megatron_vlm.data.text_shards import open_text_dataset

    L = int(seq_length)
    if kind == "text":
        prefixes = [path] if isinstance(path, str) else list(path)
        prefixes = [p for item in prefixes for p in str(item).split(",") if p]
        total = 0
        for prefix in prefixes:
            ds = open_text_dataset(prefix)
            total += int(np.asarray(ds.sequence_lengths, dtype=np.int64).sum())
        windows = max(0, (total - 1) // L)
        if windows < 1:
            raise ValueError(f"text source {name!r} ({', '.join(prefixes)}): {total} tokens make "
                             f"no window of seq_length={L} + 1 tokens")
        return BlendSource(name, windows, L, loss_tokens=L, image_positions=0)
    if kind == "caption":
        ds = open_image_store(str(path))
        if len(ds) == 0:
            raise ValueError(f"caption source {name!r} ({path}) holds no records")
        if isinstance(ds, ImageDataset):
            if n_img is None:
                raise ValueError(f"caption source {name!r} ({path}) holds images: give n_img "
                                 "(the image positions the encoder makes of each image)")
            n = int(n_img)
        else:
            n = ds.n_img
        if n + 2 > L:
            raise ValueError(f"caption source {name!r}: n_img={n} + separator + EOS exceed "
                             f"seq_length={L}")
        lengths = np.asarray(ds.caption_lengths(), dtype=np.int64)
        if eos_id is not None:
            ends_eos = np.fromiter(
                (lengths[i] > 0 and int(ds.caption_tokens(i)[-1]) == eos_id
                 for i in tqdm(range(len(ds)), desc=f"{name}: captions", disable=not progress)),
                dtype=bool, count=len(ds))
            lengths = lengths - ends_eos
        caption = np.minimum(lengths, L - n - 2)
        positions = (np.full(len(ds), L, dtype=np.int32) if count_padding
                     else (n + 2 + caption).astype(np.int32))
        return BlendSource(name, len(ds), positions, loss_tokens=(1 + caption).astype(np.int32),
                           image_positions=n)
    if kind == "instruction":
        ds = InstructionDataset(str(path))
        count = len(ds)
        if count == 0:
            raise ValueError(f"instruction source {name!r} ({path}) holds no records")
        lengths = np.asarray(ds.lengths(), dtype=np.int64)
        images = np.zeros(count, dtype=np.int32)
        loss = np.zeros(count, dtype=np.int32)
        for i in tqdm(range(count), desc=f"{name}: conversations", disable=not progress):
            c = int(lengths[i])
            n = 0
            if ds.image_key(i) is not None:
                if n_img is None:
                    raise ValueError(f"instruction source {name!r}: record {ds.key(i)!r} has an "
                                     "image; give n_img (the image positions per image)")
                n = int(n_img)
            images[i] = n
            full = n + c + 1
            if full <= L:     # every target of turns 1.. plus the final EOS
                loss[i] = int(ds.loss_mask(i)[1:].sum()) + 1
            else:             # cut at L: targets up to conversation token L - n (EOS if L - n == c)
                loss[i] = int(ds.loss_mask(i)[1:max(1, min(c, L - n + 1))].sum()) + (L - n == c)
        positions = np.minimum(images.astype(np.int64) + lengths + 1, L).astype(np.int32)
        if count_padding:
            positions = np.full(count, L, dtype=np.int32)
        if int(images.max()) >= L:
            raise ValueError(f"instruction source {name!r}: n_img={int(images.max())} leaves no "
                             f"room in seq_length={L}")
        if rows is not None:
            positions, loss, images = positions[rows], loss[rows], images[rows]
            count = len(rows)
        return BlendSource(name, count, positions, loss_tokens=loss, image_positions=images)
    raise ValueError(f"source {name!r}: kind {kind!r} is not one of {', '.join(SHARD_KINDS)}")
