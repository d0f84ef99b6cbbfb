"""Training throughput: a plain PyTorch baseline against this project's megatron-core model.

    python bench/train_throughput.py                          # CUDA: 79m recipe, every variant
    python bench/train_throughput.py --recipe 1b --json bench_1b.json
    python bench/train_throughput.py --recipe tiny --quick    # CPU: the same table, tiny size
    python bench/train_throughput.py --variants torch,megatron-local train.lr=1e-4

Every variant trains the same decoder (DCLM/OpenLM block) and projector on the same global
batch: sequences of ``--seq-length`` positions (default 1024; the tiny recipe keeps its own
128), random tokens, and a share of caption rows (an image's ``num_image_tokens`` precomputed
embeddings, then caption tokens) that makes image + caption positions about
``--caption-fraction`` (0.10, the paper's 90/10 text/caption mix) of the tokens. The batch is
generated on the measured device, once, and every step reuses its micro-batches: no timed step
creates batch data or copies it from the host, so the figures time the GPU, not the host's
random number generator or the PCIe link. A step is ``--global-batch-size`` sequences in
micro-batches of ``--micro-batch-size`` with gradient accumulation, then one optimizer step
with gradient clipping.

Variants (always run in this order, so the baselines run before the CPU redirect layer that
megatron-core needs on a CPU host is installed):

* ``torch``: an nn.Module of the same architecture (SDPA causal attention, fused QKV,
  full-width qk-norm, NeoX rotary, SwiGLU) and projector, torch.optim.AdamW (fused where the
  build supports it), bf16 autocast with fp32 weights on CUDA;
* ``torch+compile``: the same module under torch.compile (compile time is in the warmup; on a
  CPU host it runs only when named in ``--variants``: inductor's C++ build takes minutes there);
* ``megatron-local``: ``build_model(cfg, use_transformer_engine=False)``, ``setup_training``
  and ``train_step`` of this project (bf16 parameters with fp32 main weights on CUDA);
* ``megatron-te`` / ``megatron-te-fp8``: the Transformer Engine spec, in bf16 and with
  ``train.fp8=hybrid``; "n/a" where TE or a CUDA device is missing.

On CUDA everything trains in bf16; on a CPU host in the recipe's ``train.params_dtype`` (fp32
for tiny; on a shared CPU host set OMP_NUM_THREADS=1, as oversubscribed OpenMP threads make
step times swing tenfold). Step time is the median of the timed steps (CUDA synchronized before
each clock read), after ``--warmup`` steps. Peak memory: torch.cuda.max_memory_allocated after a
reset (CUDA), or the process's resident-set high-water mark, reset before each variant (Linux
CPU).

MFU is measured against the device's dense peaks (megatron_vlm/training/flops.py, keyed by the
CUDA device name): MFU(bf16pk) against the bf16 peak for every row, and for FP8 rows also
MFU(fp8pk) against the FP8 peak (JSON: ``mfu_bf16_peak``, ``mfu_fp8_peak``). For a card the
table does not know, or to measure against other figures, give ``--peak-tflops BF16[,FP8]``
(dense TFLOP/s per GPU, e.g. 989,1979) or set MEGATRON_VLM_PEAK_TFLOPS the same way (the flag
wins); an override replaces both peaks, so without an FP8 figure MFU(fp8pk) is n/a.

The table is printed last. ``--json FILE`` writes it with the device, versions, command and the
peaks used (``peak``: values, table key, whether overridden), rewritten (atomically) after every
variant with ``"complete": false``, and a last time with ``"complete": true``: a run that is
stopped keeps its finished variants.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import re
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# The bench's helper modules sit beside this file; the tests load this file by its path, which
# does not put its folder on sys.path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import throughput_batches  # noqa: E402
from throughput_report import Row, add_ratios, figures, format_table  # noqa: E402

VARIANTS = ("torch", "torch+compile", "megatron-local", "megatron-te", "megatron-te-fp8")
FP8_VARIANTS = ("megatron-te-fp8",)  # measured against the FP8 peak too
DEFAULT_STEPS, DEFAULT_WARMUP = 10, 3
QUICK_STEPS, QUICK_WARMUP = 3, 1
DEFAULT_SEQ_LENGTH = 1024
MICROBATCHES_PER_STEP = 4


# ---------------------------------------------------------------------------------------------
# The plain PyTorch baseline


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class BaselineBlock(nn.Module):
    """One DCLM/OpenLM block: pre-norm gain-only LayerNorms, fused QKV with rows [Q; K; V],
    qk-norm over the whole Q and K width, NeoX rotary, causal SDPA, SwiGLU; no biases."""

    def __init__(self, d: int, heads: int, ffn: int, eps: float, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.attention_norm = nn.LayerNorm(d, eps=eps, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm = nn.LayerNorm(d, eps=eps, bias=False) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(d, eps=eps, bias=False) if qk_norm else nn.Identity()
        self.out = nn.Linear(d, d, bias=False)
        self.ffn_norm = nn.LayerNorm(d, eps=eps, bias=False)
        self.w12 = nn.Linear(d, 2 * ffn, bias=False)  # rows [gate; up]
        self.w3 = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, s, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q = q * cos.to(q.dtype) + _rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + _rotate_half(k) * sin.to(k.dtype)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, d))
        gate, up = self.w12(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.w3(F.silu(gate) * up)


class BaselineVLM(nn.Module):
    """The decoder and projector of ``cfg.model`` in plain PyTorch ([batch, seq] layout).

    Untied input embedding and output layer; the projector (``mlp2``: Linear, GELU, Linear; or
    ``linear``) maps image embeddings [k, n_img, d_enc] to the decoder width, and its output
    replaces the token embeddings at ``image_mask`` positions in row-major order.
    """

    def __init__(self, model_cfg):
        super().__init__()
        dec, proj, enc = model_cfg.decoder, model_cfg.projector, model_cfg.encoder
        d, vocab = dec.hidden_size, dec.vocab_size
        self.embedding = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            BaselineBlock(d, dec.num_attention_heads, dec.resolved_ffn_hidden_size(),
                          dec.norm_eps, dec.qk_norm) for _ in range(dec.num_layers))
        self.norm = nn.LayerNorm(d, eps=dec.norm_eps, bias=False)
        self.output = nn.Linear(d, vocab, bias=False)
        if proj.type == "mlp2":
            hidden = proj.hidden_multiplier * enc.embed_dim
            self.projector = nn.Sequential(nn.Linear(enc.embed_dim, hidden, bias=proj.bias),
                                           nn.GELU(), nn.Linear(hidden, d, bias=proj.bias))
        elif proj.type == "linear":
            self.projector = nn.Linear(enc.embed_dim, d, bias=proj.bias)
        else:
            raise ValueError(f"model.projector.type={proj.type!r} has no baseline projector")
        head_dim = dec.head_dim
        inv_freq = 1.0 / dec.rotary_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=dec.init_method_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, image_mask: Optional[torch.Tensor] = None,
                image_embeddings: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token loss [b, s] (fp32) when ``labels`` are given, else logits [b, s, vocab]."""
        x = self.embedding(tokens)
        # A Python-side shape check: no host synchronisation.
        if image_embeddings is not None and image_embeddings.shape[0] > 0:
            features = self.projector(image_embeddings.to(self.output.weight.dtype))
            x = x.masked_scatter(image_mask.unsqueeze(-1), features.to(x.dtype))
        positions = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                               reduction="none").view_as(labels)


