"""The online-encoder data path on ShapesWorld: image shards written by
tools/precompute_image_embeddings.py --store images, batches that carry ``images`` through the
same blend index as embedding shards, the mode/kind mismatch errors, the directory's resize
mode, and the encoder trained (or kept bitwise fixed) through the real loader."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali-cuda120) is not installed")

from megatron_vlm.config import load_config  # noqa: E402
from megatron_vlm.data.dali_pipeline import ImagePreprocessor  # noqa: E402
from megatron_vlm.data.embedding_shards import EmbeddingDataset  # noqa: E402
from megatron_vlm.data.image_io import SIGLIP_NORM  # noqa: E402
from megatron_vlm.data.image_shards import ImageDataset, ImageShardWriter  # noqa: E402
from megatron_vlm.data.loader import BlendLoader, DataSources, build_index  # noqa: E402
from megatron_vlm.data.precompute import SkipLimitExceeded  # noqa: E402
from precompute_helpers import drop_last_shard, run_tool  # noqa: E402

S = 56  # the tiny recipe's image size
TRUNCATED, MISSING = "corrupt-000000", "corrupt-000001"  # ShapesWorld --corrupt 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """ShapesWorld with two corrupt items (a truncated JPEG, a missing image) in captions and
    conversations; text and instruction shards; the caption and instruction images both as
    embedding shards (random encoder) and as image shards, by the real tool."""
    from megatron_vlm.data.llava_preprocess import preprocess_llava
    from megatron_vlm.data.text_preprocess import preprocess_text
    from megatron_vlm.synthetic.generate import ShapesWorldConfig, generate

    root = tmp_path_factory.mktemp("online")
    raw = root / "raw"
    generate(raw, ShapesWorldConfig(images=40, llava_images=32, eval_images=4, text_docs=300,
                                    llava_max_turns=2, size=S, corrupt=2, sentencepiece=False,
                                    shard_size=16),
             progress=False, fsync=False)
    tokenizer = raw / "tokenizer" / "tokenizer.json"
    preprocess_text([str(raw / "text" / "corpus.jsonl")], str(tokenizer),
                    str(root / "text" / "corpus"), progress=False)
    # the missing image's conversation is skipped here; the truncated one's is written
    preprocess_llava(str(raw / "llava" / "llava_instruct.json"), str(raw / "llava" / "images"),
                     str(tokenizer), str(root / "instructions"), "<|sep|>", max_skips=1,
                     seq_length=128, num_image_tokens=16, progress=False)
    common = ["--recipe", "tiny", "--no-progress", "--batch-size", 8]
    captions = ["--tar", raw / "captions", "--tokenizer", tokenizer, "--max-skips", 2]
    images = ["--image-folder", raw / "llava" / "images", "--image-list",
              root / "instructions" / "images.txt", "--max-skips", 1]
    for store, name in (("embeddings", "emb"), ("images", "img")):
        extra = ["--allow-random-weights"] if store == "embeddings" else []
        assert run_tool(*common, *extra, "--store", store, *captions,
                        "--output", root / name / "captions") == 0
        assert run_tool(*common, *extra, "--store", store, *images,
                        "--output", root / name / "instruction_images") == 0
    return root


def config(world, kind: str, *overrides):
    """The tiny recipe on ``world``'s shards: ``kind`` 'emb' (embedding shards) or 'img'."""
    return load_config("tiny", [
        "data.kind=blend", f"data.tokenizer={world}/raw/tokenizer/tokenizer.json",
        f"data.text={world}/text/corpus", f"data.captions={world}/{kind}/captions",
        f"data.instructions={world}/instructions",
        f"data.instruction_images={world}/{kind}/instruction_images",
        "data.ratios={text: 0.5, captions: 0.3, instructions: 0.2}", "data.max_skips=1",
        f"output_dir={world}/run", "train.train_iters=6", "data.num_workers=0",
        f"model.encoder.mode={'online' if kind == 'img' else 'precomputed'}", *overrides])


