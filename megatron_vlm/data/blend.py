"""The exact token-ratio blend index.

A blend names sources and the fraction of training tokens each one supplies. The index decides,
for every sequence slot of every global batch, which source fills it and with which of that
source's sequences, such that at every global-batch boundary each source's token count is
within one sequence (``seq_length`` positions) of ``fraction * tokens so far``. The proof of that
bound is in docs/blend.md.

What a "token" is here: the sequence positions a sequence's own source fills (a caption sequence
counts its image positions, separator, caption and EOS; padding counts for nobody). The caller
supplies that number per sequence (``BlendSource.tokens_per_sequence``), so the index does not
depend on how samples are laid out.

The index is a function, not an array: each source's sequences are drawn epoch after epoch, each
epoch a keyed pseudorandom permutation computed on demand (permutation.py); sources are merged
by ideal time along the merge tree with the smallest proved error bound (blend_trees.py); and
the position of every source after any number of slots is found by a search on ideal time plus a
short local merge (blend_order.py). ``index.batch(i)`` costs O(global batch size) for any ``i``;
only variable-length sources hold arrays, one epoch's prefix sums at a time, sized by the source.

Checks: every global-batch boundary of a run of up to 2**22 sequences (or of a merge tree whose
bound is not proved below one sequence) is checked exactly when the index is built; a larger run
checks its last 64 boundaries when built and every boundary when its batch is fetched
(``batch(i)`` checks the boundary after batch ``i``), and ``verify()`` checks them all. Every
check compares with the proved bound and raises if it is exceeded.

    index = build_blend_index(
        [BlendSource("text", 25_000_000, 1024), BlendSource("caption", 3_000_000, caption_lengths)],
        {"text": 0.9, "caption": 0.1}, total_tokens=28 * 10**9, seq_length=1024,
        global_batch_size=256, seed=0, cache_dir="runs/blend-cache")
    source_ids, sample_ids = index.batch(step)
    print(index.summary()["max_abs_error_sequences"])
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from megatron_vlm.data.blend_cache import cache_key, cache_path_for, read_cache, save_index
from megatron_vlm.data.blend_order import BlendOrder, source_permutation
from megatron_vlm.data.blend_sources import (FRACTION_SUM_TOLERANCE, SHARD_KINDS, BlendSource,
                                             PerSequence, normalized_fractions,
                                             source_from_shards)
from megatron_vlm.data.blend_trees import (Tree, choose_merge_tree, choose_merge_trees,
                                           format_tree, tree_error_bounds)
from megatron_vlm.data.permutation import endless_order

__all__ = ["BlendIndex", "BlendSource", "FORMAT_VERSION", "FRACTION_SUM_TOLERANCE", "SHARD_KINDS",
           "build_blend_index", "cache_key", "choose_merge_tree", "choose_merge_trees",
           "draw_epochs", "format_tree", "load_cached_index", "normalized_fractions",
           "source_from_shards", "tree_error_bounds"]

logger = logging.getLogger("megatron_vlm.data.blend")

FORMAT_VERSION = 3
"""Bumped whenever the index produced for the same inputs changes; part of the cache key."""

_TREES_TO_TRY = 4              # next-best merge trees tried if a 5+ source blend misses the bound
_CHECK_ALL_MAX_SEQUENCES = 1 << 22   # runs up to this size check every boundary when built
_CHECK_LAST_BATCHES = 64       # larger runs check this many final boundaries when built
_SWEEP_CHUNK = 1 << 20         # sequences merged at once when sweeping the whole order
_MATERIALIZE_MAX = 1 << 28     # most sequences the whole-run arrays may hold


def draw_epochs(num_sequences: int, count: int, seed: int, name: str,
                dtype: np.dtype = np.dtype(np.int32), *, variable: bool = False) -> np.ndarray:
    """The first ``count`` sample ids of a source's endless order: epoch after epoch, each a
    keyed permutation of ``range(num_sequences)`` seeded by (seed, source name, epoch); a large
    source of ``variable`` lengths is shuffled in blocks (docs/blend.md). The ids of a shorter
    draw are a prefix of a longer one's."""
    perm = source_permutation(num_sequences, seed, name, variable)
    return endless_order(perm, np.arange(count, dtype=np.int64)).astype(dtype)


