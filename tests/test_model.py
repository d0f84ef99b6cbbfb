"""The VLM module in one process: decoder block, qk-norm, projector, image splicing, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.config import load_config
from megatron_vlm.model import param_count


def build(overrides=()):
    from megatron_vlm.model.build import build_model

    return build_model(load_config("tiny", list(overrides)))


def test_cpu_mode_redirects_cuda_requests(runtime):
    assert runtime.cpu_mode and runtime.backend == "gloo"
    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"


def test_decoder_block_is_the_dclm_block(runtime):
    model = build()
    cfg = load_config("tiny")
    d = cfg.model.decoder.hidden_size
    lm = model.language_model
    decoder_params = {n: p for n, p in model.named_parameters() if n.startswith("language_model.")}
    assert not [n for n in decoder_params if n.endswith("bias")], "the decoder has no biases"
    assert sum(p.numel() for p in decoder_params.values()) == param_count.decoder_parameters(cfg.model.decoder)
    assert lm.embedding.word_embeddings.weight.data_ptr() != lm.output_layer.weight.data_ptr()
    layer = lm.decoder.layers[0]
    hidden = 256 * math.ceil(int(8 * d / 3) / 256)
    assert layer.mlp.linear_fc1.weight.shape == (2 * hidden, d)  # SwiGLU: gate and up halves
    assert layer.mlp.linear_fc2.weight.shape == (d, hidden)
    assert layer.self_attention.q_layernorm.weight.shape == (d,)  # full width, not per head
    assert layer.input_layernorm.eps == 1e-5 and layer.input_layernorm.bias is None
    assert lm.rotary_pos_emb.inv_freq.shape == (cfg.model.decoder.head_dim // 2,)
    expected_inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(lm.rotary_pos_emb.inv_freq.float(), expected_inv_freq)
    assert not lm.config.rotary_interleaved  # NeoX rotate-half


def test_full_width_qk_norm_normalizes_over_all_heads(runtime):
    model = build()
    norm = model.language_model.decoder.layers[0].self_attention.q_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
    x = torch.randn(5, 3, 4, 16)  # [seq, batch, heads, head_dim]
    expected = F.layer_norm(x.reshape(5, 3, 64), (64,), norm.weight, None, 1e-5).reshape(x.shape)
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)
    per_head = F.layer_norm(x, (16,), None, None, 1e-5)
    assert not torch.allclose(norm(x) / norm.weight.view(4, 16), per_head, atol=1e-3)


@pytest.mark.parametrize("kind,multiplier", [("mlp2", 4), ("mlp2", 2), ("linear", 4)])
def test_projector_parameters_and_shapes(runtime, kind, multiplier):
    model = build([f"model.projector.type={kind}", f"model.projector.hidden_multiplier={multiplier}"])
    cfg = load_config("tiny", [f"model.projector.type={kind}",
                               f"model.projector.hidden_multiplier={multiplier}"])
    d_enc, d = cfg.model.encoder.embed_dim, cfg.model.decoder.hidden_size
    if kind == "mlp2":
        expected = d_enc * multiplier * d_enc + multiplier * d_enc + multiplier * d_enc * d + d
    else:
        expected = d_enc * d + d
    got = sum(p.numel() for p in model.projector.parameters())
    assert got == expected == param_count.projector_parameters(cfg.model.projector, cfg.model.encoder, d)
    out = model.image_features(torch.randn(3, 16, d_enc), None)
    assert out.shape == (3, 16, d)


def test_image_positions_carry_projector_output_and_text_positions_token_embeddings(runtime):
    model = build()
    b, s, n_img = 3, 40, 16
    tokens = torch.randint(0, 512, (b, s))
    image_mask = torch.zeros(b, s, dtype=torch.bool)
    image_mask[0, 2:2 + n_img] = True  # row 0: image after one token
    image_mask[2, 0:n_img] = True      # row 2: image first; row 1: text only
    embeddings = torch.randn(2, n_img, 32)
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        spliced = model.embed(tokens, image_mask, embeddings, None).transpose(0, 1)
        text = model.language_model.embedding(input_ids=tokens, position_ids=positions).transpose(0, 1)
        projected = model.image_features(embeddings, None)
    torch.testing.assert_close(spliced[0, 2:2 + n_img], projected[0])
    torch.testing.assert_close(spliced[2, :n_img], projected[1])
    torch.testing.assert_close(spliced[~image_mask], text[~image_mask])
    torch.testing.assert_close(spliced[1], text[1])


def test_bad_image_batches_get_clear_errors(runtime):
    """Counts are checked where batches are assembled (check_batch, on the CPU), so the forward
    needs no host synchronisation; shapes are checked in the model."""
    from megatron_vlm.data.batch import check_batch

    model = build()
    tokens = torch.randint(0, 512, (2, 40))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :15] = True  # one position short of an image

    def batch(**images):
        return {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(2, 40),
                "image_mask": mask, **images}

    with pytest.raises(ValueError, match=r"rows \[0\] have \[15\] image positions"):
        check_batch(batch(image_embeddings=torch.randn(1, 16, 32)), 16)
    mask[0, :16] = True
    with pytest.raises(ValueError, match="marks 1 rows with image positions but 2 images"):
        check_batch(batch(image_embeddings=torch.randn(2, 16, 32)), 16)
    with pytest.raises(ValueError, match="but 0 images"):
        check_batch(batch(), 16)
    with pytest.raises(ValueError, match=r"expected \[k, 16, d_enc\]"):
        check_batch(batch(image_embeddings=torch.randn(1, 9, 32)), 16)
    check_batch(batch(image_embeddings=torch.randn(1, 16, 32)), 16)  # the good one passes
    with pytest.raises(ValueError, match=r"expected \[k, 16, d_enc\]"):
        model(tokens, image_mask=mask, image_embeddings=torch.randn(1, 9, 32))
    with pytest.raises(RuntimeError, match="precomputed"):  # the loader never builds this batch
        model(tokens, image_mask=mask, images=torch.randn(1, 3, 56, 56))


@pytest.mark.parametrize("frozen", [True, False])
def test_online_encoder_feeds_the_projector(runtime, frozen):
    model = build(["model.encoder.mode=online", f"model.encoder.frozen={str(frozen).lower()}"])
    assert model.vision_encoder is not None
    tokens = torch.randint(0, 512, (2, 40))
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, 4:20] = True
    loss = model(tokens, labels=tokens, image_mask=mask, images=torch.randn(1, 3, 56, 56))
    assert loss.shape == (2, 40)
    loss.mean().backward()
    encoder_grads = [p.grad for p in model.vision_encoder.parameters() if p.requires_grad]
    if frozen:
        assert encoder_grads == []
    else:
        assert encoder_grads and any(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    assert model.projector.encoder.linear_fc1.weight.grad.abs().sum() > 0


def test_idle_projector_is_not_decayed_and_norms_skip_weight_decay(runtime):
    """Text-only steps: the projector gets no gradient and must stay exactly as it is (decay
    alone would shrink it to zero over a long text run); gains and biases are never decayed."""
    from megatron_vlm.data.batch import random_batch, split_microbatches
    from megatron_vlm.training.step import setup_training, train_step

    cfg = load_config("tiny", ["train.weight_decay=0.5"])
    model = build()
    state = setup_training(model, cfg)
    decay = {id(p): g["weight_decay"] for g in state.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 0.0 if (p.dim() == 1 or "projector" in name) else 0.5
        assert decay[id(p)] == expected, name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = random_batch(gen, 4, 32, 512, 16, 32)
        batch["image_mask"][:] = False
        batch["image_embeddings"] = batch["image_embeddings"][:0]
        microbatches = split_microbatches(batch, 2)
        train_step(state, iter(microbatches), len(microbatches), cfg)
    for name, p in model.named_parameters():
        assert torch.equal(before[name], p) == ("projector" in name), name
