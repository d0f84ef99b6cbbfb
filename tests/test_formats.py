"""Shard formats: embedding and instruction shards (round trips, memory mapping, checksums,
crash-safe resume, input errors) and the text IndexedDataset helpers with packed windows."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_vlm.data.embedding_shards import (
    EmbeddingDataset,
    EmbeddingShardWriter,
    dequantize_fp8,
    quantize_fp8,
)
from megatron_vlm.data.instruction_shards import InstructionDataset, InstructionShardWriter
from megatron_vlm.data.shard_io import INDEX_NAME
from megatron_vlm.data.text_shards import open_text_dataset, write_text_dataset
from megatron_vlm.data.text_windows import PackedTextWindows

N_IMG, D_ENC = 6, 16


def _emb(seed: int, n_img: int = N_IMG, d_enc: int = D_ENC) -> torch.Tensor:
    return torch.randn(n_img, d_enc, generator=torch.Generator().manual_seed(seed))


def _write(directory, n: int, dtype: str = "bf16", rows_per_shard: int = 4, start: int = 0):
    with EmbeddingShardWriter(directory, N_IMG, D_ENC, dtype=dtype,
                              rows_per_shard=rows_per_shard) as w:
        for i in range(start, start + n):
            w.add(f"img{i}", _emb(i), caption_tokens=list(range(i % 5)) if i % 3 else None)
    return w


# ---- embedding shards ------------------------------------------------------------------------

def test_bf16_round_trip_is_exact_bf16_rounding(tmp_path):
    _write(tmp_path, 10)
    ds = EmbeddingDataset(tmp_path)
    assert len(ds) == 10 and (ds.n_img, ds.d_enc, ds.dtype) == (N_IMG, D_ENC, "bf16")
    assert ds.num_shards == 3  # 4 + 4 + 2 rows
    for i in range(10):
        assert ds.key(i) == f"img{i}"
        assert ds.index_of(f"img{i}") == i
        got = ds.embedding(i)
        assert got.dtype == torch.bfloat16 and got.shape == (N_IMG, D_ENC)
        assert torch.equal(got, _emb(i).to(torch.bfloat16))
        expected = np.arange(i % 5, dtype=np.int32) if i % 3 else np.zeros(0, np.int32)
        caption = ds.caption_tokens(i)
        assert caption.dtype == np.int32 and np.array_equal(caption, expected)
    assert ds.caption_lengths().tolist() == [(i % 5) if i % 3 else 0 for i in range(10)]
    # float64 / numpy / bfloat16 inputs round the same way
    d2 = tmp_path / "other"
    with EmbeddingShardWriter(d2, N_IMG, D_ENC) as w:
        w.add("np64", _emb(0).double().numpy())
        w.add("bf", _emb(1).to(torch.bfloat16))
    ds2 = EmbeddingDataset(d2)
    assert torch.equal(ds2.embedding(0), _emb(0).double().to(torch.bfloat16))
    assert torch.equal(ds2.embedding(1), _emb(1).to(torch.bfloat16))


def test_index_json_describes_shards(tmp_path):
    _write(tmp_path, 5, rows_per_shard=4)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["format"] == "megatron-vlm-embeddings" and index["version"] == 1
    assert (index["n_img"], index["d_enc"], index["dtype"], index["rows"]) == (N_IMG, D_ENC, "bf16", 5)
    assert [s["rows"] for s in index["shards"]] == [4, 1]
    files = index["shards"][0]["files"]
    assert set(files) == {"embeddings", "captions", "offsets", "records"}
    emb = files["embeddings"]
    assert emb["file"] == "shard_00000.emb" and emb["bytes"] == 4 * N_IMG * D_ENC * 2
    assert len(emb["sha256"]) == 64
    # raw layout: little-endian uint16 bf16 bit patterns, C order [rows, n_img, d_enc]
    raw = np.fromfile(tmp_path / "shard_00000.emb", dtype="<u2").reshape(4, N_IMG, D_ENC)
    expected = _emb(2).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    assert np.array_equal(raw[2], expected)


def _heavy_tailed(n: int, n_img: int, d_enc: int, seed: int) -> torch.Tensor:
    """Student-t values (df 3), log-normal patch norms, a few outlier patches and channels."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, n_img, d_enc, generator=g) / torch.sqrt(
        torch.distributions.Chi2(3.0).sample((n, n_img, d_enc)) / 3.0)
    x = t * torch.exp(torch.randn(n, n_img, 1, generator=g))
    x[:, :5] *= 30
    x[:, :, :4] *= 20
    return x


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
def test_fp8_cosine_similarity(kind):
    torch.manual_seed(0)
    n, n_img, d_enc = 4, 729, 1152
    x = (torch.randn(n, n_img, d_enc) if kind == "gaussian" else _heavy_tailed(n, n_img, d_enc, 0))
    q, s = quantize_fp8(x.reshape(-1, d_enc))
    y = dequantize_fp8(q, s).reshape(n, n_img, d_enc)
    per_patch = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
    per_image = torch.nn.functional.cosine_similarity(x.double().flatten(1), y.double().flatten(1), dim=-1)
    # measured (docs/data.md): mean 0.99965 / min 0.9995 (gaussian), min 0.9995 (heavy tailed)
    assert per_patch.mean() > 0.9995 and per_patch.min() > 0.999
    assert per_image.min() > 0.9995
    bf = x.to(torch.bfloat16).double()
    assert torch.nn.functional.cosine_similarity(bf, y.double(), dim=-1).min() > 0.999


