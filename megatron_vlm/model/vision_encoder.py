"""Vision encoder: the image tower of an open_clip architecture, returning patch embeddings.

Only the image tower is built (through open_clip's vision-tower builder and the architecture's
``vision_cfg``); the text tower is never allocated and nothing is fetched from a hub. Weights come
from a local file given by ``model.encoder.weights_path``.

The encoder maps images ``[b, 3, H, W]`` to patch embeddings ``[b, num_image_tokens, embed_dim]``:

* timm towers (SigLIP): ``trunk.forward_features`` with any prefix (class/register) tokens dropped;
* open_clip's own ``VisionTransformer``: its token output (``output_tokens=True``).

Parameters of the tower that the patch-token path never uses (pooling head, final projection)
are kept so that open_clip state dicts load strictly, but they never require gradients, so an
unfrozen encoder has no parameters without gradients.

The encoder config is read by attribute (``open_clip_model``, ``custom_vision_cfg``,
``embed_dim``, ``num_image_tokens``, ``image_size``, ``weights_path``, ``frozen``).

A weights file that does not fit the tower is one ValueError naming the file, the first tensors
of other shapes, the missing and unexpected keys, and which encoder the file seems to hold
(:func:`describe_weights`). ``python -m megatron_vlm.model.vision_encoder --recipe R
model.encoder.weights_path=FILE`` checks a file from the shell (docs/data.md, "Vision encoder
weights", has where to get SigLIP's).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from megatron_vlm._compat.torchvision_shim import ensure_torchvision_importable

logger = logging.getLogger("megatron_vlm")

_CFG = "model.encoder"  # prefix used when naming config fields in messages
_MAX_KEYS_SHOWN = 5
_MAX_SHAPES_SHOWN = 3

# Parameter name prefixes (relative to the tower) not used by the patch-token output.
_TIMM_UNUSED_PREFIXES = ("trunk.attn_pool.", "trunk.fc_norm.", "trunk.head.", "head.")
_VIT_UNUSED_PREFIXES = ("proj", "attn_pool_contrastive.")


def _open_clip():
    """Import open_clip (which imports torchvision) after making torchvision importable."""
    ensure_torchvision_importable()
    import open_clip

    return open_clip


# --------------------------------------------------------------------------------------------
# Tower configuration
# --------------------------------------------------------------------------------------------


def _resolve_tower_config(encoder_cfg) -> Tuple[Dict[str, Any], int, bool]:
    """Return (open_clip vision_cfg dict, projection embed_dim, quick_gelu) for the encoder config."""
    name = encoder_cfg.open_clip_model
    image_size = getattr(encoder_cfg, "image_size", None)
    if name == "custom":
        custom = getattr(encoder_cfg, "custom_vision_cfg", None)
        if not isinstance(custom, Mapping) or not custom:
            raise ValueError(
                f"{_CFG}.open_clip_model='custom' needs {_CFG}.custom_vision_cfg, a dict of open_clip "
                f"vision-tower config keys (e.g. image_size, patch_size, width, layers, head_width); "
                f"got {custom!r}"
            )
        vision_cfg = dict(copy.deepcopy(dict(custom)))
        quick_gelu = bool(vision_cfg.pop("quick_gelu", False))
        proj_dim = vision_cfg.pop("embed_dim", None)
        if "image_size" not in vision_cfg and image_size is not None:
            vision_cfg["image_size"] = image_size
        if proj_dim is None:
            width = vision_cfg.get("width", 768)
            proj_dim = width if not isinstance(width, (list, tuple)) else 512
        known = _vision_cfg_fields()
        unknown = sorted(k for k in vision_cfg if k not in known)
        if unknown:
            raise ValueError(
                f"{_CFG}.custom_vision_cfg has keys that are not open_clip vision-tower config keys: "
                f"{unknown}; allowed: {sorted(known) + ['embed_dim', 'quick_gelu']}"
            )
        return vision_cfg, int(proj_dim), quick_gelu

    open_clip = _open_clip()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None or "vision_cfg" not in model_cfg:
        raise ValueError(
            f"{_CFG}.open_clip_model={name!r} is not an open_clip architecture known to this "
            f"install (see open_clip.list_models()), and is not 'custom'"
        )
    vision_cfg = copy.deepcopy(model_cfg["vision_cfg"])
    return vision_cfg, int(model_cfg["embed_dim"]), bool(model_cfg.get("quick_gelu", False))


def _vision_cfg_fields() -> set:
    import dataclasses

    _open_clip()
    from open_clip.model import CLIPVisionCfg

    return {f.name for f in dataclasses.fields(CLIPVisionCfg)}


def _build_tower(encoder_cfg) -> nn.Module:
    """Build the bare open_clip image tower (random init, on the current default device)."""
    _open_clip()
    from open_clip.model import _build_vision_tower

    vision_cfg, proj_dim, quick_gelu = _resolve_tower_config(encoder_cfg)
    if isinstance(vision_cfg.get("layers"), (list, tuple)) and not vision_cfg.get("timm_model_name"):
        raise ValueError(
            f"{_CFG}.open_clip_model={encoder_cfg.open_clip_model!r} is a ResNet tower; only "
            f"ViT-style towers (open_clip VisionTransformer or timm ViT) produce patch tokens"
        )
    if not vision_cfg.get("timm_model_name"):
        vision_cfg["output_tokens"] = True
    return _build_vision_tower(proj_dim, vision_cfg, quick_gelu=quick_gelu)


def _tower_kind(tower: nn.Module) -> str:
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(tower, TimmModel):
        return "timm"
    if isinstance(tower, VisionTransformer):
        return "vit"
    raise ValueError(f"unsupported vision tower type {type(tower).__name__}")


def _expected_geometry(tower: nn.Module, kind: str) -> Tuple[Optional[Tuple[int, int]], Optional[int], Optional[int]]:
    """(image size, number of patch tokens, token width) the tower will produce, where knowable."""
    if kind == "timm":
        trunk = tower.trunk
        patch_embed = getattr(trunk, "patch_embed", None)
        img_size = tuple(getattr(patch_embed, "img_size", None) or ()) or None
        num_tokens = getattr(patch_embed, "num_patches", None)
        width = getattr(trunk, "num_features", None) or getattr(trunk, "embed_dim", None)
        return img_size, num_tokens, width
    if getattr(tower, "attn_pool", None) is not None:
        raise ValueError(
            "open_clip VisionTransformer towers with attentional_pool output pooled queries, not "
            "patch tokens: not supported as a vision encoder"
        )
    grid_h, grid_w = tower.grid_size
    extra = 1 if tower.pool_type == "none" else 0
    return tuple(tower.image_size), grid_h * grid_w + extra, tower.transformer.width


def _unused_param_names(tower: nn.Module, kind: str) -> List[str]:
    prefixes = _TIMM_UNUSED_PREFIXES if kind == "timm" else _VIT_UNUSED_PREFIXES
    return [n for n, _ in tower.named_parameters() if n.startswith(prefixes)]


# --------------------------------------------------------------------------------------------
# Encoder module
# --------------------------------------------------------------------------------------------


class SiglipPatchEncoder(nn.Module):
    """Image tower returning patch embeddings ``[b, num_image_tokens, embed_dim]``.

    The tower sits in ``self.visual`` so this module's state dict has open_clip's ``visual.*``
    key names. A frozen encoder has no trainable parameters, stays in eval mode whatever
    ``train()`` is asked, and runs its forward without autograd.
    """

    def __init__(self, tower: nn.Module, *, kind: str, num_image_tokens: int, embed_dim: int,
                 image_size: Tuple[int, int], frozen: bool, name: str):
        super().__init__()
        self.visual = tower
        self.kind = kind
        self.num_image_tokens = int(num_image_tokens)
        self.embed_dim = int(embed_dim)
        self.image_size = tuple(int(s) for s in image_size)
        self.frozen = bool(frozen)
        self.name = name
        self._num_prefix_tokens = int(getattr(tower.trunk, "num_prefix_tokens", 0)) if kind == "timm" else 0
        self.unused_param_names = _unused_param_names(tower, kind)
        # Parameters the tower itself declares fixed (e.g. sin-cos position tables) stay fixed.
        self.fixed_param_names = [n for n, p in tower.named_parameters() if not p.requires_grad]
        self.set_frozen(frozen)

    # -- freezing ------------------------------------------------------------------------------
    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no gradients, eval mode) or unfreeze the tower's patch-token parameters."""
        self.frozen = bool(frozen)
        unused = set(self.unused_param_names) | set(self.fixed_param_names)
        for pname, param in self.visual.named_parameters():
            param.requires_grad_(not self.frozen and pname not in unused)
        self.train(self.training and not self.frozen)

    def train(self, mode: bool = True) -> "SiglipPatchEncoder":
        return super().train(mode and not self.frozen)

    # -- forward -------------------------------------------------------------------------------
    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            feats = self.visual.trunk.forward_features(images)
            if feats.dim() == 4:  # convolutional trunk: [b, c, h, w] -> [b, h*w, c]
                feats = feats.flatten(2).transpose(1, 2)
            return feats[:, self._num_prefix_tokens:] if self._num_prefix_tokens else feats
        _, tokens = self.visual(images)
        return tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise RuntimeError(f"vision encoder expects images [b, 3, H, W]; got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"vision encoder {self.name!r} expects {self.image_size[0]}x{self.image_size[1]} images "
                f"({_CFG}.image_size); got {images.shape[-2]}x{images.shape[-1]}"
            )
        weight = next(self.visual.parameters())
        images = images.to(dtype=weight.dtype)
        if self.frozen:
            with torch.no_grad():
                tokens = self._tokens(images)
        else:
            tokens = self._tokens(images)
        if tokens.dim() != 3 or tokens.shape[1:] != (self.num_image_tokens, self.embed_dim):
            raise ValueError(
                f"vision encoder {self.name!r} produced patch embeddings of shape {tuple(tokens.shape)}, "
                f"expected [b, {_CFG}.num_image_tokens={self.num_image_tokens}, "
                f"{_CFG}.embed_dim={self.embed_dim}]"
            )
        return tokens

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, tokens={self.num_image_tokens}, embed_dim={self.embed_dim}, "
                f"image_size={self.image_size}, frozen={self.frozen}")