def open_sources(cfg, with_encoder: bool = True) -> DataSources:
    enc = cfg.model.encoder
    return DataSources(cfg.data, cfg.train.seq_length, enc.num_image_tokens, enc.embed_dim,
                       cfg.model.decoder.vocab_size, encoder=enc if with_encoder else None)


def make_loader(cfg, workers: int = 0):
    sources = open_sources(cfg)
    index = build_index(sources, cfg)
    return BlendLoader(sources, index, 0, 1, cfg.train.micro_batch_size, num_workers=workers), index


def tar_members(directory) -> dict:
    out = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out[member.name[:-4]] = tar.extractfile(member).read()
    return out


# ------------------------------------------------------------------------------- the tool


def test_store_images_keeps_the_decodable_files_as_read(world):
    images, embeddings = ImageDataset(world / "img" / "captions", verify=True), \
        EmbeddingDataset(world / "emb" / "captions")
    # the same records in the same order as the embedding run, the corrupt ones skipped
    assert images.keys() == embeddings.keys() and len(images) == 40
    assert TRUNCATED not in images and MISSING not in images
    members = tar_members(world / "raw" / "captions")
    for i in range(len(images)):
        key = images.key(i)
        assert images.image_bytes(i) == members[key], key  # stored as read, not re-encoded
        assert images.image_format(i) == "JPEG"
        assert images.caption_tokens(i).tolist() == embeddings.caption_tokens(i).tolist()
        assert images.caption_tokens(i).size > 0
    skipped = [json.loads(line) for line in
               (world / "img" / "captions" / "skipped.jsonl").read_text().splitlines()]
    assert sorted((s["key"], s["reason"]) for s in skipped) == [(TRUNCATED, "corrupt"),
                                                                  (MISSING, "missing")]
    settings = json.loads((world / "img" / "captions" / "precompute.json").read_text())["settings"]
    assert settings["store"] == "images" and settings["resize"] == "letterbox"
    assert images.resize_mode == "letterbox"
    # the instruction images: keyed by path, the truncated one skipped
    instruction_images = ImageDataset(world / "img" / "instruction_images")
    assert instruction_images.keys() == EmbeddingDataset(world / "emb" / "instruction_images").keys()
    assert not any(TRUNCATED in k for k in instruction_images.keys())


def test_store_images_resumes_to_identical_files_and_stops_over_max_skips(world, tmp_path,
                                                                         caplog):
    out = tmp_path / "img"
    inputs = ["--recipe", "tiny", "--store", "images", "--tar", world / "raw" / "captions",
              "--tokenizer", world / "raw" / "tokenizer" / "tokenizer.json", "--batch-size", 4,
              "--rows-per-shard", 7, "--no-progress"]
    args = [*inputs, "--output", out, "--max-skips", 2]
    assert run_tool(*args) == 0
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("shard_")}
    # interrupted before the last shard was finished: not in the index, its files gone
    dropped = drop_last_shard(out)
    caplog.clear()
    assert run_tool(*args) == 0
    assert f"already done      {40 - dropped} " in caplog.text
    assert f"images stored     {dropped} " in caplog.text
    second = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("shard_")}
    assert second == first
    # loaded with another resize mode than the shards were written for: refused
    with pytest.raises(ValueError, match="resize: 'letterbox' before, 'resize-crop' now"):
        run_tool(*args, "--resize", "resize-crop")
    # an embedding directory is not continued with images
    with pytest.raises(ValueError, match="store: None before, 'images' now"):
        run_tool(*inputs, "--output", world / "emb" / "captions", "--max-skips", 2)
    # images are stored as read: no embedding dtype to choose
    with pytest.raises(SystemExit):
        run_tool(*inputs, "--output", tmp_path / "other", "--dtype", "fp8")
    # more corrupt items than --max-skips: stops naming the last one
    with pytest.raises(SkipLimitExceeded, match=f"2 images skipped, more than --max-skips=1.*{MISSING}"):
        run_tool(*inputs, "--output", tmp_path / "other", "--max-skips", 1)


# ------------------------------------------------------------------------------ the loader


