"""Tokenizer loading and tools/preprocess_text.py: JSONL, parquet and plain text to
IndexedDataset shards, malformed records, resume with byte-identical shards, worker pool,
command line."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_vlm.data.text_preprocess import preprocess_text
from megatron_vlm.data.text_shards import open_text_dataset, text_manifest_path, text_shard_prefixes
from megatron_vlm.data.tokenizer import load_tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a red circle is left of a blue square",
    "two green triangles sit above one yellow star",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "numbers like 12 and 345 appear here too",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    tok.add_special_tokens(["<|pad|>"])  # an added token counts toward vocab_size
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 20) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "sp"), vocab_size=80,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    return str(d / "sp.model")


def _docs(n: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} {i}" * (1 + i % 3) for i in range(n)]


def _write_jsonl(path, texts, field="text") -> str:
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t, "id": 1}) + "\n")
    return str(path)


def _documents(prefix: str) -> list[list[int]]:
    out = []
    for p in text_shard_prefixes(prefix):
        ds = open_text_dataset(p)
        out.extend(np.array(ds[i]).tolist() for i in range(len(ds)))
    return out


def _shard_bytes(prefix: str) -> dict[str, bytes]:
    out = {}
    for p in text_shard_prefixes(prefix):
        for ext in (".bin", ".idx"):
            out[os.path.basename(p) + ext] = open(p + ext, "rb").read()
    return out


# ---- tokenizers ------------------------------------------------------------------------------

def test_hf_tokenizer(hf_tokenizer):
    tok = load_tokenizer(hf_tokenizer)
    assert tok.kind == "hf" and tok.eos_id == 0 and tok.token_to_id("<|endoftext|>") == 0
    assert tok.vocab_size == tok.token_to_id("<|pad|>") + 1
    ids = tok.encode("the quick brown fox")
    assert ids and 0 not in ids  # no BOS / EOS added
    assert tok.decode(ids) == "the quick brown fox"
    assert tok.encode_batch(["a red", "hello"]) == [tok.encode("a red"), tok.encode("hello")]
    assert tok.token_to_id("definitely-not-a-token") is None
    # a directory holding tokenizer.json is accepted too
    assert load_tokenizer(os.path.dirname(hf_tokenizer)).eos_id == 0


def test_sentencepiece_tokenizer(sp_model):
    import sentencepiece as spm

    tok = load_tokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.kind == "sentencepiece" and tok.eos_id == sp.eos_id() == tok.token_to_id("</s>")
    assert tok.vocab_size == sp.get_piece_size()
    ids = tok.encode("a red circle")
    assert ids and sp.bos_id() not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "a red circle"
    assert tok.token_to_id("no-such-piece") is None


def test_tokenizer_errors(tmp_path, hf_tokenizer):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "vocab.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unsupported tokenizer file"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="no end-of-document token"):
        load_tokenizer(hf_tokenizer, eos_token="<nope>")
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(garbage)


# ---- preprocess_text -------------------------------------------------------------------------

def test_jsonl_and_parquet_end_to_end(tmp_path, hf_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _docs(23)
    src = tmp_path / "in"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", texts[:10])
    _write_jsonl(src / "b.jsonl", texts[10:])
    summary = preprocess_text([str(src)], hf_tokenizer, str(tmp_path / "out" / "corpus"),
                              docs_per_shard=5, progress=False)
    tok = load_tokenizer(hf_tokenizer)
    assert (summary.documents, summary.shards, summary.skipped) == (23, 5, 0)
    prefixes = text_shard_prefixes(str(tmp_path / "out" / "corpus"))
    assert [os.path.basename(p) for p in prefixes] == [f"corpus_{k:05d}" for k in range(5)]
    got = []
    for p in prefixes:
        ds = open_text_dataset(p)
        # copies: megatron's arrays are views into a map that closes with the dataset
        got.extend(np.array(ds[i]) for i in range(len(ds)))
    assert [len(open_text_dataset(p)) for p in prefixes] == [5, 5, 5, 5, 3]
    assert len(got) == 23
    for text, doc in zip(texts, got):
        assert doc.dtype == np.int32 and doc.tolist() == tok.encode(text) + [tok.eos_id]
    assert summary.tokens == sum(len(d) for d in got) and summary.tokens_per_second > 0
    assert "documents: 23" in summary.lines()

    # the same documents from parquet (one file per column chunk order) give identical shards
    pq.write_table(pa.table({"text": texts, "n": list(range(23))}), tmp_path / "all.parquet",
                   row_group_size=7)
    preprocess_text([str(tmp_path / "all.parquet")], hf_tokenizer, str(tmp_path / "pq" / "corpus"),
                    docs_per_shard=5, progress=False)
    assert _shard_bytes(str(tmp_path / "pq" / "corpus")) == _shard_bytes(str(tmp_path / "out" / "corpus"))
    with pytest.raises(ValueError, match="all.parquet.*no column 'body'"):
        preprocess_text([str(tmp_path / "all.parquet")], hf_tokenizer, str(tmp_path / "x" / "c"),
                        field="body", progress=False)


def test_sentencepiece_and_custom_field(tmp_path, sp_model):
    texts = _docs(4)
    _write_jsonl(tmp_path / "a.jsonl", texts, field="content")
    preprocess_text([str(tmp_path / "a.jsonl")], sp_model, str(tmp_path / "o"), field="content",
                    progress=False)
    tok = load_tokenizer(sp_model)
    ds = open_text_dataset(text_shard_prefixes(str(tmp_path / "o"))[0])
    assert [ds[i].tolist() for i in range(4)] == [tok.encode(t) + [tok.eos_id] for t in texts]


def test_malformed_records_are_counted_then_fatal(tmp_path, hf_tokenizer):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": "fine"}), "{not json", "", json.dumps({"body": "x"}),
             json.dumps({"text": 5}), json.dumps({"text": "also fine"})]
    path.write_text("\n".join(lines) + "\n")
    summary = preprocess_text([str(path)], hf_tokenizer, str(tmp_path / "o"), max_skips=3,
                              progress=False)
    assert summary.documents == 2 and summary.skipped == 3
    assert summary.skipped_records[0].startswith(f"{path}:2: invalid JSON")
    assert summary.skipped_records[1] == f"{path}:4: missing field 'text'"
    assert summary.skipped_records[2] == f"{path}:5: field 'text' is int, not a string"
    assert any(f"{path}:4" in line for line in summary.lines())
    with pytest.raises(ValueError, match=rf"{path}:4: missing field 'text' \(field 'text'\); "
                                         r"more than --max-skips=1"):
        preprocess_text([str(path)], hf_tokenizer, str(tmp_path / "o2"), max_skips=1,
                        progress=False)
    assert not list(tmp_path.glob("o2_*.tmp"))


def test_resume_writes_identical_shards(tmp_path, hf_tokenizer):
    src = _write_jsonl(tmp_path / "c.jsonl", _docs(40))
    ref = str(tmp_path / "ref" / "t")
    preprocess_text([src], hf_tokenizer, ref, docs_per_shard=9, progress=False)
    reference = _shard_bytes(ref)
    assert len(reference) == 10

    # interrupted after the first shard, then resumed
    out = str(tmp_path / "run" / "t")
    first = preprocess_text([src], hf_tokenizer, out, docs_per_shard=9, progress=False,
                            stop_after_shards=1)
    assert first.stopped_early and first.shards_written == 1 and first.documents == 9
    assert not json.load(open(text_manifest_path(out)))["complete"]
    # a crash leaves temp files behind; they are cleaned up
    open(out + "_00001.bin.tmp", "wb").write(b"partial")
    second = preprocess_text([src], hf_tokenizer, out, docs_per_shard=9, progress=False)
    assert (second.shards_reused, second.shards_written, second.documents) == (1, 4, 40)
    assert _shard_bytes(out) == reference
    assert not list((tmp_path / "run").glob("*.tmp"))

    # a deleted last shard and a corrupted one are rewritten; the others are kept
    os.remove(out + "_00004.bin")
    with open(out + "_00002.idx", "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    third = preprocess_text([src], hf_tokenizer, out, docs_per_shard=9, progress=False)
    assert (third.shards_reused, third.shards_written) == (3, 2)
    assert _shard_bytes(out) == reference

    # different settings are refused unless --overwrite
    with pytest.raises(ValueError, match="different settings.*docs_per_shard"):
        preprocess_text([src], hf_tokenizer, out, docs_per_shard=10, progress=False)
    fourth = preprocess_text([src], hf_tokenizer, out, docs_per_shard=10, progress=False,
                             overwrite=True)
    assert fourth.shards == 4 and not os.path.exists(out + "_00004.bin")


def test_an_input_edited_in_place_is_refused_then_rebuilt(tmp_path, hf_tokenizer):
    """An edit that keeps the file's size must not resume on the old shards (the manifest
    holds each input's sha256), and --overwrite rebuilds from the new content."""
    src = tmp_path / "c.jsonl"
    _write_jsonl(src, _docs(12))
    out = str(tmp_path / "run" / "t")
    preprocess_text([str(src)], hf_tokenizer, out, docs_per_shard=5, progress=False)
    before = _shard_bytes(out)
    text = src.read_text()
    edited = text.replace("quick", "QUICK", 1)
    assert edited != text and len(edited) == len(text)
    src.write_text(edited)
    with pytest.raises(ValueError, match=r"the inputs changed since the existing shards were "
                                         rf"written \({src} changed \(same size, different "
                                         r"content\)\).*--overwrite"):
        preprocess_text([str(src)], hf_tokenizer, out, docs_per_shard=5, progress=False)
    assert _shard_bytes(out) == before  # refused without touching the shards
    rebuilt = preprocess_text([str(src)], hf_tokenizer, out, docs_per_shard=5, progress=False,
                              overwrite=True)
    assert rebuilt.shards_written == 3 and rebuilt.shards_reused == 0
    fresh = str(tmp_path / "fresh" / "t")
    preprocess_text([str(src)], hf_tokenizer, fresh, docs_per_shard=5, progress=False)
    assert _shard_bytes(out) == _shard_bytes(fresh) != before


