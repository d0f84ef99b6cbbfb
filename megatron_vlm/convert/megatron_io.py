"""OpenLM checkpoints in and out of this project's megatron-core checkpoints.

**Into megatron** (:func:`convert_openlm`): the OpenLM state dict is read and checked, mapped to
the decoder's TP=PP=1 tensors (:mod:`megatron_vlm.convert.openlm`), and copied into a VLM built
with :func:`megatron_vlm.model.build.build_model` at the layout of the running process group:

* one process: the model is built at TP=PP=1 and saved from there. A megatron-core distributed
  checkpoint stores every tensor with its global shape and offsets, so it loads at any TP/PP
  whose divisibility the config allows (the vocabulary is padded for the requested TP); this is
  the default and needs no launcher;
* under ``torchrun`` with ``tp * pp`` ranks: every rank builds its own stage and TP shard and
  copies its slices (embedding/output rows, fused-QKV rows per head group, each SwiGLU half
  separately, column/row-parallel splits, the full-width qk-norm gain's slice), then the ranks
  save together. Each rank holds only its share of the model, which is what a 7B conversion on
  small hosts needs.

The result is a directory holding a ``dist_checkpointing`` save of ``{"model": ...}`` under the
same keys :func:`megatron_vlm.training.checkpointing.save_checkpoint` writes, and a
``common.json`` (step, schedule metadata, loader state, fraction, resolved config, source file
and hash). It has no optimizer state and no RNG state: start training from it with
``checkpoint.load=DIR checkpoint.load_optimizer=false``. Parts of the VLM that OpenLM does not
have (the projector, an online vision encoder) are saved at their initialization (seeded by
the config's ``seed``), unless a projector file from :func:`export_openlm` is given.

**Out of megatron** (:func:`export_openlm`): a checkpoint of any layout is loaded at TP=PP=1
in one process (megatron-core reshards it) and written as OpenLM-layout safetensors for the
decoder, with the projector's weights in a separate file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from collections import ChainMap
from typing import Mapping, Optional, Sequence

import torch

from megatron_vlm.convert import openlm
from megatron_vlm.convert.metadata import ScheduleArgs, check_tokenizer, schedule_metadata
from megatron_vlm.fsutil import sha256_file
from megatron_vlm.training.checkpointing import is_rank0

logger = logging.getLogger("megatron_vlm")

DECODER_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                      "ffn_hidden_size", "qk_norm")
LAYOUT_KEYS = ("parallel.tensor_parallel", "parallel.pipeline_parallel")
DECODER_FILE = "model.safetensors"
PROJECTOR_FILE = "projector.safetensors"
ENCODER_FILE = "vision_encoder.safetensors"
CONFIG_FILE = "openlm_config.json"


# ------------------------------------------------------------------------------------- config


def pick_recipe(shape: openlm.OpenLMShape) -> str:
    """The shipped recipe whose decoder has the checkpoint's layers, width and heads."""
    from megatron_vlm.config import available_recipes, load_config

    for name in available_recipes():
        dec = load_config(name).model.decoder
        if (dec.num_layers, dec.hidden_size, dec.num_attention_heads) == (
                shape.num_layers, shape.hidden_size, shape.num_heads):
            return name
    raise ValueError(
        f"no shipped recipe has a decoder of {shape.num_layers} layers, d_model "
        f"{shape.hidden_size} and {shape.num_heads} heads; give --recipe (the recipe or YAML "
        "config the converted checkpoint will train with, for the projector and encoder)")


def converted_config(shape: openlm.OpenLMShape, tensor_parallel: int = 1,
                     pipeline_parallel: int = 1, recipe: Optional[str] = None,
                     overrides: Sequence[str] = (), vocab_multiple: int = 1):
    """The RunConfig of the converted checkpoint: ``recipe`` (default: the recipe with the same
    decoder shape) plus ``overrides``, with the decoder shape taken from the checkpoint, the
    vocabulary padded for ``tensor_parallel`` and the layout set to TP x PP."""
    from megatron_vlm.config import load_config

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in {f"model.decoder.{k}" for k in DECODER_SHAPE_KEYS}:
            raise ValueError(f"override {item!r}: {key} comes from the checkpoint; leave it out")
        if key in LAYOUT_KEYS:
            raise ValueError(f"override {item!r}: give the layout as --tp / --pp")
    recipe = recipe or pick_recipe(shape)
    padded = openlm.padded_vocab_size(shape.vocab_size, tensor_parallel, vocab_multiple)
    ffn = None if shape.ffn_hidden_size == openlm.swiglu_hidden(shape.hidden_size) \
        else shape.ffn_hidden_size
    forced = [
        f"model.decoder.num_layers={shape.num_layers}",
        f"model.decoder.hidden_size={shape.hidden_size}",
        f"model.decoder.num_attention_heads={shape.num_heads}",
        f"model.decoder.vocab_size={padded}",
        f"model.decoder.ffn_hidden_size={'null' if ffn is None else ffn}",
        f"model.decoder.qk_norm={'true' if shape.qk_norm else 'false'}",
        f"parallel.tensor_parallel={tensor_parallel}",
        f"parallel.pipeline_parallel={pipeline_parallel}",
        "parallel.data_parallel=null",
    ]
    cfg = load_config(recipe, [*overrides, *forced])
    cfg.validate_parallel(tensor_parallel * pipeline_parallel)
    cfg.parallel.data_parallel = None
    return cfg