# ---------------------------------------------------------------------------------------------
# The project step's loss (the batches: bench/throughput_batches.py)


class _DeviceLoss:
    """The project step's summed [loss, tokens] on the device; read (a host synchronisation)
    only when the table asks for the float, after the timed steps."""

    def __init__(self, loss_sums: torch.Tensor):
        self.loss_sums = loss_sums

    def __float__(self) -> float:
        from megatron_vlm.training.step import summarize_losses

        return summarize_losses(self.loss_sums)["loss"]


# ---------------------------------------------------------------------------------------------
# Setup


@dataclass
class Setup:
    """Everything the variants share: config, device, precision, the peaks, and the
    micro-batches, on ``device``."""

    cfg: object
    overrides: list
    recipe: str
    device: torch.device
    precision: str
    microbatches: list
    loss_tokens: float
    caption_fraction: float
    image_fraction: float
    flops_per_token: float
    peaks: object  # flops.DevicePeaks: what MFU is measured against
    device_name: str


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    from megatron_vlm.training.flops import PEAK_ENV, parse_peak_tflops

    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        description="\n\n".join(doc[:3]), epilog="\n\n".join(doc[3:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="tiny, 79m, 1b or a YAML path (default: 79m with "
                                         "CUDA, tiny without)")
    parser.add_argument("--variants",
                        help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all; "
                             "on a CPU host torch+compile runs only when named)")
    parser.add_argument("--steps", type=int, help=f"timed steps (default {DEFAULT_STEPS}; "
                                                  f"--quick: {QUICK_STEPS})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps first (default "
                                                   f"{DEFAULT_WARMUP}; --quick: {QUICK_WARMUP})")
    parser.add_argument("--seq-length", type=int, help=f"positions per sequence (default "
                        f"{DEFAULT_SEQ_LENGTH}; the tiny recipe: its train.seq_length)")
    parser.add_argument("--micro-batch-size", type=int,
                        help="sequences per micro-batch (default: the recipe's)")
    parser.add_argument("--global-batch-size", type=int, help="sequences per step (default: "
                        f"{MICROBATCHES_PER_STEP} micro-batches)")
    parser.add_argument("--caption-fraction", type=float, default=0.10,
                        help="share of tokens in caption rows, image positions included "
                             "(default 0.10)")
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the rows and setup as JSON, rewritten after every "
                             'variant ("complete": false until the last)')
    parser.add_argument("--peak-tflops", metavar="BF16[,FP8]",
                        help="this device's dense peak TFLOP/s per GPU, bf16 and optionally FP8, "
                             f"for MFU, e.g. 989,1979 (default: {PEAK_ENV} if set, else the "
                             "table's figures for the CUDA device name)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides passed to load_config, e.g. train.lr=1e-4")
    args = parser.parse_intermixed_args(argv)
    args.variants_given = args.variants is not None
    args.variants = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",")
                     if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(VARIANTS)}")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    for flag, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--seq-length", args.seq_length, 1),
                             ("--micro-batch-size", args.micro_batch_size, 1),
                             ("--global-batch-size", args.global_batch_size, 1)):
        if value is not None and value < low:
            parser.error(f"{flag}={value} must be at least {low}")
    if not 0.0 <= args.caption_fraction <= 1.0:
        parser.error(f"--caption-fraction={args.caption_fraction} must be in [0, 1]")
    if args.peak_tflops is not None:
        try:
            parse_peak_tflops(args.peak_tflops, "--peak-tflops")
        except ValueError as err:
            parser.error(str(err))
    return args


