"""The run configuration: one tree of dataclasses, YAML recipes and ``key=value`` overrides.

A run is described by a :class:`RunConfig`. It is loaded from a recipe (a name shipped in
``megatron_vlm/recipes/`` or a path to a YAML file nested like the tree), optionally
inheriting another recipe with ``base: NAME_OR_PATH``, then adjusted by dotted overrides::

    cfg = load_config("tiny", ["train.lr=1e-3", "model.projector.type=linear"])
    dp = cfg.validate_parallel(world_size=4)   # once the world size is known
    path = dump_config(cfg, f"{cfg.output_dir}/config.yaml")
    logger.info(config_summary(cfg, path))    # one line; the file holds the rest

Every section coerces and validates its fields at construction (``__post_init__``); errors are
``ValueError``s that name the dotted key. Each field carries a docstring (the string literal
right after it) which :func:`format_help` prints for ``--help``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import importlib.resources
import inspect
import json
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

PROJECTOR_TYPES = ("mlp2", "linear")
ENCODER_MODES = ("precomputed", "online")
CUSTOM_ENCODER = "custom"
PARAMS_DTYPES = ("fp32", "bf16")
FP8_FORMATS = (None, "hybrid", "e4m3")
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("cuda", "cpu")
RECOMPUTE = ("none", "selective", "full")
RECIPES_PACKAGE = "megatron_vlm.recipes"
DATA_KINDS = ("random", "blend")
DATA_SOURCES = ("text", "captions", "instructions")
CAPTION_FILLS = ("pad", "text")
SCHEDULE_MODES = ("from_scratch", "continue", "rewarmup")
DECAY_STYLES = ("cosine", "linear", "constant")
LOAD_PARTS = ("all", "decoder")
# How images are resized for the encoder (data/image_io.py implements them).
RESIZE_MODES = ("letterbox", "resize-naive", "resize-crop")


class _Section:
    """Behaviour shared by all config sections: field coercion and validation at construction.

    ``_PATH`` is the section's dotted location in the tree, used to name fields in errors.
    """

    _PATH = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce field values to their declared types, validate child sections (so a change
        made after construction is checked too), then run the section's own checks."""
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            if _is_section(tp):
                if not isinstance(value, tp):
                    raise ValueError(f"{self._key(f.name)} must be a {tp.__name__}, got {value!r}")
                value.validate()
            else:
                setattr(self, f.name, _coerce(value, tp, self._key(f.name)))
        self._check()

    def _check(self) -> None:
        """Section-specific checks; override in sections that have any."""

    def _key(self, name: str) -> str:
        return _join(self._PATH, name)

    def _fail(self, name: str, problem: str) -> None:
        raise ValueError(f"{self._key(name)}={getattr(self, name)!r} {problem}")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                self._fail(name, "must be positive")

    def _check_choice(self, name: str, choices: Sequence[Any]) -> None:
        if getattr(self, name) not in choices:
            self._fail(name, f"must be one of {', '.join(map(repr, choices))}")


@dataclass
class DecoderConfig(_Section):
    """Decoder-only language model (DCLM/OpenLM block) built with megatron-core."""

    _PATH = "model.decoder"

    num_layers: int
    """Number of transformer blocks."""
    hidden_size: int
    """Model width d_model."""
    num_attention_heads: int
    """Attention heads (no grouped-query attention); head dim = hidden_size / heads."""
    vocab_size: int
    """Model (padded) vocabulary size: rows of the input embedding and of the output layer."""
    max_seq_length: int
    """Longest sequence the model supports; length of the rotary table."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU hidden width; null means 256 * ceil(int(8 * hidden_size / 3) / 256)."""
    norm_eps: float = 1e-5
    """Epsilon of the gain-only LayerNorms."""
    rotary_base: int = 10000
    """Base of the rotary position embedding (NeoX style, over the full head dim)."""
    qk_norm: bool = True
    """Apply a full-width gain-only LayerNorm to Q and K (statistics over all heads)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialization."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def resolved_ffn_hidden_size(self) -> int:
        """``ffn_hidden_size``, or the DCLM/OpenLM SwiGLU rule when it is None."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 256 * -(-(8 * self.hidden_size // 3) // 256)

    def _check(self) -> None:
        self._check_positive("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                             "max_seq_length", "ffn_hidden_size", "norm_eps", "rotary_base",
                             "init_method_std")
        if self.hidden_size % self.num_attention_heads:
            self._fail("hidden_size", f"is not divisible by {self._key('num_attention_heads')}="
                                      f"{self.num_attention_heads}")


