"""GPU-only: the Transformer Engine variant of the decoder against the local variant.

Run on a CUDA machine with TE installed: ``python -m pytest -m gpu tests/gpu``.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def _build(use_te):
    from megatron_vlm.config import load_config
    from megatron_vlm.model.build import build_model

    return build_model(load_config("tiny"), use_transformer_engine=use_te).cuda()


def test_te_spec_matches_local_spec_in_fp32():
    if not torch.cuda.is_available():
        pytest.fail("needs CUDA")
    from distributed import free_port
    from megatron_vlm.runtime import has_transformer_engine, initialize, shutdown

    assert has_transformer_engine(), "Transformer Engine must import on the GPU machine"
    os.environ["MASTER_PORT"] = str(free_port())
    initialize(1, 1, seed=3)
    try:
        local, te = _build(False), _build(True)
        state = {k: v for k, v in local.state_dict().items() if not k.endswith("_extra_state")}
        missing, unexpected = te.load_state_dict(state, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        tokens = torch.randint(0, 512, (2, 64), device="cuda")
        mask = torch.zeros(2, 64, dtype=torch.bool, device="cuda")
        mask[0, :16] = True
        emb = torch.randn(1, 16, 32, device="cuda")
        with torch.no_grad():
            a = local(tokens, image_mask=mask, image_embeddings=emb)
            b = te(tokens, image_mask=mask, image_embeddings=emb)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    finally:
        shutdown()
