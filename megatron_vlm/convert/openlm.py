"""The DCLM/OpenLM checkpoint layout and its mapping onto this project's megatron-core decoder.

Everything here is torch only (no megatron-core, no process group) and works on tensors of any
device, the ``meta`` device included, so the mapping of a 7B state dict can be checked without
its weights.

OpenLM keys (``module.`` / ``_orig_mod.`` / ``model.`` prefixes stripped) and the decoder's keys
at TP=PP=1 (prefix ``language_model.``):

======================================== ============================================ ==========
OpenLM                                   megatron (``language_model.``)               transform
======================================== ============================================ ==========
tok_embeddings.weight [V, d]             embedding.word_embeddings.weight [V', d]     pad rows
layers.N.attention_norm.weight [d]       decoder.layers.N.input_layernorm.weight
layers.N.attention.in_proj.weight        decoder.layers.N.self_attention.linear_qkv   regroup
  [3d, d] rows [Q; K; V]                   .weight [3d, d] rows per head [q_h;k_h;v_h]
layers.N.attention.q_norm.weight [d]     decoder.layers.N.self_attention.q_layernorm.weight
layers.N.attention.k_norm.weight [d]     decoder.layers.N.self_attention.k_layernorm.weight
layers.N.attention.out_proj.weight       decoder.layers.N.self_attention.linear_proj.weight
layers.N.attention.pos_embed.inv_freq    (recomputed from the rotary base; checked)   dropped
layers.N.ffn_norm.weight [d]             decoder.layers.N.pre_mlp_layernorm.weight
layers.N.feed_forward.w12.weight [2f, d] decoder.layers.N.mlp.linear_fc1.weight       as is
  rows [gate; up]                          rows [gate; up]
layers.N.feed_forward.w3.weight [d, f]   decoder.layers.N.mlp.linear_fc2.weight
norm.weight [d]                          decoder.final_layernorm.weight
output.weight [V, d]                     output_layer.weight [V', d]                  pad rows
======================================== ============================================ ==========

``V'`` is the vocabulary padded for tensor parallelism (zero rows appended). megatron's GLU
``linear_fc1`` holds ``[gate; up]`` like ``w12`` at TP=1; its sharded state dict splits each half
across TP ranks separately, so the halves stay whole per rank at any layout.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from megatron_vlm.fsutil import sha256_file

# Prefixes that training wrappers (DDP, torch.compile) and the HF layout put before every key.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")

EMBEDDING = "tok_embeddings.weight"
FINAL_NORM = "norm.weight"
OUTPUT = "output.weight"
INV_FREQ = "attention.pos_embed.inv_freq"
Q_NORM = "attention.q_norm.weight"
K_NORM = "attention.k_norm.weight"

# (OpenLM key inside layers.N., megatron key inside language_model.decoder.layers.N.)
LAYER_MAP = (
    ("attention_norm.weight", "input_layernorm.weight"),
    ("attention.in_proj.weight", "self_attention.linear_qkv.weight"),
    (Q_NORM, "self_attention.q_layernorm.weight"),
    (K_NORM, "self_attention.k_layernorm.weight"),
    ("attention.out_proj.weight", "self_attention.linear_proj.weight"),
    ("ffn_norm.weight", "pre_mlp_layernorm.weight"),
    ("feed_forward.w12.weight", "mlp.linear_fc1.weight"),
    ("feed_forward.w3.weight", "mlp.linear_fc2.weight"),
)
GLOBAL_MAP = (
    (EMBEDDING, "language_model.embedding.word_embeddings.weight"),
    (FINAL_NORM, "language_model.decoder.final_layernorm.weight"),
    (OUTPUT, "language_model.output_layer.weight"),
)
MEGATRON_LAYER_PREFIX = "language_model.decoder.layers."
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_KNOWN_SUFFIXES = tuple(k for k, _ in GLOBAL_MAP) + tuple(k for k, _ in LAYER_MAP) + (INV_FREQ,)


def swiglu_hidden(hidden_size: int) -> int:
    """OpenLM's SwiGLU width: 256 * ceil(int(8 d / 3) / 256)."""
    return 256 * math.ceil(int(8 * hidden_size / 3) / 256)