def _check_geometry(encoder_cfg, tower: nn.Module, kind: str) -> Tuple[int, int]:
    name = encoder_cfg.open_clip_model
    img_size, num_tokens, width = _expected_geometry(tower, kind)
    cfg_size = getattr(encoder_cfg, "image_size", None)
    if img_size is not None and cfg_size is not None:
        want = tuple(cfg_size) if isinstance(cfg_size, (list, tuple)) else (int(cfg_size), int(cfg_size))
        if tuple(img_size) != want:
            raise ValueError(
                f"{_CFG}.image_size={cfg_size} does not match the image size {tuple(img_size)} of "
                f"{_CFG}.open_clip_model={name!r}"
            )
    problems = []
    if num_tokens is not None and num_tokens != encoder_cfg.num_image_tokens:
        problems.append(f"{_CFG}.num_image_tokens={encoder_cfg.num_image_tokens} but the tower gives {num_tokens} tokens")
    if width is not None and width != encoder_cfg.embed_dim:
        problems.append(f"{_CFG}.embed_dim={encoder_cfg.embed_dim} but the tower's token width is {width}")
    if problems:
        raise ValueError(
            f"vision encoder {_CFG}.open_clip_model={name!r} outputs patch embeddings of shape "
            f"[b, {num_tokens}, {width}]: " + "; ".join(problems)
        )
    return (img_size if img_size is not None else (cfg_size, cfg_size)), num_tokens