def test_fp8_shards_round_trip_and_zero_rows(tmp_path):
    x = [_emb(i) * (10.0 ** (i - 2)) for i in range(5)]
    x[3] = torch.zeros(N_IMG, D_ENC)
    x[4][2] = 0.0
    with EmbeddingShardWriter(tmp_path, N_IMG, D_ENC, dtype="fp8", rows_per_shard=2) as w:
        for i, e in enumerate(x):
            w.add(f"k{i}", e)
    ds = EmbeddingDataset(tmp_path, verify=True)
    assert ds.dtype == "fp8" and len(ds) == 5
    assert ds.raw_embedding(0).dtype == np.uint8 and ds.raw_scale(0).shape == (N_IMG,)
    for i, e in enumerate(x):
        got = ds.embedding(i)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all()
        if i == 3:
            assert torch.equal(got.float(), torch.zeros(N_IMG, D_ENC))
            continue
        cos = torch.nn.functional.cosine_similarity(got.double(), e.double(), dim=-1)
        rows = e.abs().amax(-1) > 0
        assert cos[rows].min() > 0.99
        assert torch.equal(got[~rows].float(), torch.zeros_like(got[~rows].float()))


def test_memory_mapped_reading(tmp_path):
    _write(tmp_path, 9)
    ds = EmbeddingDataset(tmp_path)
    raw = ds.raw_embedding(5)
    assert isinstance(raw, np.memmap) and raw.dtype == np.dtype("<u2") and raw.shape == (N_IMG, D_ENC)
    assert not raw.flags.writeable
    # only the shards touched are mapped, and a pickled dataset carries no row data
    assert set(ds._maps) == {(1, "embeddings")}
    blob = pickle.dumps(ds)
    clone = pickle.loads(blob)
    assert len(blob) < 4 * N_IMG * D_ENC * 2 + 4096
    assert torch.equal(clone.embedding(8), ds.embedding(8))
    assert ds.embeddings([0, 8]).shape == (2, N_IMG, D_ENC)


def test_checksums_detect_tampered_file(tmp_path):
    _write(tmp_path, 6)
    EmbeddingDataset(tmp_path, verify=True)
    target = tmp_path / "shard_00001.emb"
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    EmbeddingDataset(tmp_path)  # same size: only the checksum finds it
    with pytest.raises(ValueError, match="shard_00001.emb.*sha256"):
        EmbeddingDataset(tmp_path, verify=True)
    target.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match="shard_00001.emb.*bytes"):
        EmbeddingDataset(tmp_path)
    os.remove(target)
    with pytest.raises(FileNotFoundError, match="shard_00001.emb"):
        EmbeddingDataset(tmp_path)


_CRASH_SCRIPT = """
import os, sys, torch
from megatron_vlm.data.embedding_shards import EmbeddingShardWriter
w = EmbeddingShardWriter(sys.argv[1], {n_img}, {d_enc}, rows_per_shard=4)
for i in range(7):
    w.add(f"img{{i}}", torch.randn({n_img}, {d_enc}, generator=torch.Generator().manual_seed(i)))
os._exit(3)   # a crash: shard 1 (3 rows) is still open
""".format(n_img=N_IMG, d_enc=D_ENC)