def training_overrides(cfg) -> list[str]:
    """The decoder-shape overrides a training command needs to load the converted checkpoint."""
    dec = cfg.model.decoder
    out = [f"model.decoder.{k}={getattr(dec, k)}" for k in DECODER_SHAPE_KEYS
           if k != "ffn_hidden_size" and k != "qk_norm"]
    if dec.ffn_hidden_size is not None:
        out.append(f"model.decoder.ffn_hidden_size={dec.ffn_hidden_size}")
    if not dec.qk_norm:
        out.append("model.decoder.qk_norm=false")
    return out


def _layout_config(cfg, tensor_parallel: int, pipeline_parallel: int):
    built = copy.deepcopy(cfg)
    built.parallel.tensor_parallel = tensor_parallel
    built.parallel.pipeline_parallel = pipeline_parallel
    built.parallel.data_parallel = None
    built.train.fp8 = None  # only the weights matter here; FP8 needs TE and a GPU
    return built


def runtime_layout() -> tuple[int, int]:
    """(TP, PP) of the initialized megatron parallel state."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialized: call "
                           "megatron_vlm.runtime.initialize(...) first")
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())


# ------------------------------------------------------------------------------------- filling


def _global_layer_names(model) -> dict[str, str]:
    """Local layer prefix -> global layer prefix of this pipeline stage's decoder layers."""
    out = {}
    for local, layer in enumerate(model.language_model.decoder.layers):
        out[f"{openlm.MEGATRON_LAYER_PREFIX}{local}."] = \
            f"{openlm.MEGATRON_LAYER_PREFIX}{layer.layer_number - 1}."
    return out


def _global_name(name: str, layers: dict[str, str]) -> str:
    if name.startswith(openlm.MEGATRON_LAYER_PREFIX):
        index = name[len(openlm.MEGATRON_LAYER_PREFIX):].split(".", 1)[0]
        local = f"{openlm.MEGATRON_LAYER_PREFIX}{index}."
        return layers[local] + name[len(local):]
    return name


def _tp_slice(name: str, full: torch.Tensor, param: torch.Tensor, tp: int, rank: int
              ) -> torch.Tensor:
    """This TP rank's part of a full (TP=1) tensor, as megatron-core shards ``param``."""
    if tp == 1:
        return full
    if name.startswith(openlm.MEGATRON_LAYER_PREFIX) and name.endswith("mlp.linear_fc1.weight"):
        # GLU fc1 is [gate; up]; each rank holds [gate_r; up_r].
        gate, up = full.chunk(2, dim=0)
        rows = gate.shape[0] // tp
        return torch.cat([gate[rank * rows:(rank + 1) * rows], up[rank * rows:(rank + 1) * rows]])
    if getattr(param, "tensor_model_parallel", False):
        dim = param.partition_dim
        size = param.shape[dim]
        if full.shape[dim] != size * tp:
            raise ValueError(f"{name}: full size {full.shape[dim]} along dim {dim} is not "
                             f"{tp} x this rank's {size}")
        return full.narrow(dim, rank * size, size)
    return full