def build_vision_encoder(encoder_cfg) -> SiglipPatchEncoder:
    """Build the image tower named by ``encoder_cfg`` and load its weights if a file is given.

    Raises ``ValueError`` when the tower's output shape does not match
    ``encoder_cfg.num_image_tokens`` / ``encoder_cfg.embed_dim``, and the errors of
    :func:`load_vision_weights` for a bad weights file.
    """
    name = encoder_cfg.open_clip_model
    weights_path = getattr(encoder_cfg, "weights_path", None)
    if weights_path is not None and not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{_CFG}.weights_path={weights_path!r}: no such file")
    # Check the geometry on a tower built without allocation, so a config mismatch fails fast.
    with torch.device("meta"):
        meta_tower = _build_tower(encoder_cfg)
    kind = _tower_kind(meta_tower)
    image_size, _ = _check_geometry(encoder_cfg, meta_tower, kind)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if weights_path is None:
        del meta_tower
        tower = _build_tower(encoder_cfg)
    else:
        # Take the file's tensors as the parameters of the meta-built tower.
        state = _read_state_dict(weights_path)
        _check_state_dict(meta_tower, state, weights_path, f"{_CFG}.open_clip_model={name!r}")
        tower = _materialize_with(meta_tower, state, encoder_cfg)
        del state
    encoder = SiglipPatchEncoder(
        tower, kind=kind, num_image_tokens=encoder_cfg.num_image_tokens,
        embed_dim=encoder_cfg.embed_dim, image_size=image_size,
        frozen=bool(getattr(encoder_cfg, "frozen", True)), name=name,
    )
    n_params = sum(p.numel() for p in encoder.parameters())
    if encoder.frozen:
        logger.info("vision encoder %s (%s params, weights: %s): frozen (eval mode, no gradients)",
                    name, f"{n_params:,}", weights_path or "random init")
    else:
        n_train = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        logger.info("vision encoder %s (%s params, weights: %s): trainable (%s params train; %d head "
                    "tensors unused by the patch tokens stay frozen)", name, f"{n_params:,}",
                    weights_path or "random init", f"{n_train:,}", len(encoder.unused_param_names))
    return encoder