def rotary_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """The rotary frequencies OpenLM stores as ``pos_embed.inv_freq``: base^(-2i/head_dim)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


@dataclass(frozen=True)
class OpenLMShape:
    """The decoder dimensions a checkpoint implies."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    """Rows of ``tok_embeddings`` / ``output`` in the OpenLM checkpoint (before TP padding)."""
    ffn_hidden_size: int
    qk_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


def openlm_shapes(shape: OpenLMShape, with_inv_freq: bool = False) -> dict[str, tuple]:
    """Every OpenLM key of a decoder of ``shape`` and its tensor shape."""
    d, f, v = shape.hidden_size, shape.ffn_hidden_size, shape.vocab_size
    per_layer = {
        "attention_norm.weight": (d,),
        "attention.in_proj.weight": (3 * d, d),
        "attention.out_proj.weight": (d, d),
        "ffn_norm.weight": (d,),
        "feed_forward.w12.weight": (2 * f, d),
        "feed_forward.w3.weight": (d, f),
    }
    if shape.qk_norm:
        per_layer[Q_NORM] = (d,)
        per_layer[K_NORM] = (d,)
    if with_inv_freq:
        per_layer[INV_FREQ] = (shape.head_dim // 2,)
    out = {EMBEDDING: (v, d)}
    for i in range(shape.num_layers):
        out.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    out[FINAL_NORM] = (d,)
    out[OUTPUT] = (v, d)
    return out


def megatron_decoder_shapes(num_layers: int, hidden_size: int, ffn_hidden_size: int,
                            vocab_size: int, qk_norm: bool = True) -> dict[str, tuple]:
    """Every decoder parameter of this project's VLM at TP=PP=1 (``language_model.*``) and its
    shape, for a (padded) ``vocab_size``."""
    d, f = hidden_size, ffn_hidden_size
    per_layer = {
        "input_layernorm.weight": (d,),
        "self_attention.linear_qkv.weight": (3 * d, d),
        "self_attention.linear_proj.weight": (d, d),
        "pre_mlp_layernorm.weight": (d,),
        "mlp.linear_fc1.weight": (2 * f, d),
        "mlp.linear_fc2.weight": (d, f),
    }
    if qk_norm:
        per_layer["self_attention.q_layernorm.weight"] = (d,)
        per_layer["self_attention.k_layernorm.weight"] = (d,)
    out = {"language_model.embedding.word_embeddings.weight": (vocab_size, d)}
    for i in range(num_layers):
        out.update({f"{MEGATRON_LAYER_PREFIX}{i}.{k}": s for k, s in per_layer.items()})
    out["language_model.decoder.final_layernorm.weight"] = (d,)
    out["language_model.output_layer.weight"] = (vocab_size, d)
    return out


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 1) -> int:
    """The smallest size >= ``vocab_size`` divisible by ``multiple * tensor_parallel``."""
    if tensor_parallel < 1 or multiple < 1:
        raise ValueError(f"tensor_parallel={tensor_parallel} and vocab multiple={multiple} must "
                         "be positive")
    step = multiple * tensor_parallel
    return step * math.ceil(vocab_size / step)


# ------------------------------------------------------------------------------------- keys


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without leading ``module.`` / ``_orig_mod.`` / ``model.`` (any order, repeated)."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        original = key
        changed = True
        while changed:
            changed = False
            for prefix in KNOWN_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if key in out:
            raise ValueError(f"OpenLM checkpoint key {original!r} duplicates {key!r} once the "
                             f"prefixes {', '.join(KNOWN_PREFIXES)} are stripped")
        out[key] = value
    return out


_KEY_TAIL = re.compile(r"(?:^|\.)(?P<tail>layers\.\d+\.(?P<layer>.+)|"
                       + "|".join(re.escape(k) for k, _ in GLOBAL_MAP) + r")$")


def _unknown_key_error(key: str) -> ValueError:
    """The error for a key outside the layout: names a foreign prefix when the rest is known."""
    match = _KEY_TAIL.search(key)
    if match and (match.group("layer") is None or match.group("layer") in _KNOWN_SUFFIXES):
        prefix = key[:match.start("tail")]
        if prefix:
            return ValueError(
                f"OpenLM checkpoint key {key!r} has an unknown prefix {prefix!r} (known "
                f"prefixes: {', '.join(KNOWN_PREFIXES)})")
    return ValueError(f"OpenLM checkpoint has an unexpected key {key!r} (not part of the "
                      "DCLM/OpenLM decoder layout)")


def _first_and_rest(keys: list[str]) -> str:
    return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


# ------------------------------------------------------------------------------------- shape


def infer_shape(state_dict: Mapping[str, torch.Tensor], num_heads: Optional[int] = None
                ) -> OpenLMShape:
    """The decoder shape of an OpenLM state dict (prefixes already stripped), after checking
    every key and shape. Any problem raises one ValueError naming the key.

    The number of heads is not visible in the weight shapes (qk-norm is full width): it comes
    from ``num_heads``, or else from the ``pos_embed.inv_freq`` buffers (head_dim / 2 entries).
    """
    keys = list(state_dict)
    # Unknown keys first: a foreign prefix would otherwise be reported as missing keys.
    for key in keys:
        m = _LAYER_KEY.match(key)
        if not (key in (EMBEDDING, FINAL_NORM, OUTPUT) or (m and m.group(2) in _KNOWN_SUFFIXES)):
            raise _unknown_key_error(key)
    if EMBEDDING not in state_dict:
        raise ValueError(f"OpenLM checkpoint key {EMBEDDING!r} is missing")
    embedding = state_dict[EMBEDDING]
    if embedding.dim() != 2:
        raise ValueError(f"OpenLM checkpoint key {EMBEDDING!r} has shape "
                         f"{list(embedding.shape)}; expected [vocab, d_model]")
    vocab, hidden = (int(x) for x in embedding.shape)
    layer_ids = sorted({int(_LAYER_KEY.match(k).group(1)) for k in keys if _LAYER_KEY.match(k)})
    if not layer_ids:
        raise ValueError("OpenLM checkpoint has no 'layers.N.*' keys")
    num_layers = layer_ids[-1] + 1
    w3 = "layers.0.feed_forward.w3.weight"
    if w3 not in state_dict:
        raise ValueError(f"OpenLM checkpoint key {w3!r} is missing")
    if state_dict[w3].dim() != 2:
        raise ValueError(f"OpenLM checkpoint key {w3!r} has shape {list(state_dict[w3].shape)}; "
                         "expected [d_model, ffn_hidden]")
    ffn = int(state_dict[w3].shape[1])
    qk_norm = any(k.endswith(Q_NORM) or k.endswith(K_NORM) for k in keys)
    inv_freq_keys = [k for k in keys if k.endswith(INV_FREQ)]
    if num_heads is None:
        if not inv_freq_keys:
            raise ValueError(
                "cannot tell the number of attention heads: the checkpoint has no "
                f"'layers.N.{INV_FREQ}' buffers; give the head count (--num-heads)")
        half = state_dict[inv_freq_keys[0]].numel()
        if half < 1 or hidden % (2 * half):
            raise ValueError(f"OpenLM checkpoint key {inv_freq_keys[0]!r} has {half} entries, "
                             f"which is no head dim / 2 of d_model={hidden}")
        num_heads = hidden // (2 * half)
    if num_heads < 1 or hidden % num_heads:
        raise ValueError(f"d_model={hidden} (from {EMBEDDING!r}) is not divisible by "
                         f"num_heads={num_heads}")
    shape = OpenLMShape(num_layers, hidden, num_heads, vocab, ffn, qk_norm)
    expected = openlm_shapes(shape)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"OpenLM checkpoint key {_first_and_rest(missing)} is missing "
                         f"(a {num_layers}-layer decoder{' with qk-norm' if qk_norm else ''} "
                         "needs it)")
    for key, want in expected.items():
        got = tuple(state_dict[key].shape)
        if got != want:
            raise ValueError(f"OpenLM checkpoint key {key!r} has shape {list(got)}; expected "
                             f"{list(want)} for d_model={hidden}, ffn_hidden={ffn}, "
                             f"vocab={vocab}")
    for key in inv_freq_keys:
        if tuple(state_dict[key].shape) != (shape.head_dim // 2,):
            raise ValueError(f"OpenLM checkpoint key {key!r} has shape "
                             f"{list(state_dict[key].shape)}; expected [{shape.head_dim // 2}] "
                             f"(head dim {shape.head_dim} / 2 with {num_heads} heads)")
    return shape


def check_inv_freq(state_dict: Mapping[str, torch.Tensor], head_dim: int, base: float) -> None:
    """Checks stored ``pos_embed.inv_freq`` buffers against NeoX rotary frequencies for
    ``base`` over ``head_dim`` (meta tensors are skipped)."""
    reference = rotary_inv_freq(head_dim, base)
    for key, value in state_dict.items():
        if not key.endswith(INV_FREQ) or value.device.type == "meta":
            continue
        if tuple(value.shape) != tuple(reference.shape) or not torch.allclose(
                value.float().cpu(), reference, rtol=1e-4, atol=0):
            raise ValueError(f"OpenLM checkpoint key {key!r} does not hold NeoX rotary "
                             f"frequencies for base {base:g} over head dim {head_dim} (check "
                             "the head count and model.decoder.rotary_base)")


# ------------------------------------------------------------------------------------- mapping


def qkv_openlm_to_megatron(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows [Q; K; V] (head h at rows h*hd:(h+1)*hd of each block) -> per head [q_h; k_h; v_h]."""
    rows, cols = weight.shape
    head_dim = rows // (3 * num_heads)
    return weight.reshape(3, num_heads, head_dim, cols).transpose(0, 1).reshape(rows, cols)