def _tolerance(total: float) -> float:
    return 1e-3 + 1e-12 * float(total)


class BlendIndex:
    """Which source and which of its sequences fills every slot of every global batch.

    ``batch(i)`` gives global batch ``i``: (source ids into ``source_names``, int8; sample ids of
    those sources) for its ``global_batch_size`` slots; slot ``s`` of the run belongs to global
    batch ``s // global_batch_size``. For small runs the whole order is also available as arrays
    (computed on first use): ``source_ids``, ``sample_ids`` [num_sequences] and
    ``cumulative_tokens`` / ``cumulative_sequences`` [num_batches + 1, sources]."""

    def __init__(self, sources: Sequence[BlendSource], fractions: np.ndarray, tree: Tree,
                 bounds: np.ndarray, seq_length: int, global_batch_size: int, seed: int,
                 num_batches: int, summary: dict[str, Any], cache_path: Optional[str] = None):
        self.source_names = tuple(s.name for s in sources)
        self.fractions = np.asarray(fractions, dtype=np.float64)
        self.tree = tree
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.order = BlendOrder(sources, self.fractions, tree, seed)
        self._num_batches = num_batches
        self.id_dtype = np.dtype(np.int32) if max(s.num_sequences for s in sources) < 2**31 \
            else np.dtype(np.int64)
        self.cache_path = cache_path
        self._summary = summary
        self._next: Optional[tuple[int, np.ndarray]] = None   # (batch, its start state)
        # The batch last fetched, (i, source ids, sample ids): each micro-batch of a step, and
        # the loader's token ledger, ask for the same global batch again.
        self._last: Optional[tuple[int, np.ndarray, np.ndarray]] = None
        self._arrays: Optional[dict[str, np.ndarray]] = None

    @property
    def num_batches(self) -> int:
        return self._num_batches

    @property
    def num_sequences(self) -> int:
        return self._num_batches * self.global_batch_size

    def __len__(self) -> int:
        return self.num_sequences

    def check_boundary(self, state: np.ndarray, after_batches: int) -> np.ndarray:
        """Per-source |tokens - fraction * all tokens| at a prefix (``state``); raises if any
        exceeds its proved bound."""
        tokens = self.order.source_tokens(state)
        total = int(tokens.sum())
        err = np.abs(tokens - total * self.fractions)
        bad = np.flatnonzero(err > self.bounds + _tolerance(total))
        if bad.shape[0]:
            c = int(bad[0])
            raise RuntimeError(
                f"blend index check failed: source {self.source_names[c]!r} is {err[c]:.3f} "
                f"tokens off its target after {after_batches} global batches, beyond the proved "
                f"bound {self.bounds[c]:.3f}; this is a bug")
        return err

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(source ids, sample ids) of global batch ``i``, ``global_batch_size`` of each; the
        boundary after it is checked against the proved bound."""
        if not 0 <= i < self._num_batches:
            raise IndexError(f"global batch {i} is outside the blend index's {self._num_batches} "
                             "batches")
        if self._last is not None and self._last[0] == i:   # checked when first fetched
            return self._last[1].copy(), self._last[2].copy()
        B = self.global_batch_size
        cached = self._next
        if cached is not None and cached[0] == i:     # reading in order: no search
            state = cached[1].copy()
            part = self.order.advance(self.order.root, state, B)
        else:
            state, part = self.order.run(i * B, B)
        labels = part[0]
        state += np.bincount(labels, minlength=self.order.k)
        self.check_boundary(state, i + 1)
        self._next = (i + 1, state)
        ids = self.order.fill_ids(part).astype(self.id_dtype)
        self._last = (i, labels.copy(), ids.copy())
        return labels, ids

    def sweep(self, start: int = 0, stop: Optional[int] = None,
              ids: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, Optional[tuple]]]:
        """Global batches ``start .. stop - 1`` in chunks: per chunk the sequences and tokens per
        source after each of its batches ([batches, sources] each) and, with ``ids``, the
        chunk's (source ids, sample ids)."""
        stop = self._num_batches if stop is None else stop
        B, order = self.global_batch_size, self.order
        state = order.run(start * B, 0)[0]
        tokens = order.source_tokens(state)
        per_chunk = max(1, _SWEEP_CHUNK // B)
        for b in range(start, stop, per_chunk):
            nbc = min(per_chunk, stop - b)
            part = order.advance(order.root, state, nbc * B)
            labels = part[0].reshape(nbc, B)
            tok = part[2].reshape(nbc, B)
            counts = np.empty((nbc, order.k), dtype=np.int64)
            sums = np.empty((nbc, order.k), dtype=np.int64)
            for c in range(order.k):
                mask = labels == c
                counts[:, c] = np.count_nonzero(mask, axis=1)
                sums[:, c] = np.where(mask, tok, 0).sum(axis=1)
            cum_seq = state + np.cumsum(counts, axis=0)
            cum_tok = tokens + np.cumsum(sums, axis=0)
            state, tokens = cum_seq[-1].copy(), cum_tok[-1].copy()
            yield cum_seq, cum_tok, ((part[0], order.fill_ids(part)) if ids else None)
        if not np.array_equal(tokens, order.source_tokens(state)):
            raise RuntimeError("blend index: swept tokens disagree with the sources' prefix sums; "
                               "this is a bug")

    def verify(self, start: int = 0, stop: Optional[int] = None,
               progress: bool = False) -> dict[str, Any]:
        """Check every global-batch boundary after batches ``start + 1 .. stop`` (default: all)
        exactly: per source the largest deviation in tokens and after how many batches it
        occurs. Raises RuntimeError beyond the proved bound."""
        stop = self._num_batches if stop is None else stop
        k = self.order.k
        max_err = np.zeros(k)
        worst = np.zeros(k, dtype=np.int64)
        b = start
        from megatron_vlm.progress import Progress

        bar = Progress(stop - start, "blend index: checking", "batch", enabled=progress,
                       leave=False)
        for _, cum_tok, _ in self.sweep(start, stop):
            seen = cum_tok.sum(axis=1)
            err = np.abs(cum_tok - seen[:, None] * self.fractions[None, :])
            at = err.argmax(axis=0)
            for c in range(k):
                if err[at[c], c] > max_err[c]:
                    max_err[c], worst[c] = err[at[c], c], b + 1 + at[c]
            over = err > self.bounds[None, :] + _tolerance(seen[-1])
            if over.any():
                row, c = np.argwhere(over)[0]
                raise RuntimeError(
                    f"blend index check failed: source {self.source_names[c]!r} is "
                    f"{err[row, c]:.3f} tokens off its target after {b + 1 + row} global "
                    f"batches, beyond the proved bound {self.bounds[c]:.3f}; this is a bug")
            b += cum_tok.shape[0]
            bar.update(cum_tok.shape[0])
        bar.close()
        return {"max_abs_error_tokens": max_err, "worst_batch": worst}

    def _materialize(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            if self.num_sequences > _MATERIALIZE_MAX:
                raise ValueError(f"the blend index holds {self.num_sequences} sequences, too many "
                                 "to hold as whole-run arrays; use batch(i)")
            k = self.order.k
            seq, tok, src, smp = [np.zeros((1, k), np.int64)], [np.zeros((1, k), np.int64)], [], []
            for cum_seq, cum_tok, (labels, ids) in self.sweep(ids=True):
                seq.append(cum_seq)
                tok.append(cum_tok)
                src.append(labels)
                smp.append(ids.astype(self.id_dtype))
            self._arrays = {"source_ids": np.concatenate(src) if src else np.zeros(0, np.int8),
                            "sample_ids": np.concatenate(smp) if smp else
                            np.zeros(0, self.id_dtype),
                            "cumulative_sequences": np.concatenate(seq),
                            "cumulative_tokens": np.concatenate(tok)}
        return self._arrays

    @property
    def source_ids(self) -> np.ndarray:
        return self._materialize()["source_ids"]

    @property
    def sample_ids(self) -> np.ndarray:
        return self._materialize()["sample_ids"]

    @property
    def cumulative_tokens(self) -> np.ndarray:
        return self._materialize()["cumulative_tokens"]

    @property
    def cumulative_sequences(self) -> np.ndarray:
        return self._materialize()["cumulative_sequences"]

    def summary(self) -> dict[str, Any]:
        """Per source and overall figures (see docs/blend.md for every key)."""
        return json.loads(json.dumps(self._summary))

    def __repr__(self) -> str:
        return (f"BlendIndex({', '.join(self.source_names)}: {self.num_sequences} sequences, "
                f"{self.num_batches} batches of {self.global_batch_size})")


def _drawn_total(per_seq: Optional[PerSequence], index: BlendIndex, c: int, count: int) -> int:
    """Sum of ``per_seq`` over source ``c``'s first ``count`` drawn sequences."""
    if per_seq is None:
        return 0
    if isinstance(per_seq, int):
        return per_seq * count
    leaf = index.order.leaves[c]
    whole, rest = divmod(count, leaf.n)
    total = whole * int(per_seq.sum(dtype=np.int64))
    if rest:
        total += int(per_seq[leaf.ids(whole * leaf.n + np.arange(rest))].sum(dtype=np.int64))
    return total


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
    ``total_tokens=None``) for an index of exactly that many global batches. With ``cache_dir``
    the index's description (summary, checks, per-sequence token arrays) is stored under
    ``cache_dir/blend-<hash of every input>`` and read back, CRC-checked, by the next build with
    the same inputs. ``progress`` shows a bar while a whole run is swept."""
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
        key = cache_key(sources, f, total_tokens, num_batches, seq_length, global_batch_size,
                        seed, FORMAT_VERSION)
        final = cache_path_for(cache_dir, key)
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
        save_index(index, sources, key, final)
        index.cache_path = str(final)
        index._summary["cache_write_seconds"] = round(time.perf_counter() - t0, 4)
    return index


def _batches_for_budget(order: BlendOrder, budget: int, B: int) -> int:
    """The fewest global batches whose tokens reach ``budget``: a galloping search from the
    estimate (whole epochs hold exactly their tokens, so the estimate is close and the search
    stays in the epochs the end of the run reads)."""
    def reaches(nb: int) -> bool:
        return nb > 0 and int(order.source_tokens(order.run(nb * B, 0)[0]).sum()) >= budget

    guess = max(1, round(budget * order.slope / B))
    step = 2 + guess // 100_000
    if reaches(guess):
        high, low = guess, guess - step
        while reaches(low):
            high, low, step = low, low - step, 2 * step
        low = max(low, 0)
    else:
        low, high = guess, guess + step
        while not reaches(high):
            low, high, step = high, high + step, 2 * step
    while high - low > 1:                      # low does not reach the budget, high does
        mid = (low + high) // 2
        if reaches(mid):
            high = mid
        else:
            low = mid
    return high


def _check(index: BlendIndex, progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Largest deviation and worst batch per source over the boundaries checked at build, and
    how many were checked (boundary 0, before any token, counts as checked)."""
    nb = index.num_batches
    first = 0
    if (index.num_sequences > _CHECK_ALL_MAX_SEQUENCES
            and index.bounds.max() < index.seq_length):   # proved within one sequence
        first = max(0, nb - _CHECK_LAST_BATCHES)
    result = index.verify(first, nb, progress=progress)
    return result["max_abs_error_tokens"], result["worst_batch"], nb - first + 1


def _build(sources: list[BlendSource], f: np.ndarray, total_tokens: Optional[int],
           num_batches: Optional[int], seq_length: int, global_batch_size: int, seed: int,
           progress: bool, start: float) -> BlendIndex:
    k, B, L = len(sources), global_batch_size, seq_length
    names = [s.name for s in sources]
    failures = []
    for tree, bounds in choose_merge_trees(f, [s.max_tokens for s in sources],
                                           count=_TREES_TO_TRY):
        order = BlendOrder(sources, f, tree, seed)
        nb = num_batches if num_batches is not None else _batches_for_budget(order, total_tokens, B)
        index = BlendIndex(sources, f, tree, bounds, L, B, seed, nb, {})
        max_err, worst_batch, checked = _check(index, progress)
        c = int(max_err.argmax())
        if max_err[c] <= L + _tolerance(nb * B * L):
            break
        # Only possible with five or more sources, whose proved bound can exceed a sequence.
        failures.append(f"merge tree {format_tree(tree, names)}: source {names[c]!r} "
                        f"{max_err[c]:.1f} tokens off after {int(worst_batch[c])} global batches")
    else:
        raise ValueError(f"blend cannot keep every source within one sequence ({L} positions) of "
                         f"its target at every global-batch boundary; tried " + "; ".join(failures)
                         + ". Group small sources into one, or change the fractions.")
    end = index.order.run(nb * B, 0)[0]
    tokens = index.order.source_tokens(end)
    total_seen = int(tokens.sum())
    per_source = []
    for c, s in enumerate(sources):
        drawn, toks = int(end[c]), int(tokens[c])
        per_source.append({
            "name": s.name,
            "target_fraction": float(f[c]),
            "achieved_fraction": toks / total_seen if total_seen else 0.0,
            "source_sequences": s.num_sequences,
            "sequences": drawn,
            "tokens": toks,
            "mean_tokens_per_sequence": toks / drawn if drawn else 0.0,
            "loss_tokens": _drawn_total(s.loss_tokens, index, c, drawn),
            "image_positions": _drawn_total(s.image_positions, index, c, drawn),
            "epochs": drawn / s.num_sequences,
            "whole_epochs": drawn // s.num_sequences,
            "max_abs_error_tokens": float(max_err[c]),
            "max_abs_error_sequences": float(max_err[c]) / L,
            "max_abs_error_own_sequences": float(max_err[c]) / s.mean_tokens,
            "worst_batch": int(worst_batch[c]),
            "error_bound_tokens": float(bounds[c]),
        })
    build_seconds = time.perf_counter() - start
    index._summary = {
        "format_version": FORMAT_VERSION,
        "sources": per_source,
        "num_sequences": nb * B,
        "num_batches": nb,
        "global_batch_size": B,
        "seq_length": L,
        "seed": seed,
        "token_budget": total_tokens,
        "total_tokens": total_seen,
        "padding_positions": nb * B * L - total_seen,
        "max_abs_error_tokens": float(max_err.max()),
        "max_abs_error_sequences": float(max_err.max()) / L,
        "error_bound_sequences": float(bounds.max()) / L,
        "boundaries": nb + 1,
        "boundaries_checked_at_build": checked,
        "merge_tree": format_tree(tree, names),
        "build_seconds": round(build_seconds, 4),
        "from_cache": False,
        "cache_path": None,
    }
    logger.info("blend index: %d sequences in %d global batches, largest error %.4f sequences "
                "(%d of %d boundaries checked), built in %.2f s", nb * B, nb,
                float(max_err.max()) / L, checked, nb + 1, build_seconds)
    return index


def load_cached_index(path: Union[str, Path], key: Optional[dict[str, Any]] = None,
                      verify: bool = True, quiet: bool = False) -> Optional[BlendIndex]:
    """The index cached at ``path``, or None when it is missing, incomplete, corrupt (sizes or
    CRC32 checksums differ) or made for other inputs."""
    found = read_cache(path, key, verify, quiet)
    if found is None:
        return None
    manifest, sources = found
    summary = dict(manifest["summary"], from_cache=True, cache_path=str(path))
    return BlendIndex(sources, np.asarray(manifest["fractions"], dtype=np.float64),
                      _tree_from_json(manifest["tree"]), np.asarray(manifest["bounds"]),
                      manifest["seq_length"], manifest["global_batch_size"], manifest["seed"],
                      manifest["num_batches"], summary, cache_path=str(path))


def _tree_from_json(tree: Any) -> Tree:
    return tree if isinstance(tree, int) else tuple(_tree_from_json(ch) for ch in tree)
