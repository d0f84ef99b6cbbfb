"""tools/train_tokenizer.py: a byte-level BPE trained on one's own corpus (read as
tools/preprocess_text.py reads it), with the project's special tokens, loaded by the project's
own tokenizer loader; refused outputs and malformed records."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_vlm.cli import is_user_error
from megatron_vlm.config import DataConfig
from megatron_vlm.data.samples import resolve_separator
from megatron_vlm.data.tokenizer import load_tokenizer
from megatron_vlm.data.tokenizer_training import EOS, SEP, train_tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a red circle is left of a blue square",
    "two green triangles sit above one yellow star",
    "numbers like 12 and 345 appear here too",
]


def _corpus(root) -> str:
    """A directory of one JSONL and one plain-text file."""
    root.mkdir()
    with open(root / "a.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"{SENTENCES[i % 4]} {i}"}) + "\n")
    (root / "b.txt").write_text("\n\n".join(SENTENCES * 10) + "\n")
    return str(root)


def test_trained_tokenizer_has_the_project_tokens_and_round_trips(tmp_path):
    out = tmp_path / "tok" / "tokenizer.json"
    summary = train_tokenizer([_corpus(tmp_path / "corpus")], str(out), 400,
                              extra_special_tokens=["<|pad|>"], progress=False)
    assert summary.documents == 100 and not summary.skipped_records
    tok = load_tokenizer(out)  # the loader every data tool and training use
    assert tok.kind == "hf" and 300 < tok.vocab_size <= 400 == summary.requested_vocab_size
    # EOS is found by the loader's own default, the separator by the config's default name.
    assert tok.eos_id == 0 and tok.eos_token == EOS
    assert resolve_separator(tok, DataConfig.separator_token) == 1 == tok.token_to_id(SEP)
    assert summary.special_tokens == {EOS: 0, SEP: 1, "<|pad|>": 2}
    # Each special token is one id inside running text, and never made of other tokens.
    ids = tok.encode(f"a red circle{SEP}two{EOS}<|pad|>")
    assert ids.count(1) == ids.count(0) == ids.count(2) == 1
    assert tok.encode(SEP) == [1] and tok.encode(EOS) == [0]
    # Byte level: text the corpus never held (accents, CJK, emoji, tabs) comes back exactly.
    for text in ["the quick brown fox", "na\u00efve caf\u00e9 \u6771\u4eac \U0001f98a\tend\n",
                 "  leading and trailing  "]:
        assert tok.decode(tok.encode(text)) == text
    # The vocabulary the model needs: at least the tokenizer's, padded to a multiple of 128.
    padded = -(-tok.vocab_size // 128) * 128
    assert f"model.decoder.vocab_size={padded} (at least {tok.vocab_size}" in "\n".join(
        summary.lines())


def test_output_is_refused_unless_overwrite(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "tokenizer.json"
    out.write_text("someone's tokenizer")
    with pytest.raises(ValueError, match=f"{out} exists; use another --output, or --overwrite"):
        train_tokenizer([corpus], str(out), 300, progress=False)
    assert out.read_text() == "someone's tokenizer"
    train_tokenizer([corpus], str(out), 300, overwrite=True, progress=False)
    assert load_tokenizer(out).eos_id == 0
    with pytest.raises(ValueError, match="must be a tokenizer file ending in .json"):
        train_tokenizer([corpus], str(tmp_path / "tok.model"), 300, progress=False)
    inside = tmp_path / "corpus" / "tokenizer.json"
    inside.write_text("{}")
    with pytest.raises(ValueError, match="is one of the inputs"):
        train_tokenizer([corpus], str(inside), 300, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 274"):
        train_tokenizer([corpus], str(tmp_path / "small.json"), 100, progress=False)


def test_malformed_records_are_counted_then_fatal(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join([json.dumps({"text": s}) for s in SENTENCES] + ["{oops"]) + "\n")
    out = tmp_path / "tokenizer.json"
    summary = train_tokenizer([str(src)], str(out), 300, max_skips=1, progress=False)
    assert summary.documents == 4
    assert [r.split(": ")[0] for r in summary.skipped_records] == [f"{src}:5"]
    with pytest.raises(ValueError, match=rf"{src}:5: invalid JSON .*\(field 'text'\); more than "
                                         r"--max-skips=0"):
        train_tokenizer([str(src)], str(tmp_path / "t2.json"), 300, progress=False)
    assert not (tmp_path / "t2.json").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="hold no documents: nothing to train a tokenizer on"):
        train_tokenizer([str(empty)], str(tmp_path / "t3.json"), 300, progress=False)


def test_command_line(tmp_path, repo_root):
    tool = str(repo_root / "tools" / "train_tokenizer.py")
    helped = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for words in ("--vocab-size", "--txt-document", "--special-token", "<|sep|> = 1"):
        assert words in helped.stdout
    # A refused output is a user error, which the tool prints as one line (megatron_vlm.cli;
    # checked in-process: a failing tool's exit imports torch to tear down, seconds here).
    out = tmp_path / "tokenizer.json"
    out.write_text("{}")
    with pytest.raises(ValueError) as err:
        train_tokenizer([_corpus(tmp_path / "corpus")], str(out), 300, progress=False)
    assert is_user_error(err.value) and "\n" not in str(err.value)
