"""Evaluation images reach the model as in training: precomputed by the tool, encoded in the
evaluation process by the same (seeded) frozen encoder and preprocessing, or given to an online
encoder as pixels."""

from __future__ import annotations

import pytest
import torch

# Preparing ShapesWorld's shards takes over a minute on 2 cores; the default tier covers the
# evaluation images through tests/test_evaluate_vlm.py's blank-images test (docs/testing.md).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from megatron_vlm.data.prepare import prepare_shapesworld

    root = tmp_path_factory.mktemp("sw")
    return prepare_shapesworld(root, "tiny", images=24, text_docs=150, quiet=True)


def _config(prepared, *extra):
    from megatron_vlm.config import load_config

    return load_config("tiny", ["data.kind=blend", *prepared.overrides(),
                                "data.ratios={captions: 1.0}", *extra])


def test_in_process_encoding_matches_the_precompute_tool(prepared, runtime):
    from megatron_vlm.evaluation.eval_images import ImageSource
    from megatron_vlm.evaluation.tasks import load_task

    cfg = _config(prepared)
    examples = load_task("shapesworld_vqa", str(prepared.raw), limit=5)
    stored = ImageSource(cfg, str(prepared.eval_images)).images(examples)
    torch.manual_seed(999)  # the encoder must not depend on the RNG state it is built in
    encoded = ImageSource(cfg, None).images(examples)
    for a, b in zip(stored, encoded):
        assert a.shape == b.shape == (16, 32)
        # the stored embeddings are bf16: equal up to bf16 rounding
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2)
    # another image gives another embedding (the check is not vacuous)
    other = next(i for i, ex in enumerate(examples) if ex.image != examples[0].image)
    assert (encoded[0].float() - encoded[other].float()).abs().max() > 0.1


def test_online_encoder_gets_pixels_and_ignores_precomputed_embeddings(prepared, runtime):
    from megatron_vlm.evaluation.eval_images import ImageSource
    from megatron_vlm.evaluation.tasks import load_task

    cfg = _config(prepared, "model.encoder.mode=online")
    examples = load_task("shapesworld_pope", str(prepared.raw), limit=2)
    # the config names precomputed embeddings (inherited): the online encoder sees pixels
    source = ImageSource(cfg, str(prepared.eval_images))
    assert source.embeddings is None and "online encoder" in source.describe()
    images = source.images(examples)
    assert all(img.shape == (3, 56, 56) for img in images)


def test_blank_images_are_one_encoded_blank_image(prepared, runtime):
    from megatron_vlm.evaluation.eval_images import ImageSource
    from megatron_vlm.evaluation.tasks import load_task

    cfg = _config(prepared)
    examples = load_task("shapesworld_vqa", str(prepared.raw), limit=6)
    real = ImageSource(cfg, None).images(examples)
    blank = ImageSource(cfg, str(prepared.eval_images), blank=True)
    assert "BLANK" in blank.describe()
    got = blank.images(examples)
    assert all(torch.equal(g, got[0]) for g in got) and got[0].shape == real[0].shape
    assert all((g.float() - r.float()).abs().max() > 0.1 for g, r in zip(got, real))
    # the blank image is the fill colour, which normalizes to (nearly) zero, through the encoder
    online = ImageSource(_config(prepared, "model.encoder.mode=online"), None, blank=True)
    pixels = online.images(examples[:2])
    assert pixels[0].shape == (3, 56, 56) and float(pixels[0].abs().max()) < 1e-2
    with torch.no_grad():
        expected = blank._frozen_encoder()(pixels[0][None])[0]
    torch.testing.assert_close(got[0].float(), expected.float(), rtol=1e-4, atol=1e-4)


def test_missing_image_and_missing_embedding_are_clear_errors(prepared, runtime, tmp_path):
    import dataclasses

    from megatron_vlm.evaluation.eval_images import ImageSource
    from megatron_vlm.evaluation.tasks import load_task

    cfg = _config(prepared)
    example = load_task("shapesworld_vqa", str(prepared.raw), limit=1)[0]
    gone = dataclasses.replace(example, image="nope.jpg")
    with pytest.raises(ValueError, match="image 'nope.jpg' has no embedding"):
        ImageSource(cfg, str(prepared.eval_images)).images([gone])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        ImageSource(cfg, None).images([gone])