@torch.no_grad()
def fill_model(model, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Copies full (TP=PP=1) tensors into this rank's shard of ``model``; returns the names of
    parameters left at their initialization (everything but the decoder may be). A decoder
    parameter without a tensor, or a tensor of the wrong size, raises."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    layers = _global_layer_names(model)
    kept = []
    for name, param in model.named_parameters():
        global_name = _global_name(name, layers)
        if global_name not in tensors:
            if name.startswith("language_model."):
                raise ValueError(f"no converted tensor for decoder parameter {global_name}")
            kept.append(name)
            continue
        local = _tp_slice(global_name, tensors[global_name], param, tp, rank)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(f"{global_name}: converted shard has shape {list(local.shape)}, the "
                             f"model's parameter {list(param.shape)}")
        param.copy_(local)
    return kept


# ------------------------------------------------------------------------------------- saving


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise ValueError(f"output {output} exists and is not empty (pass --overwrite to "
                             "replace it)")


def save_weights_checkpoint(model, output: Path, common: dict) -> Path:
    """Saves ``{"model": sharded state dict}`` and ``common.json`` to ``output`` atomically
    (the training checkpoints' writer, weights only); every rank must call it."""
    from megatron_vlm.training.checkpointing import save_checkpoint

    return save_checkpoint(output, model, None, common, update_latest=False)


def _load_projector_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"projector file {path} does not exist")
    return {f"projector.{k}": v for k, v in load_file(path).items()}


# ------------------------------------------------------------------------------------- convert