def test_online_batches_carry_images_through_the_same_blend_index(world):
    online_cfg, precomputed_cfg = config(world, "img"), config(world, "emb")
    online, index = make_loader(online_cfg)
    precomputed, same = make_loader(precomputed_cfg)
    # the blend index counts caption positions from caption tokens alone: identical
    for name in ("source_ids", "sample_ids", "cumulative_tokens", "cumulative_sequences"):
        assert np.array_equal(getattr(index, name), getattr(same, name)), name
    # the conversation whose image was truncated is a counted skip in both modes
    sources = online.dataset.sources
    assert sources.skipped == {"instructions: image not in data.instruction_images": [TRUNCATED]}
    assert precomputed.dataset.sources.skipped == sources.skipped
    reference = ImagePreprocessor(S, "letterbox", SIGLIP_NORM, batch_size=8, device="cpu")
    stores = {"captions": ImageDataset(world / "img" / "captions"),
              "instructions": ImageDataset(world / "img" / "instruction_images")}
    images_seen = set()
    for step in range(online_cfg.train.train_iters):
        source_ids, sample_ids = index.batch(step)
        a_step, b_step = online.next_step(), precomputed.next_step()
        for m, (a, b) in enumerate(zip(a_step, b_step)):
            assert "image_embeddings" not in a
            for key in ("tokens", "labels", "loss_mask", "image_mask", "source_ids"):
                assert torch.equal(a[key], b[key]), key
            rows = a["image_mask"].any(dim=1)
            if not rows.any():
                assert "images" not in a
                continue
            assert a["images"].dtype == torch.float32
            assert tuple(a["images"].shape) == (int(rows.sum()), 3, S, S)
            assert a["images"].shape[0] == b["image_embeddings"].shape[0]
            # each row's image is its own record's, preprocessed as the precompute tool does
            mb = online_cfg.train.micro_batch_size
            wanted = []
            for r in range(mb):
                name = index.source_names[int(source_ids[m * mb + r])]
                sample = sources.sample(name, int(sample_ids[m * mb + r]))
                if sample.has_image:
                    store = stores[name]
                    wanted.append((sample.image_key,
                                   store.image_bytes(store.index_of(sample.image_key))))
                    images_seen.add(name)
            torch.testing.assert_close(a["images"], reference(wanted).images, rtol=0, atol=1e-6)
    assert images_seen == {"captions", "instructions"}


def test_loader_workers_decode_the_same_images(world):
    cfg = config(world, "img")
    in_process, _ = make_loader(cfg)
    workers, _ = make_loader(cfg, workers=2)
    for _ in range(3):
        for a, b in zip(in_process.next_step(), workers.next_step()):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key


def test_loader_resizes_with_the_directorys_resize_mode(world, tmp_path):
    """Non-square images written for resize-crop are cropped, not letterboxed, by the loader."""
    from PIL import Image, ImageDraw

    from megatron_vlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(world / "raw" / "tokenizer" / "tokenizer.json"))
    files = []
    with ImageShardWriter(tmp_path / "crop", resize_mode="resize-crop") as writer:
        for i in range(6):
            im = Image.new("RGB", (120, 50), (250, 250, 250))
            ImageDraw.Draw(im).rectangle([5 + 7 * i, 5, 40 + 9 * i, 45], fill=(200, 20 * i, 30))
            buf = io.BytesIO()
            im.save(buf, "PNG")
            files.append((f"wide-{i}", buf.getvalue()))
            writer.add(f"wide-{i}", buf.getvalue(), tok.encode(f"a red shape number {i}"))
        with pytest.raises(ValueError, match="record 'junk': image is not usable"):
            writer.add("junk", b"<html>not found</html>")
    cfg = config(world, "img", f"data.captions={tmp_path}/crop", "data.ratios={captions: 1.0}",
                 "train.global_batch_size=6", "train.micro_batch_size=6", "train.train_iters=1")
    loader, index = make_loader(cfg)
    (batch,) = loader.next_step()
    keys = [files[int(i)] for i in index.batch(0)[1]]
    crop = ImagePreprocessor(S, "resize-crop", SIGLIP_NORM, batch_size=8, device="cpu")(keys).images
    letterbox = ImagePreprocessor(S, "letterbox", SIGLIP_NORM, batch_size=8, device="cpu")(keys).images
    torch.testing.assert_close(batch["images"], crop, rtol=0, atol=1e-6)
    assert float((batch["images"] - letterbox).abs().mean()) > 0.1