def build_setup(args: argparse.Namespace) -> Setup:
    """The config with the bench's batch and precision, the peaks, and the micro-batches, made
    on the device here, once."""
    from megatron_vlm.config import config_keys, load_config
    from megatron_vlm.training import flops

    cuda = torch.cuda.is_available()
    recipe = args.recipe or ("79m" if cuda else "tiny")
    base = load_config(recipe, args.overrides)
    set_seq = any(o.split("=", 1)[0].strip() == "train.seq_length" for o in args.overrides)
    seq = args.seq_length or (base.train.seq_length if set_seq or base.name == "tiny"
                              else DEFAULT_SEQ_LENGTH)
    mbs = args.micro_batch_size or base.train.micro_batch_size
    gbs = args.global_batch_size or MICROBATCHES_PER_STEP * mbs
    if gbs % mbs:
        raise ValueError(f"--global-batch-size={gbs} is not divisible by --micro-batch-size={mbs}")
    dec, enc = base.model.decoder, base.model.encoder
    if seq > dec.max_seq_length:
        raise ValueError(f"--seq-length={seq} exceeds model.decoder.max_seq_length="
                         f"{dec.max_seq_length}")
    if args.caption_fraction > 0 and seq <= enc.num_image_tokens:
        raise ValueError(f"--seq-length={seq} leaves no caption after an image of "
                         f"model.encoder.num_image_tokens={enc.num_image_tokens} positions")
    if enc.mode != "precomputed":
        raise ValueError(f"model.encoder.mode={enc.mode!r}: the bench feeds precomputed image "
                         "embeddings; set model.encoder.mode=precomputed")
    if base.parallel.tensor_parallel != 1 or base.parallel.pipeline_parallel != 1:
        raise ValueError("the bench measures one GPU: set parallel.tensor_parallel=1 and "
                         "parallel.pipeline_parallel=1")
    precision = "bf16" if cuda else base.train.params_dtype
    extra = [f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
             f"train.global_batch_size={gbs}", f"train.params_dtype={precision}", "train.fp8=null"]
    if "parallel.device" in config_keys():
        extra.append(f"parallel.device={'cuda' if cuda else 'cpu'}")
    overrides = list(args.overrides) + extra
    cfg = load_config(recipe, overrides)
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    peaks = flops.device_peaks(device_name, args.peak_tflops)  # a bad override: ValueError
    # With its index: the train step copies a tensor whose device differs from its own, and
    # torch.device("cuda") != torch.device("cuda:0").
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    batch, microbatches = throughput_batches.device_microbatches(
        gbs, mbs, seq, dec.vocab_size, enc.num_image_tokens, enc.embed_dim,
        args.caption_fraction, device)
    image_fraction = flops.image_positions_fraction(microbatches)  # reads the device, once
    return Setup(cfg=cfg, overrides=overrides, recipe=recipe, device=device,
                 precision=precision, microbatches=microbatches,
                 loss_tokens=float(batch["loss_mask"].sum()),
                 caption_fraction=float(batch["image_mask"].any(1).sum()) / gbs,
                 image_fraction=image_fraction,
                 flops_per_token=flops.flops_per_token(cfg, image_fraction),
                 peaks=peaks, device_name=device_name)


