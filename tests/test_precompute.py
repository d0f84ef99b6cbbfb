"""Image decoding (DALI CPU mode against the PIL reference) and tools/precompute_image_embeddings.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali-cuda120) is not installed")

from PIL import Image, ImageDraw  # noqa: E402

from megatron_vlm.config import RESIZE_MODES  # noqa: E402
from megatron_vlm.data.dali_pipeline import ImagePreprocessor  # noqa: E402
from megatron_vlm.data.embedding_shards import EmbeddingDataset  # noqa: E402
from megatron_vlm.data.image_io import (  # noqa: E402
    SIGLIP_NORM,
    encoder_image_norm,
    pil_preprocess,
    resize_geometry,
)
from megatron_vlm.data.image_sources import iter_tar_records  # noqa: E402
from megatron_vlm.data.precompute import SkipLimitExceeded  # noqa: E402
from precompute_helpers import TOOL, drop_last_shard, run_tool, tool  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
S = 56  # the tiny recipe's image size
WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right", "of", "photo"]



def picture(w: int, h: int, seed: int) -> Image.Image:
    """A picture-like test image: flat background, a few ellipses, mild noise."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse([x0, y0, x0 + int(rng.integers(4, w)), y0 + int(rng.integers(4, h))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


SIZES = [(80, 41), (30, 60), (56, 56), (200, 120), (57, 300), (40, 40), (23, 17)]


@pytest.fixture(scope="module")
def samples():
    return [(f"{fmt.lower()}{w}x{h}", encode(picture(w, h, i), fmt))
            for i, (w, h) in enumerate(SIZES) for fmt in ("JPEG", "PNG")]


# ---- decode + resize ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_dali_cpu_matches_pil_reference(samples, mode):
    # batch size 4 over 14 images: three full batches and a last partial one
    pre = ImagePreprocessor(S, mode, SIGLIP_NORM, batch_size=4, device="cpu")
    assert pre.device.type == "cpu" and pre.decoder == "dali"
    out = pre(samples)
    assert out.failures == [] and out.pil_decoded == 0
    assert out.keys == [k for k, _ in samples]
    assert out.images.shape == (len(samples), 3, S, S) and out.images.dtype == torch.float32
    diffs = []
    for (key, data), got in zip(samples, out.images):
        ref = pil_preprocess(data, S, mode, SIGLIP_NORM)
        diffs.append(float((got - ref).abs().mean()))
    # measured: mean abs difference <= 0.003 per image (normalized scale [-1, 1]); same-size
    # images (56x56) come out identical
    assert max(diffs) < 0.01, dict(zip([k for k, _ in samples], diffs))
    same = [d for (k, _), d in zip(samples, diffs) if k.endswith("56x56")]
    assert max(same) < 1e-6


def test_letterbox_keeps_aspect():
    fill = (127 / 255 - 0.5) / 0.5
    wide = encode(Image.new("RGB", (112, 56), (255, 0, 0)), "PNG")   # 2:1 -> 28 rows of image
    tall = encode(Image.new("RGB", (28, 56), (0, 0, 255)), "PNG")    # 1:2 -> 28 columns of image
    pre = ImagePreprocessor(S, "letterbox", batch_size=2, device="cpu")
    out = pre([("wide", wide), ("tall", tall)]).images
    w, t = out[0], out[1]
    # wide: padding rows top (0..13) and bottom (42..55), red rows in the middle; the bicubic
    # filter blends two rows on each side of the edges
    red, blue = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1), torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
    assert torch.allclose(w[:, :12], torch.full_like(w[:, :12], fill), atol=1e-3)
    assert torch.allclose(w[:, 44:], torch.full_like(w[:, 44:], fill), atol=1e-3)
    assert torch.allclose(w[:, 16:40], red.expand(3, 24, S), atol=1e-3)
    # tall: padding columns left and right
    assert torch.allclose(t[:, :, :12], torch.full_like(t[:, :, :12], fill), atol=1e-3)
    assert torch.allclose(t[:, :, 44:], torch.full_like(t[:, :, 44:], fill), atol=1e-3)
    assert torch.allclose(t[:, :, 16:40], blue.expand(3, S, 24), atol=1e-3)
    # the other modes fill the whole square with image
    for mode in ("resize-naive", "resize-crop"):
        o = ImagePreprocessor(S, mode, batch_size=1, device="cpu")([("wide", wide)]).images[0]
        assert torch.allclose(o, red.expand(3, S, S), atol=1e-3)


