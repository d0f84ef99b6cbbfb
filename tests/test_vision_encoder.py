"""Tests of the vision encoder (open_clip image tower -> patch embeddings) on CPU."""

from __future__ import annotations

import logging
import resource
import types

import pytest
import torch

from megatron_vlm._compat.torchvision_shim import ensure_torchvision_importable
from megatron_vlm.cli import is_user_error
from megatron_vlm.model.vision_encoder import (
    SiglipPatchEncoder,
    build_vision_encoder,
    count_encoder_parameters,
    load_vision_weights,
)

try:
    from megatron_vlm.config import EncoderConfig
except ImportError:  # config module not available: fall back to a plain namespace
    EncoderConfig = None

SO400M = "ViT-SO400M-14-SigLIP-384"
TINY_VISION = dict(image_size=56, patch_size=14, width=32, layers=2, head_width=16)


def encoder_cfg(**overrides):
    """An encoder config: the project's EncoderConfig when importable, else a namespace."""
    fields = dict(mode="online", embed_dim=32, num_image_tokens=16, open_clip_model="custom",
                  custom_vision_cfg=dict(TINY_VISION), image_size=56, weights_path=None, frozen=True)
    fields.update(overrides)
    if EncoderConfig is not None:
        return EncoderConfig(**fields)
    return types.SimpleNamespace(**fields)


def so400m_cfg(**overrides):
    fields = dict(embed_dim=1152, num_image_tokens=729, open_clip_model=SO400M, custom_vision_cfg=None,
                  image_size=384)
    fields.update(overrides)
    return encoder_cfg(**fields)


def tiny_images(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 56, 56, generator=gen)


def test_torchvision_importable_after_shim():
    ensure_torchvision_importable()
    ensure_torchvision_importable()  # idempotent
    import torchvision.transforms as T

    out = T.Resize((8, 8), antialias=True)(torch.rand(3, 16, 16))
    assert out.shape == (3, 8, 8)


def test_tiny_tower_output_shape():
    torch.manual_seed(0)
    enc = build_vision_encoder(encoder_cfg())
    assert isinstance(enc, SiglipPatchEncoder)
    out = enc(tiny_images(batch=3))
    assert out.shape == (3, 16, 32)
    assert torch.isfinite(out).all()


def test_so400m_parameter_count_on_meta_device():
    ensure_torchvision_importable()  # open_clip imports torchvision (also when run alone)
    import open_clip

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count = count_encoder_parameters(so400m_cfg())
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) / 1024
    assert count > 400_000_000
    # Independent reference: the whole open_clip model built on the meta device.
    with torch.device("meta"):
        full = open_clip.create_model(SO400M, pretrained=None, device="meta")
    assert all(p.is_meta for p in full.parameters())
    assert count == sum(p.numel() for p in full.visual.parameters())
    # 428M fp32 parameters would be about 1.6 GiB: nothing of that size was allocated.
    assert rss_growth_mib < 400, f"counting grew peak RSS by {rss_growth_mib:.0f} MiB"