def qkv_megatron_to_openlm(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`qkv_openlm_to_megatron`."""
    rows, cols = weight.shape
    head_dim = rows // (3 * num_heads)
    return weight.reshape(num_heads, 3, head_dim, cols).transpose(0, 1).reshape(rows, cols)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - weight.shape[0]
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros((extra, weight.shape[1]))], dim=0)


class MegatronView(Mapping):
    """The decoder's TP=PP=1 tensors (``language_model.*``) computed from an OpenLM state dict
    on access, one at a time: a converting rank touches only the tensors of its own pipeline
    stage and never holds a second copy of the whole model."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], shape: OpenLMShape,
                 vocab_size: Optional[int] = None):
        vocab_size = shape.vocab_size if vocab_size is None else vocab_size
        if vocab_size < shape.vocab_size:
            raise ValueError(f"padded vocabulary {vocab_size} is smaller than the checkpoint's "
                             f"{shape.vocab_size} rows ({EMBEDDING!r})")
        self.state_dict, self.shape, self.vocab_size = state_dict, shape, vocab_size
        self._sources: dict[str, str] = {}
        for src, dst in GLOBAL_MAP:
            self._sources[dst] = src
        for i in range(shape.num_layers):
            for src, dst in LAYER_MAP:
                key = f"layers.{i}.{src}"
                if key in state_dict:  # q/k norms are absent from a decoder without qk-norm
                    self._sources[f"{MEGATRON_LAYER_PREFIX}{i}.{dst}"] = key
        self._order = sorted(self._sources, key=_megatron_order)

    def source_key(self, name: str) -> str:
        """The OpenLM key a megatron tensor comes from."""
        return self._sources[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self._sources[name]
        tensor = self.state_dict[key]
        if key in (EMBEDDING, OUTPUT):
            return _pad_rows(tensor, self.vocab_size)
        if key.endswith("attention.in_proj.weight"):
            return qkv_openlm_to_megatron(tensor, self.shape.num_heads)
        return tensor

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name) -> bool:
        return name in self._sources