def test_geometry():
    g = resize_geometry(200, 100, 50, "letterbox")
    assert (g.anchor, g.window, g.resize, g.pad_first) == ((-50, 0), (200, 200), (50, 50), True)
    g = resize_geometry(101, 50, 50, "letterbox")
    assert g.anchor == (-25, 0) and g.window == (101, 101)
    g = resize_geometry(100, 300, 50, "resize-crop")   # shorter side 50, longer 150
    assert g.resize == (150, 50) and g.anchor == (50, 0) and g.window == (50, 50)
    g = resize_geometry(75, 50, 50, "resize-crop")     # 75 wide: offset round(12.5) = 12
    assert g.resize == (50, 75) and g.anchor == (0, 12)
    g = resize_geometry(77, 50, 50, "resize-crop")     # 77 wide: offset round(13.5) = 14
    assert g.resize == (50, 77) and g.anchor == (0, 14)
    with pytest.raises(ValueError, match="resize mode"):
        resize_geometry(10, 10, 5, "squash")


def test_norm_from_open_clip_config():
    from megatron_vlm.config import load_config

    cfg = load_config("tiny")
    assert encoder_image_norm(cfg.model.encoder) == SIGLIP_NORM        # custom tower
    so400m = load_config("tiny", ["model.encoder.open_clip_model=ViT-SO400M-14-SigLIP-384",
                                  "model.encoder.custom_vision_cfg=null"])
    norm = encoder_image_norm(so400m.model.encoder)
    assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5) and norm.interpolation == "bicubic"
    assert norm.fill == (127, 127, 127)


