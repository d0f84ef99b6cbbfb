"""tools/preprocess_llava.py end to end on a small LLaVA JSON with images made here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from megatron_vlm.data.instruction_shards import InstructionDataset
from megatron_vlm.data.llava_preprocess import preprocess_llava
from megatron_vlm.data.samples import build_instruction_sample

TOOL = str(REPO_ROOT / "tools" / "preprocess_llava.py")
WORDS = "what color is the square red why paint it hello hi there be brief".split()


def write_tokenizer(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "<sep>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<sep>"])  # matched inside text, as in real tokenizers
    tok.save(str(path))
    return vocab


RECORDS = [
    {"id": "a", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the square"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "why"},
        {"from": "gpt", "value": "paint it"}]},
    {"id": "b", "conversations": [
        {"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello"}]},
    {"id": "c", "image": "coco/missing.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhat color"}, {"from": "gpt", "value": "red"}]},
    {"id": "d", "conversations": [
        {"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]},
    {"id": "a", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "what color\n<image>"}, {"from": "gpt", "value": "red"}]},
    {"id": 17, "image": "vg/2.png", "conversations": [
        {"from": "human", "value": "<image>\nwhy"}, {"from": "gpt", "value": "paint"}]},
    "not a record",
]


@pytest.fixture()
def inputs(tmp_path):
    vocab = write_tokenizer(tmp_path / "tokenizer.json")
    root = tmp_path / "images"
    for rel in ("coco/1.jpg", "vg/2.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\xff\xd8 not decoded here")
    (tmp_path / "llava.json").write_text(json.dumps(RECORDS))
    return tmp_path, vocab


def run(tmp_path, out, **kw):
    args = dict(json_path=str(tmp_path / "llava.json"), image_root=str(tmp_path / "images"),
                tokenizer_path=str(tmp_path / "tokenizer.json"), output_dir=str(out),
                separator_token="<sep>", max_skips=3, progress=False)
    args.update(kw)
    return preprocess_llava(**args)


def test_end_to_end_shards_masks_skips_and_image_list(inputs):
    tmp_path, v = inputs
    out = tmp_path / "out"
    s = run(tmp_path, out, system_prompt="be brief", seq_length=12, num_image_tokens=4)
    assert s.records == 7 and s.written == 4 and s.with_image == 3 and s.text_only == 1
    assert s.skipped == {"malformed": 2, "missing_image": 1, "duplicate_key": 0}
    assert [r.split(":")[0] for r in s.skipped_records] == ["c", "d", "#6"]
    assert "turn 0, field 'from'" in s.skipped_records[1]
    assert "field 'record'" in s.skipped_records[2]
    assert s.renamed_duplicates == 1  # the second "a" is written as "a#2"
    assert s.distinct_images == 2 and s.shards == 1

    ds = InstructionDataset(out)
    assert ds.keys() == ["a", "b", "a#2", "17"]
    assert [ds.image_key(i) for i in range(4)] == ["coco/1.jpg", None, "coco/1.jpg", "vg/2.png"]
    sys_ = [v["be"], v["brief"], 2]
    expected_a = sys_ + [v["what"], v["color"], v["is"], v["the"], v["square"], 2,
                         v["red"], 2, v["why"], 2, v["paint"], v["it"], 2]
    np.testing.assert_array_equal(ds.tokens(0), expected_a)
    np.testing.assert_array_equal(ds.loss_mask(0), [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.tokens(1), sys_ + [v["hi"], v["there"], 2, v["hello"], 2])
    np.testing.assert_array_equal(ds.loss_mask(1), [0, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ds.tokens(2), sys_ + [v["what"], v["color"], 2, v["red"], 2])
    assert s.tokens == sum(len(ds.tokens(i)) for i in range(4))
    assert s.loss_tokens == sum(int(ds.loss_mask(i).sum()) for i in range(4)) == 5 + 2 + 2 + 2
    # with 4 image positions and EOS: a is 21 > 12, b is 9, a#2 is 13 > 12, 17 is 12
    assert s.longer_than_sequence == 2
    assert s.separator_in_text == 0
    assert (out / "images.txt").read_text().splitlines() == ["coco/1.jpg", "vg/2.png"]
    summary = json.loads((out / "preprocess_summary.json").read_text())
    assert summary["written"] == 4 and summary["skipped"]["missing_image"] == 1

    # a stored conversation becomes a training sample with the documented masks
    sample = build_instruction_sample(ds.tokens(1), ds.loss_mask(1), 0, 10, pad_id=1, eos_id=1)
    np.testing.assert_array_equal(sample.loss_mask, [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(sample.labels[5:8], [v["hello"], 2, 1])


def test_resume_keeps_finished_shards_and_matches_an_uninterrupted_run(inputs):
    tmp_path, _ = inputs
    whole = run(tmp_path, tmp_path / "whole", records_per_shard=2)
    # blocks [a b] [c d] [a#2 17] ["not a record"]: the 2nd and 4th have no rows, no shard
    assert whole.shards == 2
    out = tmp_path / "resumed"
    first = run(tmp_path, out, records_per_shard=2, stop_after_shards=1)
    assert first.stopped_early and first.shards == 1 and not (out / "images.txt").exists()
    shard0 = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out) if p.startswith("shard_00000")}
    second = run(tmp_path, out, records_per_shard=2)
    assert second.shards_reused == 1 and second.shards_written == 1 and second.shards == 2
    assert {p: os.stat(out / p).st_mtime_ns for p in shard0} == shard0
    for name in ("written", "with_image", "text_only", "tokens", "loss_tokens", "skipped",
                 "skipped_records", "distinct_images"):
        assert getattr(second, name) == getattr(whole, name), name
    a, b = InstructionDataset(tmp_path / "whole"), InstructionDataset(out)
    assert a.keys() == b.keys()
    for i in range(len(a)):
        np.testing.assert_array_equal(a.tokens(i), b.tokens(i))
        np.testing.assert_array_equal(a.loss_mask(i), b.loss_mask(i))
    # a finished run reruns as a no-op
    third = run(tmp_path, out, records_per_shard=2)
    assert third.shards_written == 0 and third.written == whole.written
    with pytest.raises(ValueError, match=r"different settings \(system_prompt\)"):
        run(tmp_path, out, records_per_shard=2, system_prompt="be brief")


def test_an_input_edited_in_place_is_refused(inputs):
    """Same size, same record count, different words: the input's sha256 is among the
    settings, so the finished shards of the old text are not resumed on."""
    tmp_path, _ = inputs
    out = tmp_path / "o"
    run(tmp_path, out, records_per_shard=2, stop_after_shards=1)
    src = tmp_path / "llava.json"
    text = src.read_text()
    edited = text.replace('"red"', '"why"', 1)
    assert edited != text and len(edited) == len(text)
    src.write_text(edited)
    with pytest.raises(ValueError, match=r"made from .*llava.json with the input JSON changed "
                                         r"since they were written; use another output"):
        run(tmp_path, out, records_per_shard=2)


def test_an_empty_list_is_a_warning(inputs, caplog):
    """An empty LLaVA list (or one whose records are all skipped) writes no conversations:
    a warning says so (training refuses the directory: tests/test_loader.py)."""
    tmp_path, _ = inputs
    (tmp_path / "empty.json").write_text("[]")
    with caplog.at_level("WARNING", logger="megatron_vlm"):
        summary = run(tmp_path, tmp_path / "o", json_path=str(tmp_path / "empty.json"))
    assert summary.written == 0 and summary.shards == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "empty.json holds no usable conversations" in warned[0]


def test_separator_inside_text_is_counted(inputs):
    tmp_path, _ = inputs
    (tmp_path / "sep.json").write_text(json.dumps([
        {"id": "s", "conversations": [{"from": "human", "value": "hi <sep> there"},
                                      {"from": "gpt", "value": "hello"}]},
        RECORDS[1]]))
    s = run(tmp_path, tmp_path / "o", json_path=str(tmp_path / "sep.json"), system_prompt="be")
    assert s.written == 2 and s.separator_in_text == 1


def test_limits_and_bad_input(inputs):
    tmp_path, _ = inputs
    with pytest.raises(ValueError, match=r"record 'c', field 'image': .*missing.jpg not found; "
                                         r"more than --max-skips=0"):
        run(tmp_path, tmp_path / "o1", max_skips=0)
    with pytest.raises(ValueError, match=r"record 'd', turn 0, field 'from'.*--max-skips=1"):
        run(tmp_path, tmp_path / "o2", max_skips=1)
    with pytest.raises(ValueError, match=r"separator token 'two words' is not a single token"):
        run(tmp_path, tmp_path / "o3", separator_token="two words")
    (tmp_path / "bad.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        run(tmp_path, tmp_path / "o4", json_path=str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text('[{"id": 1')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        run(tmp_path, tmp_path / "o5", json_path=str(tmp_path / "broken.json"))
    # an image path leaving the image folder is malformed
    (tmp_path / "escape.json").write_text(json.dumps([{"id": "x", "image": "../tokenizer.json",
                                                       "conversations": RECORDS[1]["conversations"]}]))
    with pytest.raises(ValueError, match=r"record 'x', field 'image'.*inside the image folder"):
        run(tmp_path, tmp_path / "o6", json_path=str(tmp_path / "escape.json"), max_skips=0)


def test_command_line(inputs):
    tmp_path, _ = inputs
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    help_ = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, env=env)
    assert help_.returncode == 0 and "--separator-token" in help_.stdout and "--max-skips" in help_.stdout
    base = [sys.executable, TOOL, "--input", str(tmp_path / "llava.json"),
            "--image-root", str(tmp_path / "images"), "--tokenizer", str(tmp_path / "tokenizer.json"),
            "--separator-token", "<sep>", "--output-dir"]
    ok = subprocess.run(base + [str(tmp_path / "cli"), "--max-skips", "3"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "written: 4 (3 with an image, 1 text-only)" in ok.stderr
    assert "skipped: 3 (malformed 2, missing_image 1, duplicate_key 0)" in ok.stderr
    bad = subprocess.run(base + [str(tmp_path / "cli2")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("preprocess_llava: error: ")
    assert "record 'c', field 'image'" in bad.stderr