def test_writer_resumes_after_crash(tmp_path):
    crashed = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(crashed)], capture_output=True)
    assert proc.returncode == 3, proc.stderr.decode()
    leftovers = sorted(p.name for p in crashed.iterdir())
    assert any(name.endswith(".tmp") for name in leftovers)
    # a stray final-named file of the unfinished shard must not pass for a finished one
    (crashed / "shard_00001.emb").write_bytes(b"junk")
    ds = EmbeddingDataset(crashed)
    assert len(ds) == 4  # only the finished shard is visible

    with EmbeddingShardWriter(crashed, N_IMG, D_ENC, rows_per_shard=4) as w:
        assert w.finished_shards() == {0}
        assert w.written_keys() == {f"img{i}" for i in range(4)}
        assert not any(p.name.endswith(".tmp") or p.name.startswith("shard_00001")
                       for p in crashed.iterdir())
        for i in range(10):
            if f"img{i}" not in w.written_keys():
                w.add(f"img{i}", _emb(i))
        with pytest.raises(ValueError, match="duplicate key 'img2'"):
            w.add("img2", _emb(2))

    fresh = tmp_path / "fresh"
    with EmbeddingShardWriter(fresh, N_IMG, D_ENC, rows_per_shard=4) as w:
        for i in range(10):
            w.add(f"img{i}", _emb(i))
    for name in ("index.json", "shard_00000.emb", "shard_00001.emb", "shard_00002.emb",
                 "shard_00001.records.jsonl"):
        assert (crashed / name).read_bytes() == (fresh / name).read_bytes(), name


def test_flush_shard_meta_and_reopen_checks(tmp_path):
    with EmbeddingShardWriter(tmp_path, N_IMG, D_ENC, rows_per_shard=100) as w:
        w.add("a", _emb(0))
        assert w.flush_shard(meta={"source": "part-0.tar"}) == 0
        assert w.flush_shard() is None
        w.add("b", _emb(1))
    with EmbeddingShardWriter(tmp_path, N_IMG, D_ENC, rows_per_shard=100) as w:
        assert w.finished_shards() == {0, 1} and w.shard_meta(0) == {"source": "part-0.tar"}
        with pytest.raises(RuntimeError, match="another writer"):
            EmbeddingShardWriter(tmp_path, N_IMG, D_ENC)
    with pytest.raises(ValueError, match="dtype='bf16'.*dtype='fp8'"):
        EmbeddingShardWriter(tmp_path, N_IMG, D_ENC, dtype="fp8")
    with pytest.raises(ValueError, match="d_enc=16.*d_enc=8"):
        EmbeddingShardWriter(tmp_path, N_IMG, 8)
    # an error inside the context drops the unfinished shard instead of finishing it
    with pytest.raises(ZeroDivisionError):
        with EmbeddingShardWriter(tmp_path, N_IMG, D_ENC) as w:
            w.add("c", _emb(2))
            1 / 0
    assert len(EmbeddingDataset(tmp_path)) == 2


def test_add_errors_name_key_and_shapes(tmp_path):
    with EmbeddingShardWriter(tmp_path, N_IMG, D_ENC) as w:
        with pytest.raises(ValueError, match=r"'bad'.*\(6, 15\).*\(6, 16\)"):
            w.add("bad", torch.zeros(N_IMG, D_ENC - 1))
        with pytest.raises(ValueError, match=r"'int'.*dtype.*int64"):
            w.add("int", torch.zeros(N_IMG, D_ENC, dtype=torch.int64))
        with pytest.raises(ValueError, match="'nan'.*non-finite"):
            w.add("nan", torch.full((N_IMG, D_ENC), float("nan")))
        with pytest.raises(ValueError, match="'cap'.*caption_tokens"):
            w.add("cap", _emb(0), caption_tokens=[1, -2])
        w.add("ok", _emb(0))
        with pytest.raises(ValueError, match="duplicate key 'ok'"):
            w.add("ok", _emb(1))
    ds = EmbeddingDataset(tmp_path)
    assert len(ds) == 1
    with pytest.raises(KeyError, match="'missing'.*" + str(tmp_path.name)):
        ds.index_of("missing")
    with pytest.raises(IndexError):
        ds.embedding(1)