@dataclass
class ProjectorConfig(_Section):
    """Projection of image embeddings (encoder width) into the decoder's width."""

    _PATH = "model.projector"

    type: str = "mlp2"
    """'mlp2': Linear, GELU, Linear (the paper's default); 'linear': one Linear."""
    hidden_multiplier: int = 4
    """mlp2 hidden width = hidden_multiplier * model.encoder.embed_dim."""
    bias: bool = True
    """Give the projector's linear layers biases."""

    def _check(self) -> None:
        self._check_choice("type", PROJECTOR_TYPES)
        self._check_positive("hidden_multiplier")


@dataclass
class EncoderConfig(_Section):
    """Vision encoder (an open_clip image tower, SigLIP so400m by default)."""

    _PATH = "model.encoder"

    mode: str = "precomputed"
    """'precomputed': patch embeddings are read from embedding shards; 'online': the tower runs
    on images read from image shards (tools/precompute_image_embeddings.py --store images),
    decoded and resized in the loader's workers. data.captions and data.instruction_images must
    be of the mode's kind (docs/data.md)."""
    embed_dim: int = 1152
    """Width d_enc of the patch embeddings fed to the projector."""
    num_image_tokens: int = 729
    """Patch tokens per image (sequence positions an image occupies)."""
    open_clip_model: str = "ViT-SO400M-14-SigLIP-384"
    """open_clip architecture name, or 'custom' to build the tower from custom_vision_cfg."""
    custom_vision_cfg: Optional[dict] = None
    """open_clip vision tower config (CLIPVisionCfg keys) used when open_clip_model is 'custom'."""
    image_size: int = 384
    """Side of the square image given to the tower, in pixels."""
    weights_path: Optional[str] = None
    """Local file with the tower's weights; null means random initialization."""
    frozen: bool = True
    """Keep the tower's weights fixed; an unfrozen tower needs mode 'online'."""

    def _check(self) -> None:
        self._check_choice("mode", ENCODER_MODES)
        self._check_positive("embed_dim", "num_image_tokens", "image_size")
        if not self.open_clip_model:
            self._fail("open_clip_model", "must name an open_clip architecture or 'custom'")
        if not self.frozen and self.mode != "online":
            self._fail("mode", f"cannot train an encoder whose outputs are precomputed "
                               f"({self._key('frozen')}=False needs mode 'online')")
        vision = self.custom_vision_cfg
        if self.open_clip_model != CUSTOM_ENCODER:
            if vision is not None:
                self._fail("custom_vision_cfg", f"is only used with {self._key('open_clip_model')}="
                                                f"'{CUSTOM_ENCODER}'; set it to null")
            return
        if vision is None:
            self._fail("custom_vision_cfg", f"is required when {self._key('open_clip_model')}="
                                            f"'{CUSTOM_ENCODER}'")
        self._check_custom_agrees("image_size", vision.get("image_size"), self.image_size)
        self._check_custom_agrees("width", vision.get("width"), self.embed_dim)
        size, patch = vision.get("image_size"), vision.get("patch_size")
        if isinstance(size, int) and isinstance(patch, int) and patch > 0:
            self._check_custom_agrees("patch_size", (size // patch) ** 2, self.num_image_tokens,
                                      what="(image_size // patch_size) ** 2")

    def _check_custom_agrees(self, key: str, custom: Any, own: Any, what: str = "") -> None:
        if custom is not None and custom != own:
            raise ValueError(f"{self._key('custom_vision_cfg')}: {what or key}={custom!r} does not "
                             f"match the encoder's own setting ({own!r}); see "
                             f"{self._key('image_size')}, {self._key('embed_dim')}, "
                             f"{self._key('num_image_tokens')}")


@dataclass
class ModelConfig(_Section):
    """The vision-language model: decoder, projector and vision encoder."""

    _PATH = "model"

    decoder: DecoderConfig
    """Decoder-only language model."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Image-embedding projector."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Vision encoder."""


@dataclass
class ParallelConfig(_Section):
    """How the model and the batch are split over processes."""

    _PATH = "parallel"

    tensor_parallel: int = 1
    """Tensor-parallel size (ranks that split each layer)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (stages that split the layers)."""
    data_parallel: Optional[int] = None
    """Data-parallel size; null means world_size // (tensor_parallel * pipeline_parallel)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over the data-parallel ranks (megatron-core distributed optimizer)."""
    device: str = "cuda"
    """Where the run computes: 'cuda' (this host's GPUs; the run stops with one clear line when
    none is visible) or 'cpu' (CPU mode: gloo, megatron-core's CUDA requests redirected to the
    CPU; for tests, the quickstart and the tiny recipe). Never chosen silently."""
    backend: str = "auto"
    """Process-group backend: 'auto' (nccl for parallel.device=cuda, gloo for cpu), 'nccl' or
    'gloo'."""
    timeout_minutes: int = 10
    """Timeout of collectives, so that a hung rank fails instead of stalling."""

    def _check(self) -> None:
        self._check_positive("tensor_parallel", "pipeline_parallel", "data_parallel",
                             "timeout_minutes")
        self._check_choice("device", DEVICES)
        self._check_choice("backend", BACKENDS)
        if self.device == "cpu" and self.backend == "nccl":
            self._fail("backend", "needs CUDA: parallel.device is 'cpu' (use gloo or auto)")


@dataclass
class TrainConfig(_Section):
    """Batch, schedule, optimizer and numerics of training."""

    _PATH = "train"

    micro_batch_size: int = 2
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks."""
    seq_length: int = 1024
    """Training sequence length in tokens (image positions included)."""
    train_iters: int = 10
    """Optimizer steps of the run."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-5
    """Final learning rate of the decay."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    params_dtype: str = "fp32"
    """Parameter and compute dtype: 'fp32' or 'bf16' (with fp32 main weights in the optimizer)."""
    fp8: Optional[str] = None
    """FP8 format of the decoder's transformer layers: null, 'hybrid' or 'e4m3' (needs Transformer
    Engine and a Hopper GPU). The projector, embeddings and output layer stay in params_dtype
    (the projector's image rows do not meet FP8's shape rules)."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    wandb_project: Optional[str] = None
    """Also log metrics to this Weights & Biases project (needs the wandb package); metrics
    always go to OUTPUT_DIR/metrics.jsonl and TensorBoard."""

    def _check(self) -> None:
        self._check_positive("micro_batch_size", "global_batch_size", "seq_length", "train_iters",
                             "lr", "adam_eps", "log_interval")
        for name in ("min_lr", "weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                self._fail(name, "must not be negative")
        if self.min_lr > self.lr:
            self._fail("min_lr", f"is larger than {self._key('lr')}={self.lr!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                self._fail(name, "must be in [0, 1)")
        self._check_choice("params_dtype", PARAMS_DTYPES)
        self._check_choice("fp8", FP8_FORMATS)
        if self.global_batch_size % self.micro_batch_size:
            self._fail("global_batch_size", f"is not divisible by {self._key('micro_batch_size')}="
                                            f"{self.micro_batch_size}")


@dataclass
class DataConfig(_Section):
    """Training data: shard locations, the token-ratio blend and the loader."""

    _PATH = "data"

    kind: str = "random"
    """'random': deterministic random batches (smoke runs, no files needed); 'blend': shards
    mixed by data.ratios through the exact blend index (docs/blend.md)."""
    tokenizer: Optional[str] = None
    """Local tokenizer.json or sentencepiece .model the shards were made with (checks the
    vocabulary against model.decoder.vocab_size and gives the EOS and separator ids)."""
    separator_token: str = "<|sep|>"
    """Token between image and caption, and after every question and response."""
    text: Optional[str] = None
    """Text shards: the output prefix given to tools/preprocess_text.py."""
    captions: Optional[str] = None
    """Caption shards written with captions by tools/precompute_image_embeddings.py: an
    image-embedding directory (model.encoder.mode=precomputed) or, for
    model.encoder.mode=online, an image-shard directory (--store images); the kind is read from
    its index.json and must match the mode."""
    instructions: Optional[str] = None
    """Instruction shards: a directory written by tools/preprocess_llava.py."""
    instruction_images: Optional[str] = None
    """The instruction images (keys = image paths): an image-embedding directory, or an
    image-shard directory for model.encoder.mode=online, as data.captions."""
    ratios: dict = field(default_factory=dict)
    """Target share of training tokens per source, e.g. {text: 0.9, captions: 0.1}; sums to 1."""
    total_tokens: Optional[int] = None
    """Token budget of the blend; null means train.train_iters global batches."""
    caption_fill: str = "pad"
    """What fills a caption sequence after its EOS: 'pad' (no loss; padding counts for no
    source) or 'text' (documents from data.text packed in, loss on them, attention kept inside
    each document; the whole caption sequence then counts toward the caption source). With
    data.kind=random, 'text' cuts every random row into documents the same way."""
    seed: int = 1234
    """Seed of the blend index and of per-source shuffling."""
    num_workers: int = 2
    """Background loader processes per rank (0 loads in the training process)."""
    cache_dir: Optional[str] = None
    """Where blend indices are cached; null means OUTPUT_DIR/blend_cache."""
    max_skips: int = 0
    """Records allowed to be skipped (e.g. an instruction whose image is not in
    data.instruction_images) before the loader stops with an error; skips are counted and
    listed."""

    def _check(self) -> None:
        self._check_choice("kind", DATA_KINDS)
        self._check_choice("caption_fill", CAPTION_FILLS)
        for name in ("num_workers", "max_skips", "seed"):
            if getattr(self, name) < 0:
                self._fail(name, "must not be negative")
        self._check_positive("total_tokens")
        if self.kind != "blend":
            return
        if not self.ratios:
            self._fail("ratios", "must name at least one source when data.kind is 'blend'")
        for name, fraction in self.ratios.items():
            if name not in DATA_SOURCES:
                raise ValueError(f"data.ratios names unknown source {name!r}; sources are "
                                 f"{', '.join(DATA_SOURCES)}")
            if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or fraction <= 0:
                raise ValueError(f"data.ratios.{name}={fraction!r} must be a positive number")
            if getattr(self, name) is None:
                raise ValueError(f"data.ratios gives {name} a share but data.{name} is not set")
        total = sum(self.ratios.values())
        if abs(total - 1.0) > 1e-6:
            self._fail("ratios", f"sum to {total:.6g}, not 1")
        if "instructions" in self.ratios and self.instruction_images is None:
            self._fail("instruction_images", "must be set when data.ratios includes instructions")
        if self.tokenizer is None:
            self._fail("tokenizer", "must be set when data.kind is 'blend'")
        if self.caption_fill == "text" and self.text is None:
            self._fail("caption_fill", "needs data.text (the documents that fill captions)")


@dataclass
class ScheduleConfig(_Section):
    """Learning-rate schedule: peak train.lr, final train.min_lr, over train.train_iters steps."""

    _PATH = "schedule"

    mode: str = "from_scratch"
    """'from_scratch' (warmup then decay), 'continue' (keep the schedule of the checkpoint in
    checkpoint.load and cool down from its LR to its final LR over this run's steps), or
    'rewarmup' (warm up again to train.lr, then decay)."""
    warmup_iters: int = 0
    """Linear warmup steps ('from_scratch' and 'rewarmup')."""
    warmup_fraction: Optional[float] = None
    """Warmup as a fraction of train.train_iters (e.g. 0.05 for fine-tuning); overrides
    warmup_iters when set."""
    decay_style: str = "cosine"
    """Decay after warmup: 'cosine', 'linear' or 'constant'."""

    def _check(self) -> None:
        self._check_choice("mode", SCHEDULE_MODES)
        self._check_choice("decay_style", DECAY_STYLES)
        if self.warmup_iters < 0:
            self._fail("warmup_iters", "must not be negative")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            self._fail("warmup_fraction", "must be in [0, 1)")


@dataclass
class PerformanceConfig(_Section):
    """Throughput features. null means 'on where this run can use it' (a CUDA run; some need
    Transformer Engine); true asks for it and stops with one clear line where it cannot run;
    false turns it off. What each resolved to is logged at start."""

    _PATH = "performance"

    sequence_parallel: Optional[bool] = None
    """Split the sequence over the tensor-parallel ranks outside attention and the MLP (saves
    activation memory and turns all-reduces into reduce-scatter/all-gather). null: on when
    parallel.tensor_parallel > 1 on CUDA. Needs train.seq_length divisible by tensor_parallel."""
    overlap_grad_reduce: Optional[bool] = None
    """Reduce gradients over data-parallel ranks in buckets while the backward pass still runs.
    null: on for CUDA runs with more than one data-parallel rank."""
    overlap_param_gather: Optional[bool] = None
    """With the distributed optimizer, gather updated parameters during the next forward pass.
    null: on for CUDA runs that use parallel.use_distributed_optimizer with more than one
    data-parallel rank; true needs the distributed optimizer."""
    bias_swiglu_fusion: Optional[bool] = None
    """Fused SwiGLU activation (megatron-core's jit-fused kernel). null: on for CUDA runs."""
    rope_fusion: Optional[bool] = None
    """Fused rotary embedding (Transformer Engine's kernel). null: on with the TE layer spec."""
    gradient_accumulation_fusion: Optional[bool] = None
    """Accumulate weight gradients straight into the fp32 main-grad buffers inside the GEMM
    (TE's linear layers, and apex's kernel for megatron-core's own output layer). null: on for
    CUDA runs where apex's fused_weight_gradient_mlp_cuda imports; true without it is an error
    naming apex (the output layer needs it whatever the layer spec)."""
    cross_entropy_fusion: Optional[bool] = None
    """Fused vocabulary-parallel cross-entropy: Transformer Engine's kernel where TE >= 2.7 is
    present (called without host synchronisation), else the project's own loss compiled by
    torch.compile (model/loss.py; unfused, the same loss runs eagerly). Either way no host
    read. null: on for CUDA runs."""
    packed_documents: Optional[bool] = None
    """How document attention (data.caption_fill=text) reaches the attention kernel: true packs
    the documents into megatron's packed-sequence layout (cu_seqlens; the only form the
    Transformer Engine attention honours), false builds a dense mask (the local spec's SDPA).
    null: packed with the TE layer spec, dense otherwise."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'selective' (recompute the core attention in the
    backward pass) or 'full' (recompute whole layers, see recompute_num_layers)."""
    recompute_num_layers: int = 1
    """With recompute 'full': layers per recomputed chunk (megatron's uniform method)."""

    def _check(self) -> None:
        self._check_choice("recompute", RECOMPUTE)
        self._check_positive("recompute_num_layers")


@dataclass
class CheckpointConfig(_Section):
    """Saving, loading and resuming (megatron-core distributed checkpoints)."""

    _PATH = "checkpoint"

    load: Optional[str] = None
    """A checkpoint (or a run's checkpoint directory: its latest) to start from, e.g. a text
    run's 80% checkpoint; model weights always, optimizer state per load_optimizer."""
    load_optimizer: bool = True
    """Also load the optimizer state from checkpoint.load (same parameter set required)."""
    load_parts: str = "all"
    """What to take from checkpoint.load: 'all' (the whole model) or 'decoder' (the language
    model only; the projector and encoder keep their initialization, e.g. for a projector or
    encoder ablation started from a text run). 'decoder' needs load_optimizer=false."""
    save_fractions: list = field(default_factory=list)
    """Fractions of the schedule at which to save, e.g. [0.2, 0.4, 0.6, 0.8, 1.0]: fraction
    checkpoints, never deleted (not by a run with other fractions either). 1.0 is the final
    step; a run saves there only with 1.0 here or a train_iters that save_interval divides."""
    save_interval: Optional[int] = None
    """Also save every this many steps: interval checkpoints, for resuming after a crash."""
    keep_last: int = 2
    """Interval checkpoints to keep: the newest keep_last saves that are not fraction
    checkpoints. Fraction checkpoints never count against it (a step that is both is a
    fraction checkpoint): save_interval 10 and a fraction at step 24 keep 20, 24 and 30 after
    30 steps with keep_last 2."""
    resume: bool = True
    """Resume from the latest checkpoint in OUTPUT_DIR/checkpoints when there is one."""
    allow_schedule_change: bool = False
    """Resume even though a setting that shapes the LR schedule or the data order
    (train.train_iters, train.lr, schedule.*, data.ratios, ...: RESUME_SCHEDULE_KEYS in
    training/checkpoint_checks.py) differs from the checkpoint's; the differences are logged.
    Without it such a resume stops with one line listing them."""
    async_save: Optional[bool] = None
    """Write checkpoints in the background while training goes on (megatron-core's
    asynchronous save); a checkpoint counts as saved once every rank has finished writing it.
    null: on for CUDA runs, off in CPU mode."""

    def _check(self) -> None:
        self._check_choice("load_parts", LOAD_PARTS)
        if self.load_parts != "all" and self.load_optimizer:
            self._fail("load_parts", "loads part of the model, so the optimizer state (which "
                                     "covers all of it) cannot come along: set "
                                     "checkpoint.load_optimizer=false")
        for f in self.save_fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                self._fail("save_fractions", f"has {f!r}: every fraction must be in (0, 1]")
        self._check_positive("save_interval", "keep_last")


@dataclass
class EvaluationConfig(_Section):
    """Evaluation (tools/evaluate_vlm.py, docs/evaluation.md): where the benchmarks are, how
    prompts are generated and how stable scores count chance."""

    _PATH = "evaluation"

    data_root: Optional[str] = None
    """Folder holding the vision benchmarks in the layout of docs/evaluation_data.md (for the
    'shapesworld' suite: a ShapesWorld directory)."""
    text_tasks: Optional[str] = None
    """Folder of local lm-eval task YAMLs (lm-eval's include_path), e.g. ShapesWorld's
    text/tasks; null: lm-eval's built-in tasks only."""
    image_embeddings: Optional[str] = None
    """Precomputed embeddings of the evaluation images (tools/precompute_image_embeddings.py with
    the training resize mode; keys = image paths relative to each task's image folder). null:
    the images are encoded in the evaluation process with the checkpoint's encoder."""
    resize_mode: Optional[str] = None
    """How evaluation resizes images when it encodes them itself: 'letterbox', 'resize-naive'
    or 'resize-crop' (tools/precompute_image_embeddings.py --resize). null: the mode the
    training caption embeddings were made with (data.captions' precompute.json), else
    'letterbox'."""
    blank_images: bool = False
    """Replace every evaluation image by one blank image (the encoder's fill colour), encoded
    the same way: the drop of the vision scores against a normal run is what the model learned
    to take from images."""
    system_prompt: Optional[str] = None
    """System prompt in front of every question; null: the one the instruction shards of the
    checkpoint's data.instructions were made with (none if there are none)."""
    batch_size: int = 8
    """Prompts per generation batch and requests per scoring batch, per data-parallel rank."""
    max_new_tokens: int = 128
    """Longest generated answer, in tokens."""
    boolq_chance: str = "uniform"
    """BoolQ's chance level in the text stable score: 'uniform' (0.5, two choices) or
    'majority' (0.62, the majority class, as DCLM reports it)."""
    chance: dict = field(default_factory=dict)
    """Chance accuracy per task, overriding the built-in table (e.g. {pubmedqa: 0.55})."""
    custom_tasks: dict = field(default_factory=dict)
    """Your own image questions as tasks: {NAME: FILE} or {NAME: {file: FILE, scoring: exact|vqa,
    prompt: TEMPLATE}}. FILE is JSON Lines, one {"image", "question", "answers": [...],
    "choices": [...] (optional), "id" (optional)} per line, image paths relative to FILE's
    folder (docs/evaluation.md). They run with every suite (alone: --suite custom) and are
    reported, not counted in the stable score. scoring: 'exact' (default; normalised exact
    match) or 'vqa' (VQA accuracy, 4+ answers a question). prompt: the question's text with
    {question} and {choices}; default '{question}', plus a line of the choices when a question
    has them, laid out as the checkpoint's fine-tuning conversations."""
    bootstrap_resamples: int = 10000
    """Bootstrap resamples behind the 95% intervals in results.json (each task's accuracy and
    each stable score, resampling the task's items; docs/evaluation.md). They are computed from
    the items files after every evaluation, so a change here needs no new predictions."""
    bootstrap_seed: int = 0
    """Seed of those resamples (each task's stream is seeded by it and the task's name, so an
    interval does not depend on the other tasks)."""

    def _check(self) -> None:
        from megatron_vlm.evaluation.custom_task import parse_custom_tasks

        parse_custom_tasks(self.custom_tasks)
        self._check_choice("boolq_chance", ("uniform", "majority"))
        if self.resize_mode is not None:
            self._check_choice("resize_mode", RESIZE_MODES)
        self._check_positive("batch_size", "max_new_tokens", "bootstrap_resamples")
        if self.bootstrap_seed < 0:
            self._fail("bootstrap_seed", "must be 0 or more")
        for task, level in self.chance.items():
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level < 1:
                raise ValueError(f"evaluation.chance.{task}={level!r} must be a number in [0, 1)")


@dataclass(kw_only=True)  # keyword-only: `model` has no default but follows fields that do
class RunConfig(_Section):
    """A whole run: model, parallel layout and training settings."""

    name: str = "tiny"
    """Run name (logs, checkpoints and result tables)."""
    output_dir: str = "runs/tiny"
    """Directory for checkpoints, logs and the resolved config."""
    seed: int = 1234
    """Random seed."""
    model: ModelConfig
    """The vision-language model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    """Throughput features (fusions, overlap, sequence parallelism, recomputation)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Evaluation of the run's checkpoints."""

    def _check(self) -> None:
        if not self.name:
            self._fail("name", "must not be empty")
        if self.schedule.mode == "continue" and self.checkpoint.load is None:
            self._fail_pair("schedule.mode", "'continue'", "needs a checkpoint to continue:",
                            "checkpoint.load", None)
        decoder = self.model.decoder
        if self.train.seq_length > decoder.max_seq_length:
            self._fail_pair("train.seq_length", self.train.seq_length, "is larger than",
                            "model.decoder.max_seq_length", decoder.max_seq_length)

    @staticmethod
    def _fail_pair(key: str, value: Any, problem: str, other: str, other_value: Any) -> None:
        raise ValueError(f"{key}={value} {problem} {other}={other_value}")

    def validate_parallel(self, world_size: int) -> int:
        """Check the layout for ``world_size`` ranks; store and return the data-parallel size."""
        par, dec, train = self.parallel, self.model.decoder, self.train
        tp, pp = par.tensor_parallel, par.pipeline_parallel
        if world_size < 1 or world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by parallel.tensor_parallel"
                             f" * parallel.pipeline_parallel = {tp} * {pp}")
        dp = par.data_parallel if par.data_parallel is not None else world_size // (tp * pp)
        if dp * tp * pp != world_size:
            raise ValueError(f"parallel.data_parallel * parallel.tensor_parallel * "
                             f"parallel.pipeline_parallel = {dp} * {tp} * {pp} != world size "
                             f"{world_size}")
        by_tp = [("model.decoder.num_attention_heads", dec.num_attention_heads),
                 ("model.decoder.vocab_size", dec.vocab_size),
                 ("model.decoder.ffn_hidden_size (resolved)", dec.resolved_ffn_hidden_size())]
        if self.model.projector.type == "mlp2":
            by_tp.append(("model.projector.hidden_multiplier * model.encoder.embed_dim",
                          self.model.projector.hidden_multiplier * self.model.encoder.embed_dim))
        for key, value in by_tp:
            if value % tp:
                self._fail_pair(key, value, "is not divisible by", "parallel.tensor_parallel", tp)
        if dec.num_layers % pp:
            self._fail_pair("model.decoder.num_layers", dec.num_layers, "is not divisible by",
                            "parallel.pipeline_parallel", pp)
        if train.global_batch_size % (train.micro_batch_size * dp):
            self._fail_pair("train.global_batch_size", train.global_batch_size,
                            "is not divisible by", "train.micro_batch_size * data-parallel size",
                            f"{train.micro_batch_size} * {dp}")
        # The distributed optimizer works at any data-parallel size (at dp=1 it shards nothing).
        par.data_parallel = dp
        return dp


# ---------------------------------------------------------------------------------------------
# Types, coercion and the walk over the tree


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str, dict, or Optional of one) or ValueError."""
    if typing.get_origin(tp) is typing.Union:
        if value is None:
            return None
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # e.g. train_iters=1e5
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) for every field of ``cls``, depth first, sections included."""
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = _join(prefix, f.name), hints[f.name]
        yield key, f, tp
        if _is_section(tp):
            yield from _walk(tp, key)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def config_keys(cls: type = RunConfig) -> list[str]:
    """Every dotted key of the tree (sections and leaves)."""
    return [key for key, _, _ in _walk(cls)]


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring (the string literal right after the field in the class body)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def format_help(cfg_cls: type = RunConfig, prefix: str = "") -> str:
    """Every config key with its type, default and docstring, for ``--help`` output; keys of a
    section class are shown under ``prefix`` (its dotted path)."""
    lines = ["config keys (set in a recipe YAML or as key=value overrides):"]
    for key, f, tp in _walk(cfg_cls):
        doc = field_docs(_owner(cfg_cls, key)).get(f.name, "")
        if _is_section(tp):
            lines += ["", f"{_join(prefix, key)}: {doc}"]
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(f.default_factory())
        else:
            default = "required"
        lines.append(f"  {_join(prefix, key)}  ({f.type}, {default})")
        lines += textwrap.wrap(doc, width=92, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _owner(cls: type, key: str) -> type:
    """The section class holding the field at dotted ``key``."""
    for name in key.split(".")[:-1]:
        cls = _type_hints(cls)[name]
    return cls


# ---------------------------------------------------------------------------------------------
# Dicts <-> configs


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain dicts."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], source: str = "dict",
                     overrides: Sequence[str] = ()) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (as in a recipe, a dumped config or a
    checkpoint's common.json), with ``key=value`` overrides applied on top."""
    data = _normalize(RunConfig, data, "", source)
    for item in overrides:
        data = _apply_override(data, item)
    return _build(RunConfig, data, "")


def non_default_values(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every field that differs from its default (or has none)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        key, value = _join(prefix, f.name), getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(non_default_values(value, key))
        elif not _has_default(f) or value != f.default:
            out[key] = value
    return out


def _normalize(cls: type, data: Any, prefix: str, source: str) -> dict[str, Any]:
    """Check ``data``'s keys against section ``cls`` and coerce its leaves; a new nested dict."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'the config'} in {source} must be a mapping, got {data!r}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in names:
            raise ValueError(_unknown_key_message(key, source))
        if _is_section(hints[name]):
            out[name] = _normalize(hints[name], value, key, source)
        else:
            try:
                out[name] = _coerce(value, hints[name], key)
            except ValueError as err:
                raise ValueError(f"{err} (in {source})") from None
    return out


def _unknown_key_message(key: str, source: str) -> str:
    keys = config_keys()
    leaf = key.rsplit(".", 1)[-1]
    guesses = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    guesses += difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    guesses = list(dict.fromkeys(guesses))[:4]
    hint = f"did you mean {', '.join(guesses)}?" if guesses else "see --help for the keys"
    return f"unknown config key '{key}' in {source}; {hint}"


def _merge(cls: type, base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: sections merge key by key, leaves (dicts too) are replaced."""
    hints = _type_hints(cls)
    out = dict(base)
    for name, value in over.items():
        tp = hints[name]
        out[name] = _merge(tp, out.get(name, {}), value) if _is_section(tp) else value
    return out


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    kwargs, missing = {}, []
    for key, f, tp in ((_join(prefix, f.name), f, _type_hints(cls)[f.name])
                       for f in dataclasses.fields(cls)):
        if _is_section(tp):
            try:
                kwargs[f.name] = _build(tp, data.get(f.name, {}), key)
            except _MissingKeys as err:
                missing += err.keys
        elif f.name in data:
            kwargs[f.name] = data[f.name]
        elif not _has_default(f):
            missing.append(key)
    if missing:
        raise _MissingKeys(missing)
    return cls(**kwargs)


class _MissingKeys(ValueError):
    def __init__(self, keys: list[str]):
        super().__init__(f"missing required config keys: {', '.join(keys)}")
        self.keys = keys


# ---------------------------------------------------------------------------------------------
# YAML recipes and overrides


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-3``) as floats."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error is one ValueError naming ``where`` (a file or an
    override) and the line and column."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML{at}: {problem}") from None