def test_bad_images_are_reported_by_key(samples):
    good = samples[0][1]
    truncated = good[: len(good) // 2]
    png = bytearray(encode(picture(80, 60, 9), "PNG"))   # damaged pixel data, intact end marker
    n = len(png)
    png[n // 2: n // 2 + 300] = bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8))
    pre = ImagePreprocessor(S, "letterbox", batch_size=8, device="cpu")
    out = pre([("ok1", good), ("trunc", truncated), ("garbage", b"not an image" * 9), ("empty", b""),
               ("badpng", bytes(png)), ("ok2", good)])
    assert out.keys == ["ok1", "ok2"]
    reasons = {f.key: f.reason for f in out.failures}
    assert reasons == {"trunc": "corrupt", "garbage": "unreadable", "empty": "unreadable", "badpng": "corrupt"}
    assert pre.dali_failures == 1   # the damaged PNG failed a DALI batch; the others were kept
    ref = pil_preprocess(good, S, "letterbox")
    assert float((out.images[0] - ref).abs().mean()) < 0.01


# ---- the tool -----------------------------------------------------------------------------------

CAPTIONS = ["a red circle", "the blue square on the left", "a green photo", "a circle of squares",
            "red on blue", "the photo on the right", "a blue circle", "green left right"]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """The tiny recipe's encoder with seeded random weights, saved as a local weights file."""
    from megatron_vlm.config import load_config
    from megatron_vlm.model.vision_encoder import build_vision_encoder

    torch.manual_seed(7)
    enc = build_vision_encoder(load_config("tiny").model.encoder)
    path = tmp_path_factory.mktemp("w") / "tiny_tower.pt"
    torch.save(enc.visual.state_dict(), path)
    return str(path)


def _encoder(weights_path):
    from megatron_vlm.config import load_config
    from megatron_vlm.model.vision_encoder import build_vision_encoder

    return build_vision_encoder(load_config("tiny", [f"model.encoder.weights_path={weights_path}"]).model.encoder)


def _tar(path: Path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tar_inputs(tmp_path_factory):
    """Two shards, 8 keys: JPEG/PNG of various sizes, .txt or .json captions, one truncated JPEG,
    one key without an image. Returns (directory, {key: (image bytes or None, caption)})."""
    root = tmp_path_factory.mktemp("tars")
    sizes = [(56, 56), (80, 41), (30, 60), (120, 90), (56, 56), (64, 70), (90, 33), (56, 56)]
    expected = {}
    for shard in range(2):
        members = []
        for j in range(4):
            i = shard * 4 + j
            key = f"{shard:05d}{j:04d}"
            fmt = "PNG" if i % 3 == 1 else "JPEG"
            data = encode(picture(*sizes[i], seed=100 + i), fmt)
            if key == "000000002":
                data = data[: len(data) // 3]          # truncated download
            ext = "png" if fmt == "PNG" else "jpg"
            if key != "000010001":                     # this key has a caption but no image
                members.append((f"{key}.{ext}", data))
            if i % 2:
                members.append((f"{key}.json", json.dumps({"uid": key, "caption": CAPTIONS[i]}).encode()))
            else:
                members.append((f"{key}.txt", CAPTIONS[i].encode()))
            expected[key] = (None if key == "000010001" else data, CAPTIONS[i])
        _tar(root / f"shard-{shard:03d}.tar", members)
    return root, expected


def _check_against_encoder(out_dir, expected, weights_path, mode, tok_path=None):
    from megatron_vlm.data.tokenizer import load_tokenizer

    ds = EmbeddingDataset(out_dir, verify=True)
    good = [k for k, (data, _) in expected.items()
            if data is not None and k != "000000002"]
    assert ds.keys() == good
    assert (ds.n_img, ds.d_enc) == (16, 32)
    enc = _encoder(weights_path)
    tok = load_tokenizer(tok_path) if tok_path else None
    dali = ImagePreprocessor(S, mode, batch_size=8, device="cpu")([(k, expected[k][0]) for k in good]).images
    with torch.no_grad():
        via_pil = enc(torch.stack([pil_preprocess(expected[k][0], S, mode) for k in good]))
        via_dali = enc(dali)
    for i, key in enumerate(good):
        stored = ds.embedding(ds.index_of(key)).float()
        assert ds.embedding(ds.index_of(key)).dtype == torch.bfloat16 and stored.shape == (16, 32)
        # the encoder on the same preprocessed pixels: equal up to bf16 rounding
        torch.testing.assert_close(stored, via_dali[i], rtol=1e-2, atol=1e-2)
        if Image.open(io.BytesIO(expected[key][0])).size == (S, S):
            # no resize: DALI and PIL pixels are identical, so is the embedding
            torch.testing.assert_close(stored, via_pil[i], rtol=1e-2, atol=1e-2)
        else:
            # resized: interpolation rounding (about 0.002 per pixel) moves the output slightly
            assert float((stored - via_pil[i]).abs().mean()) < 0.01
            assert float(torch.nn.functional.cosine_similarity(stored.flatten(), via_pil[i].flatten(), dim=0)) > 0.999
        caption = expected[key][1]
        want = tok.encode(caption) if tok else []
        assert ds.caption_tokens(ds.index_of(key)).tolist() == want
    return ds


def test_tool_tar_end_to_end(tmp_path, tar_inputs, weights, tok_path, caplog):
    root, expected = tar_inputs
    out = tmp_path / "emb"
    assert run_tool("--recipe", "tiny", f"model.encoder.weights_path={weights}", "--tar", root,
                    "--output", out, "--tokenizer", tok_path, "--batch-size", 3, "--rows-per-shard", 4,
                    "--max-skips", 2, "--no-progress") == 0
    _check_against_encoder(out, expected, weights, "letterbox", tok_path)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["key"], s["reason"]) for s in skipped] == [("000000002", "corrupt"), ("000010001", "missing")]
    assert "shard-000.tar" in skipped[0]["source"]
    text = caplog.text
    assert "images embedded   6" in text and "corrupt: 1, missing: 1" in text
    assert "000000002 (corrupt)" in text
    manifest = json.loads((out / "precompute.json").read_text())
    assert manifest["settings"]["resize"] == "letterbox" and manifest["settings"]["n_img"] == 16


def test_tool_over_max_skips_stops(tmp_path, tar_inputs, weights):
    root, _ = tar_inputs
    out = tmp_path / "emb"
    with pytest.raises(SkipLimitExceeded, match=r"2 images skipped, more than --max-skips=1.*'000010001'"):
        run_tool("--recipe", "tiny", f"model.encoder.weights_path={weights}", "--tar", root / "shard-000.tar",
                 root / "shard-001.tar", "--output", out, "--batch-size", 2, "--rows-per-shard", 2, "--max-skips", 1,
                 "--no-progress")
    # the shard finished before the stop is kept; the skipped keys are listed
    assert EmbeddingDataset(out).keys() == ["000000000", "000000001"]
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 2


def test_tool_resume_writes_identical_files(tmp_path, tar_inputs, weights, tok_path, caplog):
    root, _ = tar_inputs
    out = tmp_path / "emb"
    args = ["--recipe", "tiny", f"model.encoder.weights_path={weights}", "--tar", root, "--output", out,
            "--tokenizer", tok_path, "--batch-size", 2, "--rows-per-shard", 3, "--max-skips", 5, "--no-progress"]
    run_tool(*args)
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith(("shard_", "index"))}
    assert len([n for n in first if n.endswith(".emb")]) == 2
    # interrupted before the last shard was finished: it is not in the index, its files are gone
    drop_last_shard(out)
    caplog.clear()
    run_tool(*args)
    assert "already done      3 " in caplog.text and "images embedded   3 " in caplog.text
    second = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith(("shard_", "index"))}
    assert second.keys() == first.keys()
    for name in first:
        if name != "index.json":
            assert second[name] == first[name], name
    assert json.loads(second["index.json"]) == json.loads(first["index.json"])
    # a third run finds everything done and changes nothing
    caplog.clear()
    run_tool(*args)
    assert "already done      6 " in caplog.text and "images embedded   0 " in caplog.text
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("shard_")} == \
        {n: b for n, b in first.items() if n.startswith("shard_")}
    # other settings into the same directory are refused
    with pytest.raises(ValueError, match="resize: 'letterbox' before, 'resize-crop' now"):
        run_tool(*args, "--resize", "resize-crop")