@pytest.mark.parametrize("prefixed", [True, False], ids=["open_clip_full", "tower_only"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_weights_round_trip(tmp_path, prefixed, fmt):
    torch.manual_seed(1)
    source = build_vision_encoder(encoder_cfg())
    state = source.visual.state_dict()
    if prefixed:
        state = {f"visual.{k}": v for k, v in state.items()}
        # Text-tower and contrastive-head entries of a full open_clip state dict are ignored.
        state["text.token_embedding.weight"] = torch.randn(10, 4)
        state["logit_scale"] = torch.tensor(1.0)
    path = tmp_path / f"tower.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    torch.manual_seed(2)  # a different random init, overwritten by the file
    loaded = build_vision_encoder(encoder_cfg(weights_path=str(path)))
    images = tiny_images()
    assert torch.equal(source(images), loaded(images))
    for (name_a, a), (name_b, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert name_a == name_b and torch.equal(a, b)
    assert all(not p.is_meta for p in loaded.parameters())


def test_load_into_existing_encoder(tmp_path):
    torch.manual_seed(3)
    source = build_vision_encoder(encoder_cfg())
    path = tmp_path / "enc.pt"
    torch.save(source.state_dict(), path)  # the encoder's own keys are open_clip's visual.* keys
    torch.manual_seed(4)
    target = build_vision_encoder(encoder_cfg())
    load_vision_weights(target, str(path))
    assert torch.equal(source(tiny_images()), target(tiny_images()))


def _drop_conv(state):
    del state["conv1.weight"]


def _add_extra(state):
    state["transformer.resblocks.7.extra.weight"] = torch.zeros(3)


def _misshape_positions(state):
    state["positional_embedding"] = torch.zeros(5, 32)


@pytest.mark.parametrize("corrupt,expected", [
    (_drop_conv, ["missing keys", "conv1.weight"]),
    (_add_extra, ["unexpected keys", "transformer.resblocks.7.extra.weight"]),
    (_misshape_positions, ["positional_embedding"]),
])
def test_bad_weights_file_names_the_key_and_file(tmp_path, corrupt, expected):
    state = build_vision_encoder(encoder_cfg()).visual.state_dict()
    corrupt(state)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        build_vision_encoder(encoder_cfg(weights_path=str(path)))
    msg = str(err.value)
    assert all(part in msg for part in expected) and str(path) in msg, msg


def _save_safetensors(state, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_weights_of_another_encoder_are_one_line_naming_both(tmp_path):
    """open_clip's file of another encoder (here: wider, one block more) is refused with one
    line naming the file, the first tensors of other shapes (expected vs found), the extra
    keys, and what the recipe's encoder and the file's seem to be."""
    other = build_vision_encoder(encoder_cfg(
        embed_dim=48, custom_vision_cfg=dict(TINY_VISION, width=48, layers=3)))
    path = _save_safetensors({f"visual.{k}": v for k, v in other.visual.state_dict().items()},
                             tmp_path / "open_clip_model.safetensors")
    with pytest.raises(ValueError) as err:
        build_vision_encoder(encoder_cfg(weights_path=path))
    msg = str(err.value)
    assert "\n" not in msg and is_user_error(err.value)
    assert msg.startswith(f"vision encoder weights {path!r} do not fit "
                          f"model.encoder.open_clip_model='custom': shapes differ: "
                          f"class_embedding expected [32] found [48]; "
                          f"positional_embedding expected [17, 32] found [17, 48]; "), msg
    assert "unexpected keys: transformer.resblocks.2." in msg
    assert msg.endswith("the encoder is an open_clip ViT tower: width 32, 2 blocks, patch 14, "
                        "4x4 patches; the file seems to hold an open_clip ViT tower: width 48, "
                        "3 blocks, patch 14, 4x4 patches"), msg


def test_check_command_says_whether_a_file_fits_the_recipe(tmp_path, capsys):
    """python -m megatron_vlm.model.vision_encoder --recipe R model.encoder.weights_path=F"""
    from megatron_vlm.model.vision_encoder import main

    fits = _save_safetensors(build_vision_encoder(encoder_cfg()).state_dict(),
                             tmp_path / "ok.safetensors")
    assert main(["--recipe", "tiny", f"model.encoder.weights_path={fits}"]) == 0
    assert capsys.readouterr().out == (f"{fits} fits model.encoder.open_clip_model='custom' (an "
                                       f"open_clip ViT tower: width 32, 2 blocks, patch 14, 4x4 "
                                       f"patches)\n")
    wider = build_vision_encoder(encoder_cfg(
        embed_dim=48, custom_vision_cfg=dict(TINY_VISION, width=48)))
    bad = _save_safetensors(wider.state_dict(), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="class_embedding expected \\[32\\] found \\[48\\]") as err:
        main(["--recipe", "tiny", f"model.encoder.weights_path={bad}"])
    assert is_user_error(err.value)
    with pytest.raises(ValueError, match="model.encoder.weights_path is null") as err:
        main(["--recipe", "tiny"])
    assert is_user_error(err.value)


def test_weights_of_a_known_other_layout_are_named(tmp_path):
    """Files that are not open_clip's (a transformers checkpoint, a bare timm state dict) and
    an open_clip SigLIP of another size are told apart from their key names and shapes."""
    def blocks(prefix, n, width):
        return {f"{prefix}{i}.norm1.weight": torch.zeros(width) for i in range(n)}

    files = {
        "transformers": ({"vision_model.embeddings.patch_embedding.weight":
                              torch.zeros(8, 3, 14, 14),
                          "vision_model.embeddings.position_embedding.weight": torch.zeros(729, 8),
                          **blocks("vision_model.encoder.layers.", 3, 8)},
                         "a Hugging Face transformers checkpoint (vision_model.* keys: not "
                         "open_clip's file): width 8, 3 blocks, patch 14, 27x27 patches"),
        # SigLIP so400m at 224 px (256 positions, no class token) where 384 px was meant.
        "timm_in_open_clip": ({"trunk.patch_embed.proj.weight": torch.zeros(8, 3, 14, 14),
                               "trunk.pos_embed": torch.zeros(1, 256, 8),
                               **blocks("trunk.blocks.", 27, 8)},
                              "a timm ViT tower in open_clip's layout: width 8, 27 blocks, "
                              "patch 14, 16x16 patches"),
        "bare_timm": ({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
                       "pos_embed": torch.zeros(1, 50, 8), **blocks("blocks.", 2, 8)},
                      "a bare timm ViT state dict (no open_clip 'trunk.' prefix: not "
                      "open_clip's file): width 8, 2 blocks, patch 16, 7x7 patches"),
        "unknown": ({"weight": torch.zeros(3)},
                    "the file is no image tower this check knows (open_clip, timm or "
                    "transformers)"),
    }
    for name, (state, said) in files.items():
        path = _save_safetensors(state, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError) as err:
            build_vision_encoder(encoder_cfg(weights_path=path))
        assert str(err.value).endswith(said), (name, str(err.value))
        assert "missing keys: class_embedding, conv1.weight" in str(err.value)


def test_missing_weights_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "siglip.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/siglip.safetensors"):
        build_vision_encoder(encoder_cfg(weights_path=str(path)))


def test_frozen_encoder_has_no_trainable_params_and_stays_in_eval(caplog):
    with caplog.at_level(logging.INFO, logger="megatron_vlm"):
        enc = build_vision_encoder(encoder_cfg(frozen=True))
    assert any("frozen" in r.getMessage() for r in caplog.records)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    out = enc(tiny_images())
    assert not out.requires_grad


def test_trainable_encoder_gets_gradients(caplog):
    with caplog.at_level(logging.INFO, logger="megatron_vlm"):
        enc = build_vision_encoder(encoder_cfg(frozen=False))
    assert any("trainable" in r.getMessage() for r in caplog.records)
    enc.train()
    assert enc.training
    out = enc(tiny_images())
    out.square().mean().backward()
    trainable = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and "visual.conv1.weight" in trainable
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The pooled-output projection is not on the patch-token path: it never trains.
    assert not enc.visual.proj.requires_grad


def test_wrong_num_image_tokens_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        build_vision_encoder(so400m_cfg(num_image_tokens=576))  # fails before allocating the tower
    msg = str(err.value)
    assert "num_image_tokens=576" in msg and "729" in msg and SO400M in msg


def test_wrong_embed_dim_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        build_vision_encoder(so400m_cfg(embed_dim=1024))
    msg = str(err.value)
    assert "embed_dim=1024" in msg and "1152" in msg


def test_custom_tower_mismatch_checked_by_encoder_itself():
    # A namespace skips the config's own cross-checks: the encoder still catches the mismatch.
    cfg = types.SimpleNamespace(open_clip_model="custom", custom_vision_cfg=dict(TINY_VISION), embed_dim=32,
                                num_image_tokens=20, image_size=56, weights_path=None, frozen=True)
    with pytest.raises(ValueError, match=r"num_image_tokens=20 .*16 tokens"):
        build_vision_encoder(cfg)


def test_wrong_image_size_at_forward():
    enc = build_vision_encoder(encoder_cfg())
    with pytest.raises(ValueError, match="56x56"):
        enc(torch.rand(1, 3, 64, 64))


def test_unknown_custom_key_rejected():
    cfg = types.SimpleNamespace(open_clip_model="custom", custom_vision_cfg=dict(TINY_VISION, depth=3),
                                embed_dim=32, num_image_tokens=16, image_size=56, weights_path=None,
                                frozen=True)
    with pytest.raises(ValueError, match="depth"):
        build_vision_encoder(cfg)

