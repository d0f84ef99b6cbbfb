"""The blend index as a function: any global batch alone equals reading the whole order, runs of
the paper's size build in moments, and every fetched boundary is checked."""

from __future__ import annotations

import numpy as np
import pytest

import megatron_vlm.data.blend as blend
import megatron_vlm.data.blend_order as blend_order
import megatron_vlm.data.permutation as permutation
from megatron_vlm.data.blend import BlendSource, build_blend_index, draw_epochs


def nested_blend():
    """Four sources (a nested merge tree), lengths from 1 to 64, one source of 3 sequences."""
    rng = np.random.default_rng(4)
    sources = [BlendSource("text", 1_000, 64),
               BlendSource("cap", 257, rng.integers(1, 65, 257)),
               BlendSource("ins", 3, np.array([5, 64, 17])),
               BlendSource("short", 50, rng.integers(1, 4, 50))]
    return sources, {"text": 0.55, "cap": 0.2, "ins": 0.15, "short": 0.1}


def test_the_state_after_every_slot_equals_the_materialised_order(monkeypatch):
    monkeypatch.setattr(blend, "_SWEEP_CHUNK", 96)           # sweep chunks end mid-batch-run
    sources, fr = nested_blend()
    index = build_blend_index(sources, fr, 100_000, 64, 12, seed=9)
    assert index.summary()["merge_tree"].count("(") >= 2     # a nested tree
    labels = np.asarray(index.source_ids)
    counts = np.zeros((labels.shape[0] + 1, 4), dtype=np.int64)
    for c in range(4):
        counts[1:, c] = np.cumsum(labels == c)
    n = labels.shape[0]
    slots = np.concatenate([np.arange(150), np.random.default_rng(1).integers(150, n - 3, 100),
                            np.arange(n - 3, n + 1)])         # slots, not only batch boundaries
    for p in slots:
        state, part = index.order.run(int(p), min(3, n - p))
        np.testing.assert_array_equal(state, counts[p], err_msg=f"slot {p}")
        np.testing.assert_array_equal(part[0], labels[p:p + 3])


def flat_blend():
    """Two sources, one of variable length, merged flat."""
    rng = np.random.default_rng(8)
    return ([BlendSource("text", 300, 64), BlendSource("cap", 101, rng.integers(1, 65, 101))],
            {"text": 0.7, "cap": 0.3})


@pytest.mark.parametrize("make", [nested_blend, flat_blend])
def test_ideal_time_thresholds_select_exactly_a_prefix_even_with_a_wrong_bound(make):
    """The search's building block: every element with root key <= theta, for theta at exact
    keys (ties), just below and just above them, found without reading the order. A node
    bound that is too small is caught by the search's own check and widened."""
    sources, fr = make()
    k = len(sources)
    index = build_blend_index(sources, fr, 60_000, 64, 12, seed=5)
    order = index.order
    labels, ids = np.asarray(index.source_ids), np.asarray(index.sample_ids)
    tokens = np.zeros(labels.shape[0], dtype=np.int64)
    for c, s in enumerate(sources):
        tps = s.tokens_per_sequence
        tokens[labels == c] = tps if isinstance(tps, int) else tps[ids[labels == c]]
    # Root keys from the materialised order: each child's stream is its sources' subsequence.
    keys = np.empty(labels.shape[0])
    for child, den in zip(order.root.children, order.root.denominators):
        mine = np.isin(labels, child.leaves)
        mid2 = 2 * np.cumsum(tokens[mine]) - tokens[mine]
        keys[mine] = mid2.astype(np.float64) / den
    assert (np.diff(keys) >= 0).all()                        # merged in order of ideal time
    counts = np.zeros((labels.shape[0] + 1, k), dtype=np.int64)
    for c in range(k):
        counts[1:, c] = np.cumsum(labels == c)
    picked = keys[np.random.default_rng(3).integers(0, keys.shape[0], 80)]
    thetas = np.concatenate([[0.0, 1.0], picked, np.nextafter(picked, 0), np.nextafter(picked, 1e18)])

    def check(thetas):
        for theta in thetas:
            state = np.zeros(k, dtype=np.int64)
            order._state_key(order.root, float(theta), state)
            np.testing.assert_array_equal(state, counts[np.searchsorted(keys, theta, "right")],
                                          err_msg=f"theta {theta!r}")

    check(thetas)
    inner = [ch for ch in order.root.children if not hasattr(ch, "constant")]
    while inner:
        node = inner.pop()
        node.spread = -8.0 * node.max_tokens                   # claims far too tight a bound
        inner += [ch for ch in node.children if not hasattr(ch, "constant")]
    check(thetas[::6])


def test_a_merge_that_asks_its_children_for_too_few_asks_again():
    sources, fr = nested_blend()
    reference = build_blend_index(sources, fr, 60_000, 64, 12, seed=6)
    sid, smp = np.asarray(reference.source_ids), np.asarray(reference.sample_ids)
    index = build_blend_index(sources, fr, 60_000, 64, 12, seed=6)
    nodes = [index.order.root]
    while nodes:
        node = nodes.pop()
        node.shares = [0.0] * len(node.children)             # every first request is too small
        nodes += [ch for ch in node.children if hasattr(ch, "shares")]
    B = index.global_batch_size
    for i in (0, 1, 17, index.num_batches - 1, 40):
        s, m = index.batch(i)
        np.testing.assert_array_equal(s, sid[i * B:(i + 1) * B])
        np.testing.assert_array_equal(m, smp[i * B:(i + 1) * B])