def test_mode_and_directory_kind_mismatches_stop_with_one_clear_error(world):
    # online with embedding shards
    with pytest.raises(ValueError) as err:
        open_sources(config(world, "emb", "model.encoder.mode=online"))
    message = str(err.value)
    assert "\n" not in message
    for part in (f"data.captions={world}/emb/captions", "'megatron-vlm-embeddings'",
                 "model.encoder.mode=online", "--store images"):
        assert part in message, (part, message)
    # precomputed with image shards
    with pytest.raises(ValueError) as err:
        open_sources(config(world, "img", "model.encoder.mode=precomputed"))
    message = str(err.value)
    for part in (f"data.captions={world}/img/captions", "'megatron-vlm-images'",
                 "model.encoder.mode=precomputed", "--store embeddings"):
        assert part in message, (part, message)
    # one source of each kind: the instruction images are named
    with pytest.raises(ValueError, match=r"data\.instruction_images=.*/emb/instruction_images"):
        open_sources(config(world, "img", f"data.instruction_images={world}/emb/instruction_images"))
    # sources opened without the encoder config cannot feed an online run: they read as
    # precomputed, and say so
    with pytest.raises(ValueError, match=r"opened without the encoder config.*encoder=cfg"):
        open_sources(config(world, "img"), with_encoder=False)
    cfg = config(world, "emb", "model.encoder.mode=online")
    with pytest.raises(RuntimeError, match="opened for model.encoder.mode=precomputed but the run "
                                         "has model.encoder.mode=online"):
        build_index(open_sources(cfg, with_encoder=False), cfg)


def test_the_tiny_cpu_ablation_reads_the_prepared_image_shards():
    from megatron_vlm.data.prepare import PreparedData

    prepared = PreparedData.at("runs/tiny_cpu/data")
    online = dict(item.split("=", 1) for item in prepared.online_overrides())
    assert online["data.captions"] == str(prepared.online_captions)
    assert online["data.instruction_images"] == str(prepared.online_instruction_images)
    assert online["data.text"] == str(prepared.text)
    for stage, keys in (("ablation_unfrozen_encoder", ["captions"]),
                        ("ablation_unfrozen_encoder_finetune", ["captions", "instruction_images"])):
        cfg = load_config(f"examples/tiny_cpu/{stage}.yaml")
        assert cfg.model.encoder.mode == "online" and cfg.model.encoder.frozen is False
        for key in keys:
            assert getattr(cfg.data, key) == online[f"data.{key}"], (stage, key)


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("frozen", [True, False])
def test_encoder_trains_unfrozen_and_stays_bitwise_fixed_frozen(world, runtime, frozen):
    from megatron_vlm.model.build import build_model
    from megatron_vlm.training.step import setup_training, train_step

    cfg = config(world, "img", f"model.encoder.frozen={str(frozen).lower()}", "train.lr=3e-3",
                 "train.train_iters=3", "data.ratios={captions: 0.6, instructions: 0.4}")
    torch.manual_seed(0)
    model = build_model(cfg)
    state = setup_training(model, cfg)
    encoder = model.vision_encoder
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    in_optimizer = {id(p) for group in state.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in encoder.parameters() if p.requires_grad}
    loader, _ = make_loader(cfg)
    for _ in range(3):
        mbs = loader.next_step()
        assert all("images" in mb and "image_embeddings" not in mb for mb in mbs)
        assert np.isfinite(train_step(state, iter(mbs), len(mbs), cfg)["loss"])
    changed = [name for name, p in encoder.named_parameters() if not torch.equal(p, before[name])]
    if frozen:
        assert changed == [] and not trainable
        assert not {id(p) for p in encoder.parameters()} & in_optimizer
    else:
        # the patch-token path trains (the unused pooling head, if any, stays fixed)
        assert len(changed) >= len(before) // 2, changed
        assert trainable and trainable <= in_optimizer