def _cut_after(src: Path, dst: Path, members: int, extra: int = 0) -> None:
    """``src`` cut after its first ``members`` members (plus ``extra`` bytes): at a member
    boundary the end-of-archive blocks are simply missing, as after an interrupted copy."""
    with tarfile.open(src) as tf:
        offset = tf.getmembers()[members].offset
    dst.write_bytes(src.read_bytes()[:offset + extra])


def test_a_truncated_tar_is_an_error_naming_it(tmp_path, tar_inputs, weights):
    root, _ = tar_inputs
    cut = tmp_path / "cut.tar"
    _cut_after(root / "shard-000.tar", cut, members=4)   # keys 000000000 and 000000001 complete
    out = tmp_path / "emb"
    args = ["--recipe", "tiny", f"model.encoder.weights_path={weights}", "--output", out,
            "--rows-per-shard", 1, "--batch-size", 1, "--no-progress"]
    with pytest.raises(ValueError, match=rf"{cut}: truncated or damaged tar: it ends without the "
                                         r"end-of-archive blocks after member '000000001.json'"):
        run_tool(*args, "--tar", cut)
    # the last key before the cut is not written (its other members may be lost)
    assert "000000001" not in EmbeddingDataset(out)
    # cut inside a member's data, or inside a header: also an error naming the tar
    for extra in (700, 100):
        _cut_after(root / "shard-000.tar", cut, members=4, extra=extra)
        with pytest.raises(ValueError, match=rf"{cut}: (not a readable|truncated or damaged) tar"):
            list(iter_tar_records([str(cut)]))
    # a complete copy resumes the run (the inputs are the same paths)
    cut.write_bytes((root / "shard-000.tar").read_bytes())
    run_tool(*args, "--tar", cut, "--max-skips", 1)
    assert EmbeddingDataset(out).keys() == ["000000000", "000000001", "000000003"]