# ---------------------------------------------------------------------------------------------
# Variants: each returns (step function -> loss or None, precision label, note)


def _autocast(setup: Setup):
    if setup.precision == "bf16":
        return torch.autocast(setup.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _torch_variant(setup: Setup, compile_model: bool):
    train = setup.cfg.train
    torch.manual_seed(0)
    model = BaselineVLM(setup.cfg.model).to(setup.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)
    try:
        optimizer, fused = torch.optim.AdamW(groups, fused=True, **kwargs), "fused"
    except (RuntimeError, TypeError):  # builds without a fused kernel for this device
        optimizer, fused = torch.optim.AdamW(groups, foreach=True, **kwargs), "foreach"
    forward = torch.compile(model) if compile_model else model
    params = list(model.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = None
        for mb in setup.microbatches:  # on the device already: nothing is copied here
            with _autocast(setup):
                per_token = forward(mb["tokens"], mb["image_mask"], mb.get("image_embeddings"),
                                    mb["labels"])
            # Per-token mean over the global batch, as the project's train step normalizes.
            loss = (per_token * mb["loss_mask"]).sum() / setup.loss_tokens
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        if train.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, train.clip_grad, foreach=True)
        optimizer.step()
        return total

    precision = "bf16 autocast" if setup.precision == "bf16" else setup.precision
    return step, precision, f"AdamW {fused}"


_RUNTIME = None


def _megatron_variant(setup: Setup, te: bool, fp8: bool):
    global _RUNTIME
    from megatron_vlm.config import load_config
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import initialize
    from megatron_vlm.training.step import setup_training, train_step

    cfg = load_config(setup.recipe, setup.overrides + (["train.fp8=hybrid"] if fp8 else []))
    if _RUNTIME is None:
        # Without MASTER_PORT the runtime's store binds a free port itself, in one step.
        _RUNTIME = initialize(1, 1, backend=cfg.parallel.backend,
                              timeout_minutes=cfg.parallel.timeout_minutes)
        if _RUNTIME.world_size != 1:
            raise ValueError(f"the bench runs in one process; WORLD_SIZE={_RUNTIME.world_size}")
    if _RUNTIME.device != setup.device:  # the train step would copy every micro-batch
        raise RuntimeError(f"the runtime computes on {_RUNTIME.device}, the bench's batches are "
                           f"on {setup.device}")
    torch.manual_seed(0)
    model = build_model(cfg, use_transformer_engine=te)  # on the runtime's device
    state = setup_training(model, cfg)
    n = len(setup.microbatches)

    def step():
        # The micro-batches are on the step's device, so the train step passes them through
        # uncopied; it leaves the loss on the device, as in training between log steps.
        return _DeviceLoss(train_step(state, setup.microbatches, n, cfg,
                                      summarize=False)["loss_sums"])

    precision = "fp8 hybrid" if fp8 else setup.precision
    from megatron_vlm.training.grad_finalize import GRAD_NORM_KERNEL

    return step, precision, ("megatron DDP + optimizer" + (", TE spec" if te else ", local spec")
                             + f", grad norm {GRAD_NORM_KERNEL}")


def unavailable(variant: str, setup: Setup, asked: bool = True) -> Optional[str]:
    """Why ``variant`` cannot (or, not ``asked`` for by name, will not) run here, or None."""
    if variant == "torch+compile" and setup.device.type == "cpu" and not asked:
        # Inductor's C++ build of the forward and backward graphs takes one to several minutes
        # on a few shared cores, longer than the rest of the CPU table together.
        return "n/a: skipped on CPU unless named in --variants (minutes of C++ compilation)"
    if not variant.startswith("megatron-te"):
        return None
    if setup.device.type != "cuda":
        return "n/a: no CUDA device (Transformer Engine needs one)"
    from megatron_vlm.runtime import has_transformer_engine

    if not has_transformer_engine():
        return "n/a: Transformer Engine is not installed (or does not import)"
    if variant.endswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        return f"n/a: FP8 needs compute capability 8.9+ (this GPU: {major}.{minor})"
    return None


# ---------------------------------------------------------------------------------------------
# Measurement


def _rss_peak_gib(reset: bool = False) -> Optional[float]:
    """This process's resident-set high-water mark (Linux), after resetting it if asked; None
    where it cannot be read or reset."""
    try:
        if reset:  # Linux >= 4.0: "5" resets VmHWM to the current resident set size
            Path("/proc/self/clear_refs").write_text("5")
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 2**20 if match else None


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(variant: str, setup: Setup, warmup: int, steps: int, asked: bool = True) -> Row:
    """Builds ``variant``, runs ``warmup`` then ``steps`` timed steps; a row with the median.
    ``asked``: the variant was named in --variants (not just the default list)."""
    reason = unavailable(variant, setup, asked)
    if reason:
        return Row(variant, note=reason)
    cuda = setup.device.type == "cuda"
    _free_memory(setup.device)
    peak_reset = cuda or _rss_peak_gib(reset=True) is not None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step, precision, note = (
        _torch_variant(setup, compile_model=variant == "torch+compile")
        if variant.startswith("torch")
        else _megatron_variant(setup, te="-te" in variant, fp8=variant in FP8_VARIANTS))
    loss, times = None, []
    try:
        for _ in range(warmup):
            loss = step()
        sync()
        for _ in range(steps):
            start = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - start)
    except Exception as err:
        if variant == "torch+compile" and type(err).__module__.startswith("torch._"):
            return Row(variant, precision, note=f"n/a: torch.compile failed: {_first_line(err)}")
        raise
    peak_mem = (torch.cuda.max_memory_allocated() / 2**30 if cuda
                else _rss_peak_gib() if peak_reset else None)
    note += ", peak = process RSS" if not cuda and peak_mem is not None else ""
    del step
    _free_memory(setup.device)
    tokens_per_step = setup.cfg.train.global_batch_size * setup.cfg.train.seq_length
    return Row(variant, precision,
               **figures(statistics.median(times), tokens_per_step, setup.flops_per_token,
                         setup.peaks, fp8=variant in FP8_VARIANTS),
               peak_mem_gib=peak_mem, loss=None if loss is None else float(loss), note=note)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)  # normalizes '-' and '_' in the name
    except importlib.metadata.PackageNotFoundError:
        return None