def openlm_to_megatron(state_dict: Mapping[str, torch.Tensor], shape: OpenLMShape,
                       vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The decoder's TP=PP=1 tensors (``language_model.*``) from a checked OpenLM state dict.

    ``vocab_size`` (default: the checkpoint's rows) is the padded vocabulary: zero rows are
    appended to the input embedding and the output layer.
    """
    view = MegatronView(state_dict, shape, vocab_size)
    return {name: view[name] for name in view}


def megatron_to_openlm(tensors: Mapping[str, torch.Tensor], num_heads: int,
                       vocab_size: Optional[int] = None, rotary_base: Optional[float] = 10000.0
                       ) -> dict[str, torch.Tensor]:
    """OpenLM keys from the decoder's TP=PP=1 tensors (``language_model.*``; other keys are
    ignored). ``vocab_size`` keeps that many embedding/output rows (default: all); with a
    ``rotary_base`` each layer also gets its ``pos_embed.inv_freq`` buffer."""
    inverse = {dst: src for src, dst in GLOBAL_MAP}
    layer_inverse = {dst: src for src, dst in LAYER_MAP}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key in inverse:
            src = inverse[key]
            if src in (EMBEDDING, OUTPUT) and vocab_size is not None:
                if vocab_size > tensor.shape[0]:
                    raise ValueError(f"vocabulary {vocab_size} is larger than the checkpoint's "
                                     f"{tensor.shape[0]} rows ({key!r})")
                tensor = tensor[:vocab_size]
            out[src] = tensor
        elif key.startswith(MEGATRON_LAYER_PREFIX):
            index, rest = key[len(MEGATRON_LAYER_PREFIX):].split(".", 1)
            if rest not in layer_inverse:
                raise ValueError(f"decoder key {key!r} has no OpenLM counterpart")
            src = layer_inverse[rest]
            if src == "attention.in_proj.weight":
                tensor = qkv_megatron_to_openlm(tensor, num_heads)
            out[f"layers.{index}.{src}"] = tensor
            if rotary_base is not None and src == "attention_norm.weight":
                out[f"layers.{index}.{INV_FREQ}"] = rotary_inv_freq(
                    tensor.shape[0] // num_heads, rotary_base)
        elif key.startswith("language_model."):
            raise ValueError(f"decoder key {key!r} has no OpenLM counterpart")
    return dict(sorted(out.items(), key=lambda kv: _openlm_order(kv[0])))


def _megatron_order(key: str):
    if key.startswith(MEGATRON_LAYER_PREFIX):
        index, rest = key[len(MEGATRON_LAYER_PREFIX):].split(".", 1)
        return (1, int(index), rest)
    return (0 if "embedding" in key else 2, 0, key)


def _openlm_order(key: str):
    m = _LAYER_KEY.match(key)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if key == EMBEDDING else 2, 0, key)


# ------------------------------------------------------------------------------------- reading


@dataclass
class SourceInfo:
    """Where a state dict came from and what its file said about training progress."""

    path: str
    format: str
    """'openlm' (epoch_K.pt with state_dict), 'state_dict' (a bare .pt state dict) or
    'safetensors' (HF layout)."""
    files: list = field(default_factory=list)
    """[{"path", "sha256"}] of every file read."""
    step: Optional[int] = None
    epoch: Optional[int] = None
    samples_seen: Optional[int] = None
    percentage_of_data_seen: Optional[float] = None
    stats_path: Optional[str] = None
    config: Optional[dict] = None
    """A config.json / params.json found beside the weights (used for the head count)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _torch_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) files cannot be mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read it with torch.load(weights_only=True) ({err}); "
                         "only tensors and plain Python values are accepted") from err


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.safetensors files")
        return files
    return [path]