def count_encoder_parameters(encoder_cfg) -> int:
    """Number of parameters of the whole image tower, counted on the meta device (no allocation)."""
    with torch.device("meta"):
        tower = _build_tower(encoder_cfg)
    return sum(p.numel() for p in tower.parameters())


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision encoder weights file {path!r}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            if any(k.startswith("visual.") for k in names):  # read only the image tower
                names = [k for k in names if k.startswith("visual.")]
            obj: Any = {k: f.get_tensor(k) for k in names}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"vision encoder weights file {path!r} does not hold a state dict (got {type(obj).__name__})")
    state = dict(obj)
    for wrapper in ("module.", "_orig_mod."):
        if state and all(k.startswith(wrapper) for k in state):
            state = {k[len(wrapper):]: v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        # Full open_clip state dict: keep the image tower, ignore the text tower and logit scales.
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"vision encoder weights file {path!r} has non-tensor entries: {_show(bad)}")
    return state


def _show(keys: List[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else f" ({len(keys)})"
    return shown + more


def load_vision_weights(encoder: nn.Module, path: str) -> None:
    """Load a local weights file into an encoder's image tower, strictly.

    ``encoder`` is a :class:`SiglipPatchEncoder` or a bare open_clip tower. The file (safetensors,
    or a torch pickle read with ``weights_only=True``) holds either a full open_clip state dict
    (``visual.*`` keys are used, all others ignored) or a tower-only state dict. Missing,
    unexpected or wrongly shaped keys raise one ``ValueError`` naming the file and the keys.
    """
    is_encoder = isinstance(encoder, SiglipPatchEncoder)
    tower = encoder.visual if is_encoder else encoder
    state = _read_state_dict(path)
    _check_state_dict(tower, state, path, f"vision encoder {encoder.name!r}" if is_encoder
                      else "the tower")
    tower.load_state_dict(state, strict=True)
    logger.info("vision encoder weights loaded from %s (%d tensors)", path, len(state))


def _check_state_dict(tower: nn.Module, state: Mapping, path: str, target: str) -> None:
    """Raise one ValueError naming the file, the first tensors whose shapes differ (expected
    vs found, in the tower's order: the patch embedding comes first and tells the most), the
    missing and unexpected keys, and which encoders the tower and the file seem to be."""
    expected = tower.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} expected {list(v.shape)} found {list(state[k].shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if mismatched:
        more = (f" ({len(mismatched)} in all)" if len(mismatched) > _MAX_SHAPES_SHOWN else "")
        parts.append(f"shapes differ: {'; '.join(mismatched[:_MAX_SHAPES_SHOWN])}{more}")
    if missing:
        parts.append(f"missing keys: {_show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_show(unexpected)}")
    ours = describe_weights({k: tuple(v.shape) for k, v in expected.items()})
    theirs = describe_weights({k: tuple(v.shape) for k, v in state.items()})
    if ours:
        parts.append(f"the encoder is {ours}")
    parts.append(f"the file seems to hold {theirs}" if theirs else
                 "the file is no image tower this check knows (open_clip, timm or transformers)")
    raise ValueError(f"vision encoder weights {path!r} do not fit {target}: " + "; ".join(parts))


# How each known layout names its patch embedding (conv weight [width, 3, patch, patch]),
# position table and blocks: the keys that tell which encoder a weights file holds.
_LAYOUTS = (
    ("a timm ViT tower in open_clip's layout", "trunk.patch_embed.proj.weight",
     "trunk.pos_embed", "trunk.blocks."),
    ("an open_clip ViT tower", "conv1.weight", "positional_embedding", "transformer.resblocks."),
    ("a bare timm ViT state dict (no open_clip 'trunk.' prefix: not open_clip's file)",
     "patch_embed.proj.weight", "pos_embed", "blocks."),
    ("a Hugging Face transformers checkpoint (vision_model.* keys: not open_clip's file)",
     "vision_model.embeddings.patch_embedding.weight",
     "vision_model.embeddings.position_embedding.weight", "vision_model.encoder.layers."),
)


def describe_weights(shapes: Mapping[str, Tuple[int, ...]]) -> Optional[str]:
    """Which image tower a state dict's key names and shapes describe, e.g. ``a timm ViT tower
    in open_clip's layout: width 1152, 27 blocks, patch 14, 27x27 patches`` (SigLIP so400m at
    384 px); None when no known layout fits. The patch grid is given where the position table
    is a square (plus a class token), else the number of positions."""
    for layout, patch_key, pos_key, block_prefix in _LAYOUTS:
        patch = shapes.get(patch_key)
        if patch is None or len(patch) != 4:
            continue
        blocks = {k[len(block_prefix):].split(".", 1)[0] for k in shapes
                  if k.startswith(block_prefix)}
        facts = [f"width {patch[0]}", f"{len(blocks)} blocks", f"patch {patch[-1]}"]
        positions = shapes.get(pos_key)
        if positions is not None and len(positions) >= 2:
            n = positions[-2]
            roots = (round(n ** 0.5), round(max(n - 1, 0) ** 0.5))
            side = next((r for r in roots if r and r * r in (n, n - 1)), None)
            facts.append(f"{side}x{side} patches" if side else f"{n} positions")
        return f"{layout}: {', '.join(facts)}"
    return None


def _materialize_with(meta_tower: nn.Module, state: Mapping, encoder_cfg) -> nn.Module:
    """Turn a meta-device tower into a CPU one whose tensors are taken from ``state``.

    Tensors are cast to the dtype the tower was built with. If the tower holds tensors that are
    not in its state dict (non-persistent buffers), it is rebuilt for real and loaded by copy.
    """
    expected = meta_tower.state_dict()
    n_tensors = sum(1 for _ in meta_tower.parameters()) + sum(1 for _ in meta_tower.buffers())
    if n_tensors != len(expected):
        tower = _build_tower(encoder_cfg)
        tower.load_state_dict(state, strict=True)
        return tower
    cast = {k: (v.to(expected[k].dtype) if v.is_floating_point() else v) for k, v in state.items()}
    meta_tower.load_state_dict(cast, strict=True, assign=True)
    leftover = [n for n, t in list(meta_tower.named_parameters()) + list(meta_tower.named_buffers()) if t.is_meta]
    if leftover:
        tower = _build_tower(encoder_cfg)
        tower.load_state_dict(state, strict=True)
        return tower
    return meta_tower


# --------------------------------------------------------------------------------------------
# Checking a weights file from the shell
# --------------------------------------------------------------------------------------------

_CHECK_PROG = "python -m megatron_vlm.model.vision_encoder"


def main(argv=None) -> int:
    """Loads ``model.encoder.weights_path`` into the recipe's encoder, as training and the
    precompute tool do, and prints one line: that it fits, or (exit status 2) why not."""
    from megatron_vlm.config import config_arg_parser, load_config
    from megatron_vlm.logs import configure_logging

    configure_logging()
    parser = config_arg_parser(
        "Check a vision encoder weights file against a recipe's encoder (model.encoder.*), "
        f"e.g. {_CHECK_PROG} --recipe 1b model.encoder.weights_path=siglip.safetensors",
        prog=_CHECK_PROG)
    args = parser.parse_intermixed_args(argv)
    enc_cfg = load_config(args.recipe, args.overrides).model.encoder
    if enc_cfg.weights_path is None:
        raise ValueError(f"{_CFG}.weights_path is null: give {_CFG}.weights_path=FILE, the "
                         f"weights file to check")
    tower = build_vision_encoder(enc_cfg).visual
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    print(f"{enc_cfg.weights_path} fits {_CFG}.open_clip_model={enc_cfg.open_clip_model!r} "
          f"({describe_weights(shapes)})")
    return 0


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, _CHECK_PROG)
