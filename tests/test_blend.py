"""The exact token-ratio blend index: the ratio guarantee, shuffling, epochs, cache and CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vlm.data.blend import (BlendSource, build_blend_index, choose_merge_tree,
                                     draw_epochs, load_cached_index)

REPO = Path(__file__).resolve().parent.parent


def slot_tokens(sid, smp, sources) -> np.ndarray:
    """Positions of every slot, recomputed from the order and the sources (not the index's own
    bookkeeping)."""
    tok = np.zeros(sid.shape[0], dtype=np.int64)
    for c, s in enumerate(sources):
        mask = sid == c
        tps = s.tokens_per_sequence
        tok[mask] = tps if isinstance(tps, int) else tps[smp[mask]]
    return tok


def check_index(index, sources, fractions, seq_length, batch, budget=None):
    """Every property the index promises, checked from scratch."""
    names = [s.name for s in sources]
    f = np.array([fractions[n] for n in names], dtype=np.float64)
    f /= f.sum()
    # The whole order read at once ...
    sid = np.asarray(index.source_ids)
    smp = np.asarray(index.sample_ids)
    # ... is the order as the loader sees it: global batches fetched on their own, in shuffled
    # order (each found by search, not continued from the one before; at most 300 of them).
    nb = index.num_batches
    for i in np.random.default_rng(nb).permutation(nb)[:300]:
        s, m = index.batch(int(i))
        np.testing.assert_array_equal(s, sid[i * batch:(i + 1) * batch])
        np.testing.assert_array_equal(m, smp[i * batch:(i + 1) * batch])
    n = sid.shape[0]
    assert n % batch == 0 and n == index.num_sequences and nb == n // batch
    assert sid.min() >= 0 and sid.max() < len(sources)
    tok = slot_tokens(sid, smp, sources)
    cum = np.zeros((nb + 1, len(sources)), dtype=np.int64)
    for c in range(len(sources)):
        cum[1:, c] = np.cumsum(np.where(sid == c, tok, 0).reshape(nb, batch).sum(axis=1))
    seen = cum.sum(axis=1)
    np.testing.assert_array_equal(cum, np.asarray(index.cumulative_tokens))
    # The guarantee: within one sequence at every global-batch boundary.
    err = np.abs(cum - seen[:, None] * f[None, :])
    summary = index.summary()
    bounds = np.array([s["error_bound_tokens"] for s in summary["sources"]])
    assert (err <= bounds[None, :] + 1e-6).all(), (err.max(axis=0), bounds)
    largest = max(s.max_tokens for s in sources)
    if len(sources) <= 4:
        assert bounds.max() < largest      # proved for up to four sources
    assert err.max() <= seq_length
    assert summary["max_abs_error_sequences"] == pytest.approx(err.max() / seq_length, abs=1e-9)
    # The budget is reached by the last global batch and not by the one before.
    if budget is not None:
        assert seen[-1] >= budget and seen[-2] < budget
    # Within a source: epoch after epoch, each a permutation of all its sequences.
    for c, s in enumerate(sources):
        ids = smp[sid == c]
        full = ids.shape[0] // s.num_sequences
        whole = ids[:full * s.num_sequences].reshape(full, s.num_sequences)
        np.testing.assert_array_equal(np.sort(whole, axis=1),
                                      np.broadcast_to(np.arange(s.num_sequences), whole.shape))
        rest = ids[full * s.num_sequences:]
        assert np.unique(rest).shape[0] == rest.shape[0]
        assert rest.shape[0] == 0 or (rest.min() >= 0 and rest.max() < s.num_sequences)
        info = summary["sources"][c]
        assert info["sequences"] == ids.shape[0]
        assert info["whole_epochs"] == full
        assert info["epochs"] == pytest.approx(ids.shape[0] / s.num_sequences)
        assert info["tokens"] == int(cum[-1, c])


@st.composite
def blends(draw):
    k = draw(st.integers(2, 4))
    seq_length = draw(st.sampled_from([8, 16, 64, 128]))
    batch = draw(st.integers(1, 48))
    weights = draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k))
    total_w = sum(weights)
    fractions = {f"s{c}": w / total_w for c, w in enumerate(weights)}
    sources = []
    for c in range(k):
        size = draw(st.one_of(st.integers(1, 5), st.integers(6, 300)))   # tiny ones repeat a lot
        if draw(st.booleans()):
            tps = draw(st.integers(1, seq_length))
        else:
            lo = draw(st.integers(1, seq_length))
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            tps = rng.integers(lo, seq_length + 1, size=size)
        sources.append(BlendSource(f"s{c}", size, tps))
    budget = draw(st.integers(1, 60)) * seq_length * batch // draw(st.integers(1, 3)) + 1
    seed = draw(st.integers(0, 2**31 - 1))
    return sources, fractions, seq_length, batch, budget, seed


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blends())
def test_ratio_guarantee_property(blend):
    sources, fractions, seq_length, batch, budget, seed = blend
    index = build_blend_index(sources, fractions, budget, seq_length, batch, seed=seed)
    check_index(index, sources, fractions, seq_length, batch, budget)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-4, 1.0), min_size=2, max_size=4),
       st.lists(st.integers(1, 1024), min_size=4, max_size=4))
def test_proved_bound_below_one_sequence_up_to_four_sources(weights, max_tokens):
    f = np.array(weights) / sum(weights)
    _, bounds = choose_merge_tree(f, max_tokens[:len(f)])
    assert bounds.max() < max(max_tokens[:len(f)])


def test_flat_merge_for_three_constant_sources_matches_ideal_time_order():
    sources = [BlendSource("a", 50, 10), BlendSource("b", 7, 10), BlendSource("c", 3, 10)]
    fr = {"a": 0.5, "b": 0.3, "c": 0.2}
    index = build_blend_index(sources, fr, 2000, 16, 4)
    # Ideal time (j + 1/2) * 10 / f of each source's j-th sequence, merged.
    times = [((j + 0.5) * 10 / fr[s.name], c) for c, s in enumerate(sources) for j in range(400)]
    expected = [c for _, c in sorted(times, key=lambda x: (x[0], x[1]))][:index.num_sequences]
    assert index.summary()["merge_tree"] == "(a, b, c)"   # flat: the smallest proved bound here
    np.testing.assert_array_equal(np.asarray(index.source_ids), expected)
    check_index(index, sources, fr, 16, 4, 2000)


def test_single_source_and_num_batches():
    src = [BlendSource("only", 7, np.arange(1, 8))]
    index = build_blend_index(src, {"only": 1.0}, None, 8, 3, num_batches=5)
    assert index.num_batches == 5 and index.num_sequences == 15
    assert index.summary()["max_abs_error_tokens"] == 0
    check_index(index, src, {"only": 1.0}, 8, 3)


def test_deterministic_for_a_seed_and_different_across_seeds():
    rng = np.random.default_rng(3)
    sources = [BlendSource("text", 500, 64), BlendSource("cap", 200, rng.integers(20, 64, 200)),
               BlendSource("ins", 90, rng.integers(30, 65, 90))]
    fr = {"text": 0.7, "cap": 0.2, "ins": 0.1}
    a = build_blend_index(sources, fr, 100_000, 64, 16, seed=5)
    b = build_blend_index(sources, fr, 100_000, 64, 16, seed=5)
    c = build_blend_index(sources, fr, 100_000, 64, 16, seed=6)
    np.testing.assert_array_equal(a.source_ids, b.source_ids)
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    assert not np.array_equal(a.sample_ids, c.sample_ids)
    sids, smps = a.batch(3)
    np.testing.assert_array_equal(sids, a.source_ids[48:64])
    np.testing.assert_array_equal(smps, a.sample_ids[48:64])
    with pytest.raises(IndexError):
        a.batch(a.num_batches)


def test_a_longer_budget_extends_the_same_order():
    sources = [BlendSource("a", 40, np.arange(1, 41) % 16 + 1), BlendSource("b", 9, 12)]
    fr = {"a": 0.6, "b": 0.4}
    short = build_blend_index(sources, fr, 3_000, 16, 4, seed=1)
    long = build_blend_index(sources, fr, 30_000, 16, 4, seed=1)
    n = short.num_sequences
    np.testing.assert_array_equal(short.source_ids, long.source_ids[:n])
    np.testing.assert_array_equal(short.sample_ids, long.sample_ids[:n])


def test_epochs_of_a_tiny_source_are_counted_and_each_a_permutation():
    sources = [BlendSource("big", 10_000, 32), BlendSource("tiny", 3, 32)]
    fr = {"big": 0.5, "tiny": 0.5}
    index = build_blend_index(sources, fr, 32 * 3000, 32, 8, seed=2)
    info = index.summary()["sources"][1]
    assert info["sequences"] == 1500 and info["whole_epochs"] == 500
    assert info["epochs"] == pytest.approx(500.0)
    check_index(index, sources, fr, 32, 8, 32 * 3000)
    # The same draw gives the same epochs, and a longer draw extends a shorter one.
    a = draw_epochs(3, 10, seed=2, name="tiny")
    np.testing.assert_array_equal(a, draw_epochs(3, 100, seed=2, name="tiny")[:10])
    big = draw_epochs(70_000, 150_000, seed=0, name="x")
    for e in range(2):
        np.testing.assert_array_equal(np.sort(big[e * 70_000:(e + 1) * 70_000]), np.arange(70_000))
    assert not np.array_equal(big[:70_000], big[70_000:140_000])


def test_loss_tokens_and_image_positions_are_totalled():
    rng = np.random.default_rng(0)
    loss = rng.integers(0, 20, 30)
    images = np.where(rng.random(30) < 0.5, 9, 0)
    sources = [BlendSource("text", 100, 32, loss_tokens=32, image_positions=0),
               BlendSource("ins", 30, rng.integers(10, 33, 30), loss_tokens=loss,
                           image_positions=images),
               BlendSource("cap", 12, 20)]
    fr = {"text": 0.6, "ins": 0.3, "cap": 0.1}
    index = build_blend_index(sources, fr, 20_000, 32, 4)
    s = index.summary()["sources"]
    sid, smp = np.asarray(index.source_ids), np.asarray(index.sample_ids)
    assert s[0]["loss_tokens"] == 32 * int((sid == 0).sum()) and s[0]["image_positions"] == 0
    assert s[1]["loss_tokens"] == int(loss[smp[sid == 1]].sum())
    assert s[1]["image_positions"] == int(images[smp[sid == 1]].sum())
    assert s[2]["loss_tokens"] == 0 and s[2]["image_positions"] == 0


@pytest.mark.parametrize("fractions, message", [
    ({"a": 0.5, "b": 0.4}, r"sum to 0\.9"),
    ({"a": 0.5, "b": 0.5, "c": 0.0}, "unknown sources: c"),
    ({"a": 1.0}, "without a fraction: b"),
    ({"a": 1.5, "b": -0.5}, "finite number > 0: b=-0.5"),
    ({"a": 1.0, "b": 0.0}, "finite number > 0: b=0.0"),
])
def test_bad_fractions_name_the_problem(fractions, message):
    sources = [BlendSource("a", 10, 4), BlendSource("b", 10, 4)]
    with pytest.raises(ValueError, match=message):
        build_blend_index(sources, fractions, 1000, 8, 2)


def test_bad_sources_are_errors():
    with pytest.raises(ValueError, match="unique; repeated: a"):
        build_blend_index([BlendSource("a", 3, 4), BlendSource("a", 3, 4)], {"a": 1.0}, 100, 8, 2)
    with pytest.raises(ValueError, match="more than seq_length=8"):
        build_blend_index([BlendSource("a", 3, 9)], {"a": 1.0}, 100, 8, 2)
    with pytest.raises(ValueError, match=r"tokens_per_sequence\[1\]=0"):
        BlendSource("a", 3, np.array([1, 0, 2]))
    with pytest.raises(ValueError, match="has 2 entries"):
        BlendSource("a", 3, np.array([1, 2]))
    with pytest.raises(ValueError, match="exactly one of total_tokens and num_batches"):
        build_blend_index([BlendSource("a", 3, 4)], {"a": 1.0}, None, 8, 2)


def test_cache_hit_and_corrupt_cache_rebuilt(tmp_path):
    rng = np.random.default_rng(1)
    sources = [BlendSource("text", 300, 64), BlendSource("cap", 50, rng.integers(30, 65, 50))]
    fr = {"text": 0.9, "cap": 0.1}
    first = build_blend_index(sources, fr, 200_000, 64, 8, seed=4, cache_dir=tmp_path)
    assert not first.summary()["from_cache"]
    cached = build_blend_index(sources, fr, 200_000, 64, 8, seed=4, cache_dir=tmp_path)
    assert cached.summary()["from_cache"]
    assert cached.cache_path == first.cache_path
    for name in ("source_ids", "sample_ids", "cumulative_tokens", "cumulative_sequences"):
        np.testing.assert_array_equal(getattr(first, name), getattr(cached, name))
    assert cached.summary()["max_abs_error_sequences"] == first.summary()["max_abs_error_sequences"]
    # Another seed is another cache entry.
    other = build_blend_index(sources, fr, 200_000, 64, 8, seed=5, cache_dir=tmp_path)
    assert not other.summary()["from_cache"] and other.cache_path != first.cache_path
    del cached

    path = Path(first.cache_path)
    tokens = path / "tokens-1.npy"                             # the caption lengths
    data = bytearray(tokens.read_bytes())
    data[-3] ^= 0xFF                                           # one flipped byte
    tokens.write_bytes(bytes(data))
    rebuilt = build_blend_index(sources, fr, 200_000, 64, 8, seed=4, cache_dir=tmp_path)
    assert not rebuilt.summary()["from_cache"]
    np.testing.assert_array_equal(first.sample_ids, rebuilt.sample_ids)
    assert load_cached_index(path) is not None                 # rewritten whole

    tokens.write_bytes(tokens.read_bytes()[:100])
    assert load_cached_index(path) is None                     # truncated
    again = build_blend_index(sources, fr, 200_000, 64, 8, seed=4, cache_dir=tmp_path)
    assert not again.summary()["from_cache"]
    (path / "manifest.json").write_text("{not json")
    assert load_cached_index(path) is None
    final = build_blend_index(sources, fr, 200_000, 64, 8, seed=4, cache_dir=tmp_path)
    np.testing.assert_array_equal(first.source_ids, final.source_ids)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp dirs


def test_dry_run_cli_json(capsys, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import build_blend_index as tool
    finally:
        sys.path.remove(str(REPO / "tools"))
    args = ["--dry-run", "--source", "text:1000:1024", "--source", "cap:40:760",
            "--source", "ins:7:900", "--ratio", "text=0.8", "--ratio", "cap=0.1",
            "--ratio", "ins=0.1", "--total-tokens", "2e6", "--seq-length", "1024",
            "--global-batch", "8", "--json", "--no-progress", "--cache-dir", str(tmp_path)]
    assert tool.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("max_abs_error_sequences", "build_seconds", "sources", "num_sequences",
                "num_batches", "total_tokens", "merge_tree"):
        assert key in out
    assert out["max_abs_error_sequences"] < 1
    assert {s["name"] for s in out["sources"]} == {"text", "cap", "ins"}
    for s in out["sources"]:
        for key in ("target_fraction", "achieved_fraction", "sequences", "tokens", "epochs",
                    "whole_epochs", "loss_tokens", "image_positions", "max_abs_error_sequences"):
            assert key in s
    assert out["total_tokens"] >= 2_000_000
    assert tool.main(args) == 0                                  # second run: from the cache
    assert json.loads(capsys.readouterr().out)["from_cache"]
    assert tool.main([a for a in args if a != "--json"]) == 0   # table output
    assert "max err (seq)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="sum to"):
        tool.main(["ins=0.3" if a == "ins=0.1" else a for a in args])
    # Synthetic variable lengths, and every boundary checked on request.
    uncached = args[:args.index("--cache-dir")]
    assert tool.main(["cap:40:700-760" if a == "cap:40:760" else a for a in uncached]
                     + ["--verify"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified_boundaries"] == out["num_batches"] + 1
    assert out["verified_max_abs_error_sequences"] == pytest.approx(out["max_abs_error_sequences"])
    with pytest.raises(ValueError, match="LOW <= HIGH"):
        tool.main(["cap:40:760-700" if a == "cap:40:760" else a for a in args])
    with pytest.raises(ValueError, match="NAME:SEQUENCES:TOKENS_PER_SEQUENCE"):
        tool.main(["--dry-run", "--source", "text:1000", "--ratio", "text=1",
                   "--total-tokens", "10", "--seq-length", "8", "--global-batch", "2"])


def test_real_shard_sources_count_what_the_sample_builders_fill(tmp_path, capsys):
    """Per-sequence positions and loss tokens of shard sources agree with the sample builders,
    and the tool builds a blend from shards."""
    from megatron_vlm.data import samples
    from megatron_vlm.data.blend import source_from_shards
    from megatron_vlm.data.embedding_shards import EmbeddingShardWriter
    from megatron_vlm.data.instruction_shards import InstructionShardWriter
    from megatron_vlm.data.text_shards import write_text_dataset

    L, n_img, sep, eos, pad = 24, 4, 1, 2, 0
    rng = np.random.default_rng(0)
    captions = [list(rng.integers(5, 50, size=n)) for n in (0, 3, 17, 18, 30)]
    with EmbeddingShardWriter(tmp_path / "cap", n_img=n_img, d_enc=8, rows_per_shard=2) as w:
        for i, cap in enumerate(captions):
            w.add(f"img{i}", np.zeros((n_img, 8), np.float32), caption_tokens=cap)
    convs = []
    for i, n in enumerate((5, 12, 19, 20, 21, 40)):
        toks = list(rng.integers(5, 50, size=n))
        mask = list(rng.integers(0, 2, size=n))
        convs.append((toks, mask, f"img{i % 5}" if i % 2 == 0 else None))
    with InstructionShardWriter(tmp_path / "ins", rows_per_shard=4) as w:
        for i, (toks, mask, image) in enumerate(convs):
            w.add(f"conv{i}", toks, mask, image_key=image)
    write_text_dataset(str(tmp_path / "text"), [list(range(5, 5 + n)) + [eos]
                                                 for n in (30, 50, 7)])

    cap = source_from_shards("cap", "caption", tmp_path / "cap", L)
    for i, c in enumerate(captions):
        s = samples.build_caption_sample(c, n_img, sep, eos, L, pad)
        assert cap.tokens_per_sequence[i] == int((s.segment_ids >= 0).sum())
        assert cap.loss_tokens[i] == int(s.loss_mask.sum())
    assert cap.image_positions == n_img
    ins = source_from_shards("ins", "instruction", tmp_path / "ins", L, n_img=n_img)
    for i, (toks, mask, image) in enumerate(convs):
        s = samples.build_instruction_sample(toks, mask, n_img if image else 0, L, pad, eos)
        assert ins.tokens_per_sequence[i] == int((s.segment_ids >= 0).sum()), i
        assert ins.loss_tokens[i] == int(s.loss_mask.sum()), i
        assert ins.image_positions[i] == (n_img if image else 0)
    text = source_from_shards("text", "text", str(tmp_path / "text"), L)
    assert text.num_sequences == (30 + 50 + 7 + 3 - 1) // L and text.tokens_per_sequence == L

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import build_blend_index as tool
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert tool.main(["--source", f"text:text:{tmp_path / 'text'}",
                      "--source", f"cap:caption:{tmp_path / 'cap'}",
                      "--source", f"ins:instruction:{tmp_path / 'ins'}",
                      "--ratio", "text=0.5", "--ratio", "cap=0.25", "--ratio", "ins=0.25",
                      "--total-tokens", "5000", "--seq-length", str(L), "--global-batch", "4",
                      "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in out["sources"]}
    assert by_name["cap"]["image_positions"] == n_img * by_name["cap"]["sequences"]
    assert by_name["text"]["loss_tokens"] == L * by_name["text"]["sequences"]
    assert out["max_abs_error_sequences"] < 1


def test_six_sources_stay_within_one_sequence():
    rng = np.random.default_rng(7)
    sources = [BlendSource(f"s{c}", int(rng.integers(1, 400)),
                           int(rng.integers(8, 65)))
               for c in range(6)]
    weights = rng.dirichlet(np.ones(6) * 0.5) + 1e-3
    fr = {s.name: float(w / weights.sum()) for s, w in zip(sources, weights)}
    index = build_blend_index(sources, fr, 300_000, 64, 5, seed=3)
    check_index(index, sources, fr, 64, 5, 300_000)


def test_exact_ratios_with_a_large_caption_source_shuffled_in_blocks(monkeypatch):
    """The blocked shuffle of large variable-length sources (docs/blend.md) keeps every promise;
    the thresholds are lowered so that a small source takes that path."""
    import megatron_vlm.data.blend_order as blend_order
    import megatron_vlm.data.permutation as permutation
    monkeypatch.setattr(blend_order, "_SMALL_SOURCE", 1_000)
    monkeypatch.setattr(permutation, "BLOCK", 64)
    rng = np.random.default_rng(21)
    sources = [BlendSource("text", 500, 128),
               BlendSource("cap", 2_503, rng.integers(20, 129, 2_503),
                           loss_tokens=rng.integers(1, 20, 2_503)),
               BlendSource("ins", 1_200, rng.integers(1, 129, 1_200))]
    fr = {"text": 0.5, "cap": 0.3, "ins": 0.2}
    index = build_blend_index(sources, fr, 1_500_000, 128, 16, seed=7)
    assert [lf.blocked for lf in index.order.leaves] == [False, True, True]
    summary = index.summary()["sources"][1]
    assert summary["whole_epochs"] >= 2
    check_index(index, sources, fr, 128, 16, budget=1_500_000)
    drawn = np.asarray(index.sample_ids)[np.asarray(index.source_ids) == 1]
    assert summary["loss_tokens"] == int(sources[1].loss_tokens[drawn].sum())


def test_an_index_of_small_sources_is_the_same_as_before_blocked_shuffles():
    """Sources below the blocked shuffle's threshold (every source of the quickstart) keep
    their exact per-epoch permutation: batches of a 65,535-caption blend hash as they did."""
    import hashlib
    rng = np.random.default_rng(4)
    sources = [BlendSource("text", 1_000, 64),
               BlendSource("cap", 65_535, rng.integers(1, 65, 65_535)),
               BlendSource("ins", 3, np.array([5, 64, 17])),
               BlendSource("short", 50, rng.integers(1, 4, 50))]
    fr = {"text": 0.55, "cap": 0.2, "ins": 0.15, "short": 0.1}
    index = build_blend_index(sources, fr, 12_000_000, 64, 16, seed=3)
    assert index.summary()["sources"][1]["whole_epochs"] == 1
    digest = hashlib.sha256()
    for i in (0, 1, 7, index.num_batches // 2, index.num_batches - 1):
        for x in index.batch(i):
            digest.update(np.asarray(x, np.int64).tobytes())
    # Computed with the blend index before blocked shuffles existed (commit de81af7).
    assert digest.hexdigest() == "8b292b944164d949de8eb81a8275bb41557ba2b59a45020a73ed8a7f0c3a039e"
