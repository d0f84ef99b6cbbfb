"""Transformer Engine modules carry ``_extra_state`` (FP8 metadata) that megatron-core does not
write for the attention and a local-spec checkpoint never has: loading must accept exactly those
keys missing, and nothing else, without relying on TE's temporary load hook.

TE does not install on a CPU machine, so the attention modules of a local-spec model are given
extra state here the way TE's modules have it (``get_extra_state`` / ``set_extra_state``).
"""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config import load_config

CFG = ["train.seq_length=32"]


def _attention_modules(model):
    return [layer.self_attention.core_attention
            for layer in model.language_model.decoder.layers]


def _with_extra_state(model):
    """``model`` with every core attention carrying extra state as megatron-core's
    TEDotProductAttention does: in ``state_dict`` (FP8 metadata), but not in its
    ``sharded_state_dict`` (which holds only a learnable softmax offset), so a checkpoint never
    has it."""
    for module in _attention_modules(model):
        base = type(module)

        class WithExtraState(base):
            def get_extra_state(self):
                return torch.tensor([7.0])

            def set_extra_state(self, state):
                self.loaded_extra_state = state

            def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
                return {}

        module.__class__ = WithExtraState
    assert any(k.endswith("core_attention._extra_state") for k in model.state_dict())
    return model


def _build(seed: int):
    from megatron_vlm.model.build import build_model

    torch.manual_seed(seed)
    return build_model(load_config("tiny", CFG))


def _same_weights(a, b) -> bool:
    sa = {k: v for k, v in a.state_dict().items() if not k.endswith("_extra_state")}
    sb = {k: v for k, v in b.state_dict().items() if not k.endswith("_extra_state")}
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_model_with_extra_state_loads_a_local_spec_checkpoint_and_its_own(runtime, tmp_path):
    from megatron_vlm.training.checkpointing import load_checkpoint, save_checkpoint

    local = _build(seed=1)
    save_checkpoint(tmp_path / "local", local, None, {"step": 1})
    te_like = _with_extra_state(_build(seed=2))
    assert not _same_weights(local, te_like)
    load_checkpoint(tmp_path / "local", te_like, None, with_rng=False)
    assert _same_weights(local, te_like)

    save_checkpoint(tmp_path / "own", te_like, None, {"step": 2})
    again = _with_extra_state(_build(seed=3))
    load_checkpoint(tmp_path / "own", again, None, with_rng=False)
    assert _same_weights(te_like, again)


def test_only_extra_state_may_be_missing():
    from megatron_vlm.training.checkpoint_checks import check_loaded_keys

    check_loaded_keys("ckpt", ["language_model.decoder.layers.0.self_attention.core_attention."
                               "_extra_state"], [])
    with pytest.raises(ValueError, match="missing .*linear_qkv.weight"):
        check_loaded_keys("ckpt", ["language_model.decoder.layers.0.self_attention.linear_qkv."
                                   "weight", "x._extra_state"], [])
    with pytest.raises(ValueError, match="unexpected .*x._extra_state"):
        check_loaded_keys("ckpt", [], ["x._extra_state"])
    # a partial load checks only its own part
    check_loaded_keys("ckpt", ["projector.encoder.linear_fc1.weight"], [], "language_model.")