def report(setup: Setup, args: argparse.Namespace, argv: list, rows: list[Row],
           complete: bool) -> dict:
    """The JSON record: the setup, device, versions and peaks, and the rows so far. Its shape
    stays {"rows": [...], ...} (tools/gpu_check.py reads it while the bench runs)."""
    train = setup.cfg.train
    return {
        "complete": complete,  # false: more variants were to come (or the run was stopped)
        "device": setup.device_name, "torch": torch.__version__,
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer-engine"),
        "command": shlex.join([sys.executable, __file__, *argv]),
        "cpu_threads": torch.get_num_threads(),
        "recipe": setup.recipe, "precision": setup.precision,
        "seq_length": train.seq_length, "micro_batch_size": train.micro_batch_size,
        "global_batch_size": train.global_batch_size, "steps": args.steps,
        "warmup": args.warmup, "caption_fraction": setup.caption_fraction,
        "image_fraction": setup.image_fraction, "flops_per_token": setup.flops_per_token,
        "batch_device": str(setup.device),  # made there once, before the variants
        "peak": setup.peaks.as_dict(), "rows": [asdict(r) for r in rows],
    }


def main(argv: Optional[list] = None) -> int:
    """Runs the bench; exit status 0, 1 when a variant failed, 2 for bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    json_path = Path(args.json) if args.json else None
    try:
        if json_path is not None:  # before minutes of measuring, not after
            json_path.parent.mkdir(parents=True, exist_ok=True)
        setup = build_setup(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from megatron_vlm.fsutil import write_json_atomic
    from megatron_vlm.training import flops

    train = setup.cfg.train
    print(f"device: {setup.device_name}; recipe {setup.recipe}; precision {setup.precision}"
          + ("" if setup.device.type == "cuda" else
             f" (CPU: the recipe's train.params_dtype); {torch.get_num_threads()} threads"))
    print(f"batch: {train.global_batch_size} x {train.seq_length} tokens per step in "
          f"{len(setup.microbatches)} micro-batches of {train.micro_batch_size}, made once on "
          f"{setup.device}; caption rows {setup.caption_fraction:.1%} of tokens (asked "
          f"{args.caption_fraction:.0%}), image positions {setup.image_fraction:.2%}; "
          f"{args.warmup} warmup + {args.steps} timed steps")
    print(flops.formula(setup.cfg, setup.image_fraction, device_name=setup.device_name,
                        peaks=setup.peaks))
    # The baselines run first: on a CPU host the megatron variants install a redirect layer
    # that intercepts every torch call for the rest of the process.
    rows, failed = [], False
    for variant in (v for v in VARIANTS if v in args.variants):
        print(f"running {variant} ...", flush=True)
        try:
            rows.append(measure(variant, setup, args.warmup, args.steps, args.variants_given))
        except Exception as err:  # one failing variant must not lose the others' figures
            failed = True
            rows.append(Row(variant, note=f"error: {_first_line(err)}"))
            print(f"{variant} failed: {err!r}", file=sys.stderr)
            _free_memory(setup.device)
        add_ratios(rows)
        if json_path is not None:  # after every variant: a stopped run keeps the finished ones
            write_json_atomic(json_path, report(setup, args, argv, rows, complete=False))
    bad = [r.variant for r in rows if r.tokens_per_s is not None
           and not (math.isfinite(r.tokens_per_s) and (r.loss is None or math.isfinite(r.loss)))]
    if json_path is not None:
        write_json_atomic(json_path, report(setup, args, argv, rows, complete=True))
    if bad:
        print(f"non-finite figures in: {', '.join(bad)}", file=sys.stderr)
    print(format_table(rows))
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