# ---- instruction shards ----------------------------------------------------------------------

def test_instruction_round_trip(tmp_path):
    rows = []
    rng = np.random.default_rng(0)
    for i in range(7):
        n = int(rng.integers(1, 40))
        rows.append((f"conv{i}", rng.integers(0, 50000, n).tolist(),
                     rng.integers(0, 2, n).tolist(), None if i % 2 else f"img{i}"))
    with InstructionShardWriter(tmp_path, rows_per_shard=3) as w:
        for key, toks, mask, image_key in rows:
            w.add(key, toks, mask, image_key=image_key)
        with pytest.raises(ValueError, match=r"'x'.*loss_mask has 2 entries.*3"):
            w.add("x", [1, 2, 3], [0, 1])
        with pytest.raises(ValueError, match=r"'y'.*loss_mask values"):
            w.add("y", [1, 2], [0, 2])
        with pytest.raises(ValueError, match="duplicate key 'conv0'"):
            w.add("conv0", [1], [1])
    ds = InstructionDataset(tmp_path, verify=True)
    assert len(ds) == 7 and ds.num_shards == 3
    for i, (key, toks, mask, image_key) in enumerate(rows):
        assert ds.key(i) == key and ds.index_of(key) == i
        assert ds.tokens(i).dtype == np.int32 and ds.tokens(i).tolist() == toks
        assert ds.loss_mask(i).dtype == np.uint8 and ds.loss_mask(i).tolist() == mask
        assert ds.image_key(i) == image_key
    assert ds.lengths().tolist() == [len(r[1]) for r in rows]
    with pytest.raises(ValueError, match="format 'megatron-vlm-instructions'"):
        EmbeddingDataset(tmp_path)


# ---- text ------------------------------------------------------------------------------------

def test_text_dataset_and_packed_windows(tmp_path):
    rng = np.random.default_rng(1)
    eos = 0
    docs = [np.append(rng.integers(1, 1000, int(rng.integers(1, 30))), eos) for _ in range(40)]
    info_a = write_text_dataset(str(tmp_path / "a"), docs[:25])
    info_b = write_text_dataset(str(tmp_path / "b"), docs[25:])
    assert info_a["documents"] == 25 and info_a["tokens"] == sum(len(d) for d in docs[:25])
    assert not list(tmp_path.glob("*.tmp"))
    ds = open_text_dataset(str(tmp_path / "a"))
    assert len(ds) == 25 and ds.document_indices.tolist() == list(range(26))
    assert all(np.array_equal(ds[i], docs[i]) for i in range(25)) and ds[0].dtype == np.int32
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        open_text_dataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="at least one document"):
        write_text_dataset(str(tmp_path / "empty"), [])
    assert not list(tmp_path.glob("empty*"))

    L = 16
    unshuffled = PackedTextWindows([str(tmp_path / "a"), str(tmp_path / "b")], L,
                                   shuffle_documents=False)
    stream = np.concatenate(docs)
    assert len(unshuffled) == (len(stream) - 1) // L
    for i in range(len(unshuffled)):
        w = unshuffled.window(i)
        assert w.dtype == np.int64 and w.shape == (L + 1,)
        assert np.array_equal(w, stream[i * L:i * L + L + 1])

    win = PackedTextWindows([open_text_dataset(str(tmp_path / p)) for p in "ab"], L, seed=7)
    epoch0 = np.stack(list(win.iter_windows(0)))
    again = PackedTextWindows([str(tmp_path / "a"), str(tmp_path / "b")], L, seed=7)
    assert np.array_equal(np.stack([again.window(i, 0) for i in reversed(range(len(again)))])[::-1],
                          epoch0)
    assert not np.array_equal(np.stack(list(win.iter_windows(1))), epoch0)
    assert not np.array_equal(epoch0, np.stack(list(unshuffled)))
    # a shuffled epoch is a permutation of whole documents: same token multiset
    order = np.random.default_rng([7, 0]).permutation(40)
    assert np.array_equal(epoch0[:, :-1].ravel(), np.concatenate([docs[j] for j in order])[:len(epoch0) * L])
    with pytest.raises(IndexError):
        win.window(len(win))
