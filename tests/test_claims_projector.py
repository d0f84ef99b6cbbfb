"""The projector computes the paper's formula: mlp2 is W2 GELU(W1 x + b1) + b2 with the exact
(erf) GELU, linear is W x + b. Checked on the path the model uses (``image_features``) against
the formula written out here, with weights large enough that the pre-activations span the range
where GELU differs from ReLU, SiLU, its tanh approximation or no activation at all."""

import math

import pytest
import torch

from megatron_vlm.config import load_config


def gelu_by_hand(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


@pytest.mark.parametrize("kind", ["mlp2", "linear"])
def test_projector_output_is_the_formula(runtime, kind):
    from megatron_vlm.model.build import build_model

    cfg = load_config("tiny", [f"model.projector.type={kind}"])
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # unit-variance weights: pre-activations of a few units, not ~0.1
        for p in model.projector.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(3, cfg.model.encoder.num_image_tokens, cfg.model.encoder.embed_dim,
                    generator=gen)
    got = model.image_features(x, None)

    if kind == "mlp2":
        fc1, fc2 = model.projector.encoder.linear_fc1, model.projector.encoder.linear_fc2
        hidden = x.double() @ fc1.weight.double().T + fc1.bias.double()
        assert hidden.abs().max() > 3  # GELU's curved part, and its negative tail, are used
        expected = gelu_by_hand(hidden) @ fc2.weight.double().T + fc2.bias.double()
    else:
        layer = model.projector.encoder
        expected = x.double() @ layer.weight.double().T + layer.bias.double()
    assert got.shape == (3, cfg.model.encoder.num_image_tokens, cfg.model.decoder.hidden_size)
    # float32 rounding of sums of ~100 terms of size ~10 stays well below 1e-3; the tanh GELU
    # differs by up to ~3e-4 per hidden unit, i.e. ~3e-3 after the second layer.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=5e-4)