def test_an_output_directory_of_other_data_is_refused(tmp_path, tar_inputs, weights):
    root, _ = tar_inputs
    args = ["--recipe", "tiny", f"model.encoder.weights_path={weights}", "--no-progress",
            "--max-skips", 1]
    foreign = tmp_path / "text"
    foreign.mkdir()
    (foreign / "shard_00000.bin").write_bytes(b"someone else's shard")
    with pytest.raises(ValueError, match=rf"--output {foreign} is not empty and holds no "
                                         r"precompute.json"):
        run_tool(*args, "--tar", root / "shard-000.tar", "--output", foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["shard_00000.bin"]   # untouched
    # the output of a run on other inputs: not appended to
    out = tmp_path / "emb"
    run_tool(*args, "--tar", root / "shard-000.tar", "--output", out)
    keys = EmbeddingDataset(out).keys()
    with pytest.raises(ValueError, match=r"inputs: 1 files before, 1 now; input 1 was "
                                         r"'.*shard-000.tar', is '.*shard-001.tar' now"):
        run_tool(*args, "--tar", root / "shard-001.tar", "--output", out)
    assert EmbeddingDataset(out).keys() == keys


def test_tool_folder_jsonl_and_image_list(tmp_path, weights):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    expected, lines = {}, []
    for i, (w, h) in enumerate([(56, 56), (70, 50), (40, 90), (56, 56)]):
        rel = f"sub/img{i}.{'png' if i % 2 else 'jpg'}"
        data = encode(picture(w, h, 200 + i), "PNG" if i % 2 else "JPEG")
        (folder / rel).write_bytes(data)
        expected[f"k{i}"] = (data, CAPTIONS[i])
        lines.append({"key": f"k{i}", "image": rel, "caption": CAPTIONS[i]})
    lines.insert(2, {"key": "gone", "image": "sub/nope.jpg", "caption": "x"})
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "emb"
    run_tool("--recipe", "tiny", f"model.encoder.weights_path={weights}", "--image-folder", folder,
             "--jsonl", jsonl, "--output", out, "--resize", "resize-crop", "--max-skips", 1, "--no-progress")
    _check_against_encoder(out, expected, weights, "resize-crop")   # no tokenizer: no caption tokens
    assert json.loads((out / "skipped.jsonl").read_text())["key"] == "gone"

    # an image list: relative paths are the keys
    lst = tmp_path / "images.txt"
    lst.write_text("sub/img1.png\nsub/img0.jpg\n")
    out2 = tmp_path / "emb2"
    run_tool("--recipe", "tiny", f"model.encoder.weights_path={weights}", "--image-folder", folder,
             "--image-list", lst, "--output", out2, "--resize", "resize-naive", "--no-progress")
    assert EmbeddingDataset(out2).keys() == ["sub/img1.png", "sub/img0.jpg"]

    # a malformed JSONL line is an error naming file, line and field
    jsonl.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"key": "k9", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: field 'image'"):
        run_tool("--recipe", "tiny", f"model.encoder.weights_path={weights}", "--jsonl", jsonl,
                 "--image-folder", folder, "--output", tmp_path / "emb3", "--no-progress")


def test_tool_random_weights_need_the_flag(tmp_path, tar_inputs):
    root, _ = tar_inputs
    proc = subprocess.run([sys.executable, str(TOOL), "--recipe", "tiny", "--tar", str(root),
                           "--output", str(tmp_path / "emb"), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "model.encoder.weights_path is null" in proc.stderr and "--allow-random-weights" in proc.stderr
    assert not (tmp_path / "emb").exists()
    out = tmp_path / "emb_random"
    run_tool("--recipe", "tiny", "--allow-random-weights", "--tar", root, "--output", out,
             "--max-skips", 2, "--dtype", "fp8", "--no-progress")
    ds = EmbeddingDataset(out)
    assert len(ds) == 6 and ds.dtype == "fp8"


def test_tool_help(capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--tar", "--image-folder", "--jsonl", "--image-list", "--tokenizer", "--output",
                   "--resize", "--batch-size", "--recipe", "--dtype", "--max-skips", "--device",
                   "--allow-random-weights", "letterbox", "resize-crop"):
        assert option in text