def convert_openlm(input_path: str | os.PathLike, output_dir: str | os.PathLike,
                   tensor_parallel: int = 1, pipeline_parallel: int = 1, *,
                   recipe: Optional[str] = None, overrides: Sequence[str] = (),
                   schedule: Optional[ScheduleArgs] = None, tokenizer: Optional[str] = None,
                   eos_token: Optional[str] = None, allow_other_eos: bool = False,
                   num_heads: Optional[int] = None, vocab_multiple: int = 1,
                   projector: Optional[str] = None, overwrite: bool = False,
                   hash_files: bool = True) -> dict:
    """Converts an OpenLM checkpoint into a megatron-core checkpoint of the VLM for a
    ``tensor_parallel`` x ``pipeline_parallel`` layout; returns the ``common`` dict written.

    The megatron parallel state must be initialized, at TP=PP=1 in one process or at exactly
    TP x PP (then every rank saves its shard). ``schedule=None`` writes no schedule metadata
    (the checkpoint then starts only ``rewarmup`` / ``from_scratch`` runs). Input problems raise
    ValueError (naming the key) before any model is built.
    """
    import torch.distributed as dist

    from megatron_vlm.config import config_to_dict
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import set_seed

    output = Path(output_dir)
    rt_tp, rt_pp = runtime_layout()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if (rt_tp, rt_pp) not in ((1, 1), (tensor_parallel, pipeline_parallel)) or \
            world != rt_tp * rt_pp:
        raise ValueError(f"convert at TP={tensor_parallel} PP={pipeline_parallel} from one "
                         f"process or under torchrun with {tensor_parallel * pipeline_parallel} "
                         f"ranks; this job has {world} ranks at TP={rt_tp} PP={rt_pp}")
    _check_output(output, overwrite)

    # Every rank reads the (memory-mapped) input; only rank 0 writes common.json, so only it
    # hashes the files.
    state, info = openlm.read_openlm(input_path, hash_files=hash_files and is_rank0())
    heads = num_heads or openlm.heads_from_config(info.config)
    shape = openlm.infer_shape(state, heads)
    logger.info("OpenLM checkpoint %s (%s): %d layers, d_model %d, %d heads, ffn %d, vocab %d, "
                "qk-norm %s%s", info.path, info.format, shape.num_layers, shape.hidden_size,
                shape.num_heads, shape.ffn_hidden_size, shape.vocab_size,
                "on" if shape.qk_norm else "off",
                "" if info.step is None else f", step {info.step}")
    tok = None
    if tokenizer is not None:
        tok = check_tokenizer(tokenizer, shape.vocab_size, eos_token, allow_other_eos)
    meta = None
    if schedule is not None:
        meta = schedule_metadata(schedule, info.step, info.percentage_of_data_seen)
        logger.info("schedule metadata: step %d of %d (%.1f%%), warmup %d, peak %.4g, final "
                    "%.4g, %s; LR at the checkpoint %.6g", meta.step, meta.total_steps,
                    100 * meta.fraction, meta.warmup_steps, meta.peak_lr, meta.final_lr,
                    meta.decay_style, meta.lr)
    else:
        logger.info("no schedule metadata written (--no-schedule): schedule.mode=continue "
                    "cannot start from this checkpoint")
    cfg = converted_config(shape, tensor_parallel, pipeline_parallel, recipe, overrides,
                           vocab_multiple)
    dec = cfg.model.decoder
    openlm.check_inv_freq(state, shape.head_dim, dec.rotary_base)
    tensors: Mapping[str, torch.Tensor] = openlm.MegatronView(state, shape, dec.vocab_size)
    if dec.vocab_size != shape.vocab_size:
        logger.info("vocabulary padded from %d to %d rows (zeros) for TP=%d: "
                    "model.decoder.vocab_size=%d", shape.vocab_size, dec.vocab_size,
                    tensor_parallel, dec.vocab_size)
    if projector is not None:
        tensors = ChainMap(tensors, _load_projector_file(projector))

    built = _layout_config(cfg, rt_tp, rt_pp)
    set_seed(cfg.seed)
    model = build_model(built)
    kept = fill_model(model, tensors)
    unused = [k for k in tensors if k.startswith("projector.")
              and model.projector is not None
              and k[len("projector."):] not in dict(model.projector.named_parameters())]
    if unused:
        raise ValueError(f"projector file {projector}: key {unused[0][len('projector.'):]!r} is "
                         "not a parameter of the configured projector")
    projector_kept = [n for n in kept if n.startswith("projector.")]
    if projector is not None and projector_kept:
        raise ValueError(f"projector file {projector}: key "
                         f"{projector_kept[0][len('projector.'):]!r} is missing")
    encoder_kept = [n for n in kept if n.startswith("vision_encoder.")]
    if projector_kept:
        logger.info("projector (%s, %s parameters on this rank) is not part of an OpenLM "
                    "checkpoint: saved at its random initialization (seed %d)",
                    cfg.model.projector.type,
                    f"{sum(model.get_parameter(n).numel() for n in projector_kept):,}", cfg.seed)
    elif projector is not None and model.projector is not None:
        logger.info("projector weights from %s", projector)
    if encoder_kept:
        logger.info("vision encoder (%s) saved as built: %s", cfg.model.encoder.open_clip_model,
                    cfg.model.encoder.weights_path or "random initialization")

    source = info.to_dict()
    source["sha256"] = info.files[0]["sha256"] if info.files else None
    source["vocab_size"] = shape.vocab_size
    source["shape"] = shape.to_dict()
    common = {
        "step": meta.step if meta is not None else (info.step or 0),
        "schedule": meta.to_dict() if meta is not None else None,
        "loader": {"consumed_global_batches": 0},
        "fraction": meta.fraction if meta is not None else None,
        "config": config_to_dict(cfg),
        "source": source,
        "contents": ["model"],
        "projector": ({"path": str(Path(projector).resolve()),
                       "sha256": sha256_file(projector)} if projector is not None
                      else {"initialized": True, "seed": cfg.seed}),
        "tokenizer": tok.to_dict() if tok is not None else None,
        "converted_by": "megatron_vlm.convert (tools/convert_dclm_checkpoint.py)",
        "saved_layout": {"tensor_parallel": rt_tp, "pipeline_parallel": rt_pp},
    }
    save_weights_checkpoint(model, output, common)
    if rt_tp * rt_pp == 1 and tensor_parallel * pipeline_parallel > 1:
        layout = (f"saved from one process at TP=PP=1; megatron-core reshards it to "
                  f"TP={tensor_parallel} PP={pipeline_parallel} on load")
    else:
        layout = f"saved at TP={rt_tp} PP={rt_pp}"
    logger.info("wrote %s (%s; %s weights (train.params_dtype) from %s; no optimizer or RNG "
                "state)", output, layout, cfg.train.params_dtype,
                str(state[openlm.EMBEDDING].dtype).replace("torch.", ""))
    logger.info("train from it with: checkpoint.load=%s checkpoint.load_optimizer=false "
                "schedule.mode=%s %s", output, "continue" if meta is not None else "rewarmup",
                " ".join(training_overrides(cfg)))
    del model
    return common


# ------------------------------------------------------------------------------------- export