def _side_config(directory: Path) -> Optional[dict]:
    for name in ("openlm_config.json", "params.json", "config.json"):
        candidate = directory / name
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                return {"file": str(candidate), **data}
    return None


def heads_from_config(config: Optional[dict]) -> Optional[int]:
    """The attention head count named in a side config (this project's export, or common
    OpenLM / HF spellings), or None."""
    if not config:
        return None
    for holder in (config, config.get("params") if isinstance(config.get("params"), dict) else {}):
        for name in ("num_heads", "n_heads", "num_attention_heads"):
            value = holder.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def read_openlm(path: str | os.PathLike, hash_files: bool = True
                ) -> tuple[dict[str, torch.Tensor], SourceInfo]:
    """The state dict (prefixes stripped) and provenance of an OpenLM checkpoint.

    Accepts an OpenLM ``epoch_K.pt`` (a dict with ``state_dict``, ``step``, ...; a ``stats_K.pt``
    beside it is read too), a bare ``.pt`` state dict, or HF-layout safetensors (a file, or a
    directory of shards; keys prefixed ``model.``). Files are read with
    ``torch.load(weights_only=True)`` (memory-mapped where possible) or safetensors.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"OpenLM checkpoint {path} does not exist")
    if path.is_dir() or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        files = _safetensors_files(path)
        state: dict[str, torch.Tensor] = {}
        for f in files:
            part = load_file(str(f))
            clash = sorted(set(part) & set(state))
            if clash:
                raise ValueError(f"{f}: key {clash[0]!r} also appears in another shard")
            state.update(part)
        info = SourceInfo(str(path.resolve()), "safetensors",
                          config=_side_config(path if path.is_dir() else path.parent))
    else:
        files = [path]
        loaded = _torch_load(path)
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a dict (an OpenLM checkpoint or a state dict), "
                             f"got {type(loaded).__name__}")
        if "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
            state = dict(loaded["state_dict"])
            info = SourceInfo(str(path.resolve()), "openlm", step=_scalar(loaded.get("step")),
                              epoch=_scalar(loaded.get("epoch")),
                              samples_seen=_scalar(loaded.get("samples_seen")))
        else:
            state = dict(loaded)
            info = SourceInfo(str(path.resolve()), "state_dict")
        non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if non_tensors:
            raise ValueError(f"OpenLM checkpoint key {non_tensors[0]!r} holds a "
                             f"{type(state[non_tensors[0]]).__name__}, not a tensor")
        info.config = _side_config(path.parent)
        m = re.match(r"^epoch_(\d+)\.pt$", path.name)
        stats = path.with_name(f"stats_{m.group(1)}.pt") if m else None
        if stats is not None and stats.is_file():
            data = _torch_load(stats)
            if isinstance(data, Mapping):
                files.append(stats)
                info.stats_path = str(stats.resolve())
                pct = _scalar(data.get("percentage_of_data_seen"))
                info.percentage_of_data_seen = None if pct is None else float(pct)
                if info.step is None and data.get("step") is not None:
                    info.step = int(_scalar(data["step"]))
    if info.step is not None:
        info.step = int(info.step)
    info.files = [{"path": str(f.resolve()), "sha256": sha256_file(f) if hash_files else None}
                  for f in files]
    return strip_prefixes(state), info