def test_an_empty_corpus_is_a_warning(tmp_path, hf_tokenizer, caplog):
    """No documents is not silent: a warning names the inputs and the manifest (training
    refuses such a corpus: tests/test_loader.py)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = str(tmp_path / "o" / "t")
    with caplog.at_level("WARNING", logger="megatron_vlm"):
        summary = preprocess_text([str(empty)], hf_tokenizer, out, progress=False)
    assert summary.documents == 0 and summary.shards == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(empty) in warned[0] and "hold no documents" in warned[0]
    assert text_manifest_path(out) in warned[0]


def test_worker_pool_gives_same_bytes(tmp_path, hf_tokenizer):
    src = _write_jsonl(tmp_path / "c.jsonl", _docs(30))
    preprocess_text([src], hf_tokenizer, str(tmp_path / "one" / "t"), docs_per_shard=7,
                    chunk_size=4, progress=False)
    preprocess_text([src], hf_tokenizer, str(tmp_path / "two" / "t"), docs_per_shard=7,
                    chunk_size=4, workers=2, progress=False)
    assert _shard_bytes(str(tmp_path / "two" / "t")) == _shard_bytes(str(tmp_path / "one" / "t"))


def test_command_line(tmp_path, hf_tokenizer, repo_root):
    tool = str(repo_root / "tools" / "preprocess_text.py")
    out = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--docs-per-shard" in out.stdout and "--max-skips" in out.stdout
    assert "--txt-document {block,file}" in out.stdout
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "hello world"}) + "\n{oops\n")
    cmd = [sys.executable, tool, "--input", str(src), "--tokenizer", hf_tokenizer,
           "--output-prefix", str(tmp_path / "o" / "t"), "--no-progress"]
    run = subprocess.run(cmd + ["--max-skips", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for words in ("documents: 1", "skipped: 1", f"{src}:2: invalid JSON", "tokens/s"):
        assert words in run.stderr
    fail = subprocess.run(cmd, capture_output=True, text=True)
    assert fail.returncode == 2
    assert f"preprocess_text: error: {src}:2: invalid JSON" in fail.stderr
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "nope.jsonl")] + cmd[4:],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "input not found" in missing.stderr


# ---- plain text ------------------------------------------------------------------------------

def test_plain_text_blocks_files_and_directories(tmp_path, hf_tokenizer):
    """A .txt file is read as blank-line-separated documents ('block') or as one document
    ('file'); directories pick .txt files up beside JSONL, sorted by path."""
    src = tmp_path / "in"
    src.mkdir()
    # A byte order mark, CRLF and whitespace-only lines, runs of blank lines, a last line
    # without a line break.
    (src / "a.txt").write_bytes(b"\xef\xbb\xbf\n  first doc\r\nline two\r\n \t\r\n\n"
                                + "second: caf\u00e9\n\n\n  third  ".encode())
    _write_jsonl(src / "b.jsonl", ["from jsonl"])
    with gzip.open(src / "c.txt.gz", "wb") as f:
        f.write(b"zipped one\n\nzipped two\n")
    (src / "notes.md").write_text("not an input")
    tok = load_tokenizer(hf_tokenizer)
    blocks = preprocess_text([str(src)], hf_tokenizer, str(tmp_path / "blocks" / "t"),
                             progress=False)
    expected = ["  first doc\r\nline two", "second: caf\u00e9", "  third  ", "from jsonl",
                "zipped one", "zipped two"]
    assert (blocks.documents, blocks.skipped) == (6, 0)
    assert _documents(str(tmp_path / "blocks" / "t")) == [tok.encode(t) + [tok.eos_id]
                                                          for t in expected]
    manifest = json.load(open(text_manifest_path(str(tmp_path / "blocks" / "t"))))
    assert [os.path.basename(e["path"]) for e in manifest["inputs"]] == ["a.txt", "b.jsonl",
                                                                         "c.txt.gz"]
    assert manifest["shards"]["0"]["first_record"] == f"{src / 'a.txt'}:2"

    files = preprocess_text([str(src / "a.txt"), str(src / "c.txt.gz")], hf_tokenizer,
                            str(tmp_path / "files" / "t"), txt_document="file", progress=False)
    assert files.documents == 2
    whole = "  first doc\r\nline two\r\n \t\r\n\nsecond: caf\u00e9\n\n\n  third  "
    assert _documents(str(tmp_path / "files" / "t")) == [
        tok.encode(t) + [tok.eos_id] for t in (whole, "zipped one\n\nzipped two")]
    # The mode is a setting of the shards: resuming them in the other mode is refused.
    with pytest.raises(ValueError, match="different settings.*txt_document"):
        preprocess_text([str(src / "a.txt"), str(src / "c.txt.gz")], hf_tokenizer,
                        str(tmp_path / "files" / "t"), progress=False)
    with pytest.raises(ValueError, match="unsupported input type.*\\.txt"):
        preprocess_text([str(src / "notes.md")], hf_tokenizer, str(tmp_path / "x" / "t"),
                        progress=False)
    with pytest.raises(ValueError, match="txt_document='page' must be one of block, file"):
        preprocess_text([str(src)], hf_tokenizer, str(tmp_path / "x" / "t"),
                        txt_document="page", progress=False)


def test_plain_text_not_utf8_names_file_and_line(tmp_path, hf_tokenizer):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good one\n\nstill fine\nna\xefve caf\xe9\n\nlast good\n")
    summary = preprocess_text([str(path)], hf_tokenizer, str(tmp_path / "o" / "t"), max_skips=1,
                              progress=False)
    assert (summary.documents, summary.skipped) == (2, 1)
    assert summary.skipped_records == [
        f"{path}:4: not valid UTF-8 (invalid continuation byte at byte 2); the document of "
        f"lines 3-4 is skipped"]
    with pytest.raises(ValueError) as err:
        preprocess_text([str(path)], hf_tokenizer, str(tmp_path / "o2" / "t"), progress=False)
    assert str(err.value) == (f"{path}:4: not valid UTF-8 (invalid continuation byte at byte 2); "
                              f"the document of lines 3-4 is skipped; more than --max-skips=0 "
                              f"malformed records")


@pytest.mark.parametrize("cut", ["bin_end", "bin_half", "idx_body", "idx_header"])
def test_truncated_text_shard_is_one_clear_line_when_opened(tmp_path, cut):
    """A cut .bin or .idx is named when the data is opened (training start), not found at the
    step that first reads past the end as an unnamed buffer error."""
    from megatron_vlm.data.text_shards import write_text_dataset

    prefix = str(tmp_path / "corpus")
    write_text_dataset(prefix, [list(range(1, n + 1)) for n in (5, 9, 3, 12)])
    assert len(open_text_dataset(prefix)) == 4  # intact
    path = prefix + (".bin" if cut.startswith("bin") else ".idx")
    size = os.path.getsize(path)
    keep = {"bin_end": size - 4, "bin_half": size // 2, "idx_body": size - 8,
            "idx_header": 12}[cut]
    with open(path, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(ValueError) as err:
        open_text_dataset(prefix)
    message = str(err.value)
    assert message.startswith(f"text dataset {'index ' if path.endswith('.idx') else ''}{path} ")
    assert "rerun tools/preprocess_text.py" in message and "\n" not in message