def export_openlm(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, *,
                  vocab_size: Optional[int] = None, tokenizer: Optional[str] = None,
                  eos_token: Optional[str] = None, layout: str = "openlm",
                  overwrite: bool = False) -> dict:
    """Writes a project checkpoint (any TP/PP) as OpenLM-layout safetensors; returns a summary.

    Needs megatron parallel state at TP=PP=1 in one process. Files in ``output_dir``:
    ``model.safetensors`` (decoder, OpenLM keys; ``model.``-prefixed with ``layout="hf"``),
    ``projector.safetensors`` (the projector's own parameter names), ``vision_encoder.safetensors``
    when the config has an online encoder, and ``openlm_config.json`` (dimensions and provenance).

    Embedding/output rows kept: ``vocab_size``, else the tokenizer's vocabulary, else the
    OpenLM rows recorded by the converter (``common["source"]["vocab_size"]``), else all.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_vlm.config import config_from_dict
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import set_seed
    from megatron_vlm.training.checkpointing import load_checkpoint, read_common, resolve_checkpoint

    if layout not in ("openlm", "hf"):
        raise ValueError(f"layout must be 'openlm' or 'hf', got {layout!r}")
    if runtime_layout() != (1, 1) or (dist.is_initialized() and dist.get_world_size() != 1):
        raise ValueError("export runs in one process (it loads the checkpoint at TP=PP=1)")
    output = Path(output_dir)
    _check_output(output, overwrite)
    directory = resolve_checkpoint(checkpoint)
    common = read_common(directory)
    if not isinstance(common.get("config"), dict):
        raise ValueError(f"{directory}/common.json has no 'config': cannot tell the model's shape")
    cfg = config_from_dict(common["config"], source=f"{directory}/common.json")
    cfg = _layout_config(cfg, 1, 1)
    dec = cfg.model.decoder
    set_seed(cfg.seed)
    model = build_model(cfg)
    load_checkpoint(directory, model, None, with_rng=False)
    params = dict(model.named_parameters())

    rows, why = dec.vocab_size, "all rows"
    if vocab_size is not None:
        rows, why = vocab_size, "--vocab-size"
    elif tokenizer is not None:
        from megatron_vlm.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer, eos_token)
        rows, why = tok.vocab_size, f"tokenizer {tok.path}"
        logger.info("tokenizer %s: vocabulary %d, EOS %r = id %d", tok.path, tok.vocab_size,
                    getattr(tok, "eos_token", ""), tok.eos_id)
    elif isinstance(common.get("source"), dict) and common["source"].get("vocab_size"):
        rows, why = int(common["source"]["vocab_size"]), "the converted OpenLM checkpoint"
    if rows > dec.vocab_size:
        raise ValueError(f"vocabulary {rows} ({why}) is larger than the checkpoint's "
                         f"{dec.vocab_size} embedding rows")
    decoder = {n: p.detach() for n, p in params.items() if n.startswith("language_model.")}
    state = openlm.megatron_to_openlm(decoder, dec.num_attention_heads, rows, dec.rotary_base)
    if layout == "hf":
        state = {f"model.{k}": v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = {
        "num_layers": dec.num_layers, "hidden_size": dec.hidden_size,
        "num_heads": dec.num_attention_heads, "vocab_size": rows,
        "ffn_hidden_size": dec.resolved_ffn_hidden_size(), "qk_norm": dec.qk_norm,
        "norm_eps": dec.norm_eps, "rotary_base": dec.rotary_base,
        "max_seq_length": dec.max_seq_length, "layout": layout,
        "source_checkpoint": str(directory.resolve()), "step": common.get("step"),
        "schedule": common.get("schedule"),
    }
    save_file(state, str(tmp / DECODER_FILE),
              metadata={"format": "pt", "layout": f"openlm ({layout})",
                        "num_heads": str(dec.num_attention_heads)})
    files = {"decoder": str(output / DECODER_FILE)}
    if model.projector is not None:
        proj = {n[len("projector."):]: p.detach().contiguous() for n, p in params.items()
                if n.startswith("projector.")}
        pc = cfg.model.projector
        save_file(proj, str(tmp / PROJECTOR_FILE),
                  metadata={"format": "pt", "type": pc.type,
                            "hidden_multiplier": str(pc.hidden_multiplier), "bias": str(pc.bias),
                            "embed_dim": str(cfg.model.encoder.embed_dim),
                            "hidden_size": str(dec.hidden_size)})
        files["projector"] = str(output / PROJECTOR_FILE)
        info["projector"] = {"type": pc.type, "hidden_multiplier": pc.hidden_multiplier,
                             "bias": pc.bias, "embed_dim": cfg.model.encoder.embed_dim}
    if model.vision_encoder is not None:
        enc = {n[len("vision_encoder."):]: p.detach().contiguous() for n, p in params.items()
               if n.startswith("vision_encoder.")}
        save_file(enc, str(tmp / ENCODER_FILE), metadata={"format": "pt"})
        files["vision_encoder"] = str(output / ENCODER_FILE)
    info["files"] = files
    (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    logger.info("exported %s -> %s (decoder: %d tensors, vocabulary %d rows from %s%s)",
                directory, output, len(state), rows, why,
                "; projector in " + PROJECTOR_FILE if "projector" in files else "")
    return {"output": str(output), "vocab_size": rows, "files": files, "config": info}

