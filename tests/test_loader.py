"""The loader over real shards made from ShapesWorld: exact resume, DP disjointness, ratios,
workers, and the VLM training on its batches."""

import json

import numpy as np
import pytest
import torch

from megatron_vlm.config import load_config
from megatron_vlm.data.batch import attention_mask_from_segments, document_boundaries

N_IMG, D_ENC = 16, 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic raw files -> text, caption and instruction shards (embeddings are random)."""
    from megatron_vlm.data.embedding_shards import EmbeddingShardWriter
    from megatron_vlm.data.llava_preprocess import preprocess_llava
    from megatron_vlm.data.text_preprocess import preprocess_text
    from megatron_vlm.data.tokenizer import load_tokenizer
    from megatron_vlm.synthetic.generate import ShapesWorldConfig, generate

    root = tmp_path_factory.mktemp("world")
    raw = root / "raw"
    generate(raw, ShapesWorldConfig(images=48, llava_images=40, eval_images=4, text_docs=400,
                                    llava_max_turns=2), progress=False, fsync=False)
    tokenizer_path = str(raw / "tokenizer" / "tokenizer.json")
    tok = load_tokenizer(tokenizer_path)
    preprocess_text([str(raw / "text" / "corpus.jsonl")], tokenizer_path, str(root / "text" / "corpus"),
                    docs_per_shard=150, progress=False)
    gen = torch.Generator().manual_seed(0)
    with EmbeddingShardWriter(root / "captions", N_IMG, D_ENC, rows_per_shard=20) as writer:
        for line in (raw / "captions_folder" / "captions.jsonl").read_text().splitlines():
            record = json.loads(line)
            writer.add(record["key"], torch.randn(N_IMG, D_ENC, generator=gen),
                       tok.encode(record["caption"]))
    preprocess_llava(str(raw / "llava" / "llava_instruct.json"), str(raw / "llava" / "images"),
                     tokenizer_path, str(root / "instructions"), "<|sep|>", seq_length=128,
                     num_image_tokens=N_IMG, progress=False)
    with EmbeddingShardWriter(root / "instruction_images", N_IMG, D_ENC) as writer:
        for path in (root / "instructions" / "images.txt").read_text().split():
            writer.add(path, torch.randn(N_IMG, D_ENC, generator=gen))
    return root, tokenizer_path


def config(world, *overrides):
    root, tokenizer = world
    return load_config("tiny", [
        "data.kind=blend", f"data.tokenizer={tokenizer}", f"data.text={root}/text/corpus",
        f"data.captions={root}/captions", f"data.instructions={root}/instructions",
        f"data.instruction_images={root}/instruction_images",
        "data.ratios={text: 0.6, captions: 0.25, instructions: 0.15}",
        f"output_dir={root}/run", "train.train_iters=12", "data.num_workers=0", *overrides])


def make_loader(cfg, dp_rank=0, dp_size=1, state=None, workers=0):
    from megatron_vlm.data.loader import BlendLoader, DataSources, build_index

    enc = cfg.model.encoder
    sources = DataSources(cfg.data, cfg.train.seq_length, enc.num_image_tokens, enc.embed_dim,
                          cfg.model.decoder.vocab_size)
    index = build_index(sources, cfg)
    return BlendLoader(sources, index, dp_rank, dp_size, cfg.train.micro_batch_size,
                       num_workers=workers, state=state), index


def steps(loader, n):
    return [loader.next_step() for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        assert same, k


def test_blend_meets_ratios_and_batches_follow_the_contract(world):
    cfg = config(world)
    loader, index = make_loader(cfg)
    summary = index.summary()
    assert summary["max_abs_error_sequences"] <= 1.0
    batch = loader.next_step()[0]
    assert batch["tokens"].shape == (cfg.train.micro_batch_size, cfg.train.seq_length)
    rows_with_image = batch["image_mask"].any(1)
    assert batch.get("image_embeddings", torch.empty(0, N_IMG, D_ENC)).shape[0] == int(rows_with_image.sum())
    assert not bool((batch["loss_mask"].bool() & batch["image_mask"]).any())


def test_resume_at_a_random_step_gives_exactly_the_same_batches(world):
    from megatron_vlm.data.loader import LoaderState

    cfg = config(world)
    full = steps(make_loader(cfg)[0], 8)
    k = int(np.random.default_rng().integers(1, 7))
    first, _ = make_loader(cfg)
    steps(first, k)
    resumed, _ = make_loader(cfg, state=LoaderState(**first.state_dict()))
    for a, b in zip(full[k:], steps(resumed, 8 - k)):
        for x, y in zip(a, b):
            assert_same(x, y)


def test_data_parallel_ranks_are_disjoint_and_cover_each_global_batch(world):
    cfg = config(world)
    whole = steps(make_loader(cfg)[0], 3)
    ranks = [steps(make_loader(cfg, r, 2)[0], 3) for r in range(2)]
    for step in range(3):
        expected = torch.cat([mb["tokens"] for mb in whole[step]])
        got = torch.cat([mb["tokens"] for r in range(2) for mb in ranks[r][step]])
        assert torch.equal(expected, got)
        halves = [torch.cat([mb["source_ids"] for mb in ranks[r][step]]) for r in range(2)]
        assert sum(h.numel() for h in halves) == cfg.train.global_batch_size


def test_background_workers_give_the_same_batches(world):
    cfg = config(world)
    for a, b in zip(steps(make_loader(cfg)[0], 3), steps(make_loader(cfg, workers=2)[0], 3)):
        for x, y in zip(a, b):
            assert_same(x, y)


def test_impossible_blends_stop_with_one_clear_error(world):
    with pytest.raises(ValueError, match="sum to 1.1"):
        config(world, "data.ratios={text: 0.9, captions: 0.2}")
    with pytest.raises(ValueError, match="data.instructions is not set"):
        config(world, "data.instructions=null")
    cfg = config(world)
    cfg.model.encoder.embed_dim = 48  # shards hold 32-wide embeddings
    with pytest.raises(ValueError, match="model expects"):
        make_loader(cfg)


def test_the_vlm_trains_on_loader_batches(world, runtime):
    from megatron_vlm.model.build import build_model
    from megatron_vlm.training.step import setup_training, train_step

    cfg = config(world, "train.train_iters=8", "train.lr=3e-3")
    state = setup_training(build_model(cfg), cfg)
    loader, _ = make_loader(cfg)
    losses = [train_step(state, iter(mbs), len(mbs), cfg)["loss"] for mbs in steps(loader, 8)]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])


def test_caption_fill_text_packs_documents_with_their_own_attention(world):
    cfg = config(world, "data.caption_fill=text")
    loader, index = make_loader(cfg)
    # every caption sequence counts all L positions toward the caption source
    assert index.summary()["max_abs_error_sequences"] <= 1.0
    seen = 0
    for mbs in steps(loader, 4):
        for mb in mbs:
            assert "attention_mask" not in mb  # built on the device by the model
            masks = attention_mask_from_segments(mb["segment_ids"])
            assert torch.equal(mb["cu_seqlens"], document_boundaries(mb["segment_ids"])[0])
            for row in range(mb["tokens"].shape[0]):
                if int(mb["source_ids"][row]) != 1:  # SOURCE_ORDER index of captions
                    continue
                seen += 1
                seg = mb["segment_ids"][row]
                assert int(seg.max()) >= 1 and int((seg == -1).sum()) == 0  # filled, no padding
                mask = masks[row, 0]
                first_filler = int((seg >= 1).nonzero()[0])
                assert bool(mask[first_filler, :first_filler].all())  # cannot see the caption
                assert mb["loss_mask"][row, first_filler:].sum() > 0
    assert seen > 0
    # resumable like every other layout
    from megatron_vlm.data.loader import LoaderState

    full = steps(make_loader(cfg)[0], 4)
    resumed, _ = make_loader(cfg, state=LoaderState(consumed_global_batches=2))
    for a, b in zip(full[2:], steps(resumed, 2)):
        for x, y in zip(a, b):
            assert_same(x, y)


def test_a_source_with_nothing_to_train_on_is_refused_at_open(world, tmp_path):
    """An empty corpus, an unfinished one, an empty LLaVA list, an empty caption directory and
    instructions whose images are all missing each stop at data opening with one line naming
    the config key and path (not a blend or window-builder internal later on)."""
    from megatron_vlm.data.embedding_shards import EmbeddingShardWriter
    from megatron_vlm.data.llava_preprocess import preprocess_llava
    from megatron_vlm.data.loader import DataSources
    from megatron_vlm.data.text_preprocess import preprocess_text

    root, tokenizer = world
    (tmp_path / "empty.jsonl").write_text("")
    preprocess_text([str(tmp_path / "empty.jsonl")], tokenizer, str(tmp_path / "empty" / "c"),
                    progress=False)
    preprocess_text([str(root / "raw" / "text" / "corpus.jsonl")], tokenizer,
                    str(tmp_path / "cut" / "c"), docs_per_shard=150, progress=False,
                    stop_after_shards=1)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not decoded here")
    (tmp_path / "llava.json").write_text("[]")
    (tmp_path / "one.json").write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a"}]}]))
    for name, out in (("llava.json", "instructions"), ("one.json", "with_image")):
        preprocess_llava(str(tmp_path / name), str(tmp_path / "images"), tokenizer,
                         str(tmp_path / out), "<|sep|>", progress=False)
    with EmbeddingShardWriter(tmp_path / "captions", N_IMG, D_ENC):
        pass
    with EmbeddingShardWriter(tmp_path / "other_images", N_IMG, D_ENC) as writer:
        writer.add("not/an/instruction/image.png", torch.zeros(N_IMG, D_ENC))
    cases = [
        (["data.ratios={text: 1.0}", f"data.text={tmp_path}/empty/c"],
         rf"data.text={tmp_path}/empty/c: the corpus holds no documents"),
        (["data.ratios={text: 1.0}", f"data.text={tmp_path}/cut/c"],
         rf"data.text={tmp_path}/cut/c: .* did not finish \(1 shards so far\)"),
        (["data.ratios={text: 0.5, instructions: 0.5}", f"data.instructions={tmp_path}/instructions"],
         rf"data.instructions={tmp_path}/instructions holds no conversations"),
        (["data.ratios={text: 0.5, captions: 0.5}", f"data.captions={tmp_path}/captions"],
         rf"data.captions={tmp_path}/captions holds no image records"),
        (["data.ratios={text: 0.5, instructions: 0.5}", "data.max_skips=1000",
          f"data.instructions={tmp_path}/with_image",
          f"data.instruction_images={tmp_path}/other_images"],
         rf"data.instructions={tmp_path}/with_image holds no conversations whose image is in "
         rf"data.instruction_images={tmp_path}/other_images"),
    ]
    for overrides, message in cases:
        cfg = config(world, *overrides)
        enc = cfg.model.encoder
        with pytest.raises(ValueError, match=message) as err:
            DataSources(cfg.data, cfg.train.seq_length, enc.num_image_tokens, enc.embed_dim,
                        cfg.model.decoder.vocab_size)
        assert "\n" not in str(err.value)