def test_any_global_batch_alone_equals_reading_in_order():
    sources, fr = nested_blend()
    index = build_blend_index(sources, fr, 150_000, 64, 12, seed=2)
    sid, smp = np.asarray(index.source_ids), np.asarray(index.sample_ids)
    B = index.global_batch_size
    fresh = build_blend_index(sources, fr, 150_000, 64, 12, seed=2)
    for n, i in enumerate(np.random.default_rng(0).permutation(index.num_batches)[:150]):
        s, m = (fresh if n % 2 else index).batch(int(i))      # never the batch after the last
        np.testing.assert_array_equal(s, sid[i * B:(i + 1) * B])
        np.testing.assert_array_equal(m, smp[i * B:(i + 1) * B])


def test_large_runs_check_the_last_boundaries_at_build_and_every_batch_when_fetched(monkeypatch):
    monkeypatch.setattr(blend, "_CHECK_ALL_MAX_SEQUENCES", 1_000)
    sources, fr = nested_blend()
    index = build_blend_index(sources, fr, 400_000, 64, 16, seed=1)
    s = index.summary()
    assert index.num_sequences > 1_000
    assert s["boundaries_checked_at_build"] == blend._CHECK_LAST_BATCHES + 1
    assert s["boundaries"] == index.num_batches + 1
    full = index.verify()                                     # every boundary, on request
    assert float(full["max_abs_error_tokens"].max()) <= 64
    index.batch(5)
    index.bounds = index.bounds * 0                           # a bound no real order meets
    with pytest.raises(RuntimeError, match="beyond the proved bound"):
        index.batch(7)
    with pytest.raises(RuntimeError, match="beyond the proved bound"):
        index.verify()


def test_the_papers_text_run_and_a_caption_blend_at_full_scale():
    """4.3T tokens at sequence 2048 (2.1 billion sequences): text only, and with 10% captions
    of variable length (a smaller caption source than the benchmark's, to stay quick)."""
    L, B, total = 2048, 1024, 4_300_000_000_000
    text = BlendSource("text", 2_100_000_000, L)
    only = build_blend_index([text], {"text": 1.0}, total, L, B)
    assert only.num_batches == -(-total // (L * B))
    assert only.summary()["max_abs_error_tokens"] == 0
    s, m = only.batch(2_000_000)
    assert (s == 0).all() and np.unique(m).shape[0] == B

    rng = np.random.default_rng(0)
    caption = BlendSource("caption", 200_003, (731 + rng.integers(3, 200, 200_003)).astype(np.int32))
    fr = {"text": 0.9, "caption": 0.1}
    index = build_blend_index([text, caption], fr, total, L, B)
    summary = index.summary()
    assert summary["total_tokens"] >= total and summary["max_abs_error_sequences"] < 1
    assert summary["sources"][1]["epochs"] > 2_000
    i = index.num_batches - 3
    alone = index.batch(i)                                    # found by search
    again = build_blend_index([text, caption], fr, total, L, B)
    again.batch(i - 1)
    in_order = again.batch(i)                                 # reached by reading on
    np.testing.assert_array_equal(alone[0], in_order[0])
    np.testing.assert_array_equal(alone[1], in_order[1])
    assert 0 < int((alone[0] == 1).sum()) < B


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocked shuffles for variable-length sources of 1,000 sequences or more, in blocks of 64."""
    monkeypatch.setattr(blend_order, "_SMALL_SOURCE", 1_000)
    monkeypatch.setattr(permutation, "BLOCK", 64)


def blocked_blend():
    """A variable-length source of 3,001 sequences (blocked under ``small_blocks``) among a
    constant-length one and a small variable-length one."""
    rng = np.random.default_rng(12)
    return ([BlendSource("text", 700, 64), BlendSource("cap", 3_001, rng.integers(1, 65, 3_001)),
             BlendSource("short", 60, rng.integers(1, 9, 60))],
            {"text": 0.6, "cap": 0.3, "short": 0.1})


def test_a_source_shuffled_in_blocks_reads_the_same_from_anywhere(small_blocks):
    sources, fr = blocked_blend()
    index = build_blend_index(sources, fr, 1_000_000, 64, 12, seed=4)
    leaf = index.order.leaves[1]
    assert leaf.blocked and leaf.perm.block == 64 and not index.order.leaves[2].blocked
    labels, samples = np.asarray(index.source_ids), np.asarray(index.sample_ids)
    ids = samples[labels == 1]
    assert ids.shape[0] > 2 * 3_001                                     # several epochs
    np.testing.assert_array_equal(ids, draw_epochs(3_001, ids.shape[0], 4, "cap", variable=True))
    # Tokens before a position: block totals in the epoch's order plus part of one block.
    tokens = np.concatenate([[0], np.cumsum(sources[1].tokens_per_sequence[ids])])
    rng = np.random.default_rng(0)
    edges = [0, 1, 63, 64, 65, 3_000, 3_001, 3_002, 6_002, ids.shape[0]]
    for j in np.concatenate([edges, rng.integers(0, ids.shape[0], 300)]):
        assert leaf.before(int(j)) == tokens[j], j
    # The state after any slot and any global batch, found by search in a fresh index.
    counts = np.zeros((labels.shape[0] + 1, 3), dtype=np.int64)
    for c in range(3):
        counts[1:, c] = np.cumsum(labels == c)
    fresh = build_blend_index(sources, fr, 1_000_000, 64, 12, seed=4)
    for p in rng.integers(0, labels.shape[0] - 3, 150):
        state, part = fresh.order.run(int(p), 3)
        np.testing.assert_array_equal(state, counts[p], err_msg=f"slot {p}")
        np.testing.assert_array_equal(part[0], labels[p:p + 3])
    B = index.global_batch_size
    for i in rng.permutation(index.num_batches)[:100]:
        s, m = fresh.batch(int(i))
        np.testing.assert_array_equal(s, labels[i * B:(i + 1) * B])
        np.testing.assert_array_equal(m, samples[i * B:(i + 1) * B])