def available_recipes() -> list[str]:
    """Names of the recipes shipped in megatron_vlm/recipes/."""
    root = importlib.resources.files(RECIPES_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _is_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml"))


def _locate(ref: str, relative_to: Optional[Path]) -> Path:
    """The YAML file for a recipe name or path (relative paths from ``relative_to``)."""
    if _is_path(ref):
        path = Path(ref).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise ValueError(f"recipe file {str(path)!r} does not exist")
        return path
    resource = importlib.resources.files(RECIPES_PACKAGE) / f"{ref}.yaml"
    if not resource.is_file():
        names = available_recipes()
        close = difflib.get_close_matches(ref, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown recipe {ref!r}{hint}; shipped recipes: {', '.join(names)}; "
                         f"or give a path to a YAML file")
    return Path(str(resource))


def _read_recipe(ref: str, relative_to: Optional[Path] = None,
                 chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The nested dict of a recipe file, its ``base`` chain merged underneath."""
    path = _locate(ref, relative_to).resolve()
    if path in chain:
        raise ValueError(f"recipe inheritance cycle: {' -> '.join(map(str, chain + (path,)))}")
    raw = _load_yaml(path.read_text(), f"recipe {path}") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must hold a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    data = _normalize(RunConfig, raw, "", str(path))
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"'base' in {path} must be a recipe name or path, got {base!r}")
    return _merge(RunConfig, _read_recipe(base, path.parent, chain + (path,)), data)


def _apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like dotted.key=value")
    parts = key.split(".")
    cls = RunConfig
    for depth, name in enumerate(parts[:-1]):
        tp = _type_hints(cls).get(name)
        if not _is_section(tp):
            if tp is None:
                break  # unknown: reported with suggestions by _normalize below
            raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section;"
                             f" give its whole value, e.g. {'.'.join(parts[:depth + 1])}={{...}}")
        cls = tp
    nested: Any = _load_yaml(text, f"override {item!r}")
    for name in reversed(parts):
        nested = {name: nested}
    return _merge(RunConfig, data, _normalize(RunConfig, nested, "", f"override {item!r}"))


def load_config(recipe: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated RunConfig of a recipe (shipped name or YAML path) plus ``key=value`` overrides.

    Override values are read as YAML (``true``, ``3``, ``1e-3``, ``null``, ``{a: 1}``) and checked
    against the field's type. Parallel checks that need the world size are in
    :meth:`RunConfig.validate_parallel`.
    """
    data = _read_recipe(recipe)
    for item in overrides:
        data = _apply_override(data, item)
    return _build(RunConfig, data, "")


def dump_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def config_summary(cfg: RunConfig, path: str | Path) -> str:
    """One log line for a run's config: what it trains on, how long, and the file that holds
    all of it (a log shows this instead of the whole tree; the model, schedule and features
    have their own lines)."""
    t = cfg.train
    return (f"config: {cfg.name}, data {cfg.data.kind}, {t.train_iters} steps x "
            f"{t.global_batch_size} sequences of {t.seq_length} tokens (micro batch "
            f"{t.micro_batch_size}, {t.params_dtype}), device {cfg.parallel.device}; "
            f"{len(non_default_values(cfg))} values differ from the defaults; all in {path}")


def config_arg_parser(description: str, default_recipe: Optional[str] = None,
                      prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argument parser with ``--recipe`` and ``key=value`` overrides; ``--help`` lists the keys.

    Parse with ``parser.parse_intermixed_args()`` so options and overrides may be interleaved
    (also right after a list option's values: :class:`megatron_vlm.cli.OverridesParser`), then
    ``load_config(args.recipe, args.overrides)``.
    """
    from megatron_vlm.cli import OverridesParser

    parser = OverridesParser(prog=prog, description=description, epilog=format_help(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=default_recipe, required=default_recipe is None,
                        help=f"recipe name ({', '.join(available_recipes())}) or path to a YAML "
                             f"file" + (f" (default: {default_recipe})" if default_recipe else ""))
    parser.add_overrides("config overrides, e.g. train.lr=1e-3 model.projector.type=linear")
    return parser
