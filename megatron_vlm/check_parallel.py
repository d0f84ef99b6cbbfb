"""Checks that a parallel layout trains exactly like a single process, before GPU hours are spent.

    torchrun --nproc_per_node N -m megatron_vlm.check_parallel --tp T --pp P [--dp D]

N must equal T * P * D (D defaults to N / (T * P)). The check builds the tiny VLM at TP=PP=1
(every rank computing the whole global batch, which equals one process), saves its initial
weights as a megatron-core distributed checkpoint, and loads them at the requested layout. Both
then train the same global batches through megatron-core's schedules, DDP and optimizer. It
prints and compares, each against ``--tolerance``:

* ``logits``: logits of the first batch at the initial weights;
* ``grads``: gradients of the first global batch (resharded to TP=PP=1 via a checkpoint);
* ``loss``: per-step losses (largest difference over the steps);
* ``params``: weights after the last step (resharded to TP=PP=1 via a checkpoint);
* ``reload_logits``: logits of the layout's final checkpoint loaded at TP=PP=1, against the
  layout's own final logits.

Exits with status 1 when any difference is above tolerance. On a host without CUDA it runs on
the CPU over gloo with the same megatron-core code. The reference layout holds the whole model
on one device, so pick a recipe that fits one (the default, ``tiny``, fits anywhere).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vlm.runtime.distributed import current_device
from megatron_vlm.training.device_batches import DeviceMicroBatches

CHECKS = ("logits", "grads", "loss", "params", "reload_logits")


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_vlm.cli import OverridesParser
    from megatron_vlm.config import format_help

    parser = OverridesParser(
        prog="python -m megatron_vlm.check_parallel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Checks: " + ", ".join(CHECKS) + "\n\n" + format_help(),
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check")
    parser.add_argument("--dp", type=int, default=None,
                        help="data-parallel size (default: world size / (tp * pp))")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="use megatron's distributed optimizer at the checked layout")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to compare")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest allowed absolute difference of logits, gradients and "
                             "losses (fp32)")
    parser.add_argument("--param-tolerance", type=float, default=1e-4,
                        help="largest allowed difference of the weights after the last step. "
                             "Adam divides each update by the gradient's running RMS, so "
                             "weights whose gradients are near zero turn rounding differences "
                             "of the gradient into differences of up to a fraction of the LR")
    parser.add_argument("--recipe", default="tiny", help="model recipe (default: tiny)")
    parser.add_argument("--workdir", default=None,
                        help="directory for the temporary checkpoints, shared by all ranks "
                             "(default: a fresh temporary directory; give a shared path on "
                             "multi-node runs)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_overrides("config overrides")
    return parser.parse_args(argv)


def _layout_config(base, tp: int, pp: int, distributed_optimizer: bool):
    import copy

    cfg = copy.deepcopy(base)
    cfg.parallel.tensor_parallel = tp
    cfg.parallel.pipeline_parallel = pp
    cfg.parallel.data_parallel = None
    cfg.parallel.use_distributed_optimizer = distributed_optimizer
    cfg.train.params_dtype = "fp32"
    cfg.train.fp8 = None
    # Throughput features asked for in the overrides apply to the checked layout where they can;
    # the TP=PP=DP=1 reference runs without the ones that need a larger layout.
    if tp == 1:
        cfg.performance.sequence_parallel = None
    if not distributed_optimizer:
        cfg.performance.overlap_param_gather = None
    return cfg


def _global_batches(cfg, steps: int) -> list[dict]:
    from megatron_vlm.data.batch import random_batch

    gen = torch.Generator().manual_seed(cfg.seed + 17)
    dec, enc = cfg.model.decoder, cfg.model.encoder
    image_size = enc.image_size if enc.mode == "online" else None
    return [random_batch(gen, cfg.train.global_batch_size, cfg.train.seq_length, dec.vocab_size,
                         enc.num_image_tokens, enc.embed_dim, image_size=image_size,
                         documents=cfg.data.caption_fill == "text")
            for _ in range(steps)]


def _my_microbatches(batch: dict, cfg) -> tuple[list[dict], int]:
    """This data-parallel rank's share of a global batch as micro-batches, and its first row."""
    from megatron.core import parallel_state

    from megatron_vlm.data.batch import slice_rows, split_microbatches

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    rows = batch["tokens"].shape[0] // dp
    share = slice_rows(batch, rank * rows, (rank + 1) * rows)
    return split_microbatches(share, cfg.train.micro_batch_size), rank * rows


class _Phase:
    """One parallel layout: runtime state, model, optimizer."""

    def __init__(self, cfg, batch_share):
        from megatron_vlm.model.build import build_model
        from megatron_vlm.runtime import initialize
        from megatron_vlm.training.step import setup_training

        self.cfg = cfg
        self.batch_share = batch_share
        initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                   timeout_minutes=cfg.parallel.timeout_minutes, seed=cfg.seed,
                   device=cfg.parallel.device)
        self.model = build_model(cfg)
        self.state = setup_training(self.model, cfg)

    def load(self, directory) -> None:
        from megatron_vlm.training.checkpointing import load_model

        load_model(self.model, directory)
        # DDP keeps fp32 main params in the optimizer; re-seed them from the loaded weights.
        self.state.optimizer.reload_model_params()

    def save(self, directory) -> None:
        from megatron_vlm.training.checkpointing import save_model
        from megatron_vlm.training.loop import synced_parameters

        with synced_parameters(self.state.model):
            save_model(self.model, directory)

    def microbatches(self, batch) -> list[dict]:
        return self.batch_share(batch, self.cfg)[0]

    def logits(self, batch) -> tuple[torch.Tensor, int] | None:
        """Full-vocabulary logits of this rank's rows of ``batch`` and the first row's index,
        on last-stage ranks (None elsewhere)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        def step(data_iterator, model):
            mb = next(data_iterator)
            out = model(tokens=mb["tokens"], image_mask=mb["image_mask"],
                        image_embeddings=mb.get("image_embeddings"), images=mb.get("images"),
                        segment_ids=mb.get("segment_ids"), cu_seqlens=mb.get("cu_seqlens"),
                        max_seqlen=mb.get("max_seqlen"))
            return out, lambda output, non_loss_data=True: gather_from_tensor_model_parallel_region(output).detach()

        from megatron_vlm.training.step import pipeline_shape

        mbs, first_row = self.batch_share(batch, self.cfg)
        seq_length, micro_batch_size = pipeline_shape(self.cfg, self.model)
        with torch.no_grad():
            data = get_forward_backward_func()(
                forward_step_func=step, data_iterator=DeviceMicroBatches(mbs, current_device()),
                model=[self.state.model],
                num_microbatches=len(mbs), seq_length=seq_length,
                micro_batch_size=micro_batch_size, forward_only=True,
                collect_non_loss_data=True)
        if not parallel_state.is_pipeline_last_stage():
            return None
        return torch.cat(data, dim=0).cpu(), first_row

    def gradients(self, batch) -> dict[str, torch.Tensor]:
        """Mean gradients of one global batch by parameter name (no optimizer step)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_vlm.training.step import forward_step, pipeline_shape

        model = self.state.model
        model.zero_grad_buffer()
        mbs = self.microbatches(batch)
        seq_length, micro_batch_size = pipeline_shape(self.cfg, self.model)
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=DeviceMicroBatches(mbs, current_device()), model=[model],
            num_microbatches=len(mbs), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=False)
        if self.cfg.parallel.use_distributed_optimizer:
            _gather_reduce_scattered_grads(model)
        grads = {name: p.main_grad.detach().to("cpu", copy=True)
                 for name, p in self.model.named_parameters() if p.requires_grad}
        model.zero_grad_buffer()
        return grads

    def train(self, batches) -> list[float]:
        from megatron_vlm.training.step import train_step

        losses = []
        for batch in batches:
            mbs = self.microbatches(batch)
            losses.append(train_step(self.state, iter(mbs), len(mbs), self.cfg)["loss"])
        return losses

    def close(self) -> None:
        from megatron.core import parallel_state

        dist.barrier()
        parallel_state.destroy_model_parallel()


def _perturb_gains(model, seed: int) -> None:
    """Norm gains start at one, which would hide a gain loaded onto the wrong TP rank or
    layer; give every 1-D weight (gains, biases) distinct values, the same on every rank."""
    gen = torch.Generator().manual_seed(seed + 29)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _gather_reduce_scattered_grads(ddp_model) -> None:
    """With the distributed optimizer, DDP reduce-scatters gradients: each data-parallel rank
    holds the reduced values of its shard of every bucket only. All-gather the shards so every
    parameter's main_grad is whole again (for comparison; training never needs this)."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    size, rank = group.size(), group.rank()
    for buffer in ddp_model.buffers:
        for bucket in buffer.buckets:
            shards = bucket.grad_data.view(size, -1)
            mine = shards[rank].clone()
            dist.all_gather_into_tensor(bucket.grad_data, mine, group=group)


def _whole_batch(batch: dict, cfg) -> tuple[list[dict], int]:
    from megatron_vlm.data.batch import split_microbatches

    return split_microbatches(batch, cfg.train.micro_batch_size), 0


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"parameter names differ: {sorted(a.keys() ^ b.keys())[:5]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _world_max(value: float) -> float:
    """Largest value over all ranks (NaN-safe: a NaN anywhere gives inf)."""
    t = torch.tensor([value if value == value else float("inf")], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def run_check(cfg_base, tp: int, pp: int, dp: int | None, distributed_optimizer: bool,
              steps: int, workdir: Path) -> dict[str, float]:
    """Runs the three phases and returns the largest difference of each check."""
    world = dist.get_world_size()
    if dp is not None and dp * tp * pp != world:
        raise ValueError(f"--dp {dp} x --tp {tp} x --pp {pp} = {dp * tp * pp} but the world size is "
                         f"{world} (torchrun --nproc_per_node)")
    ref_cfg = _layout_config(cfg_base, 1, 1, False)
    lay_cfg = _layout_config(cfg_base, tp, pp, distributed_optimizer)
    lay_cfg.validate_parallel(world)
    batches = _global_batches(ref_cfg, steps)
    init_dir, grad_dir, final_dir = (workdir / n for n in ("init", "grads", "final"))

    # Phase 1: the reference, every rank computing the whole global batch (= one process).
    ref = _Phase(ref_cfg, _whole_batch)
    _perturb_gains(ref.model, ref_cfg.seed)
    ref.state.optimizer.reload_model_params()
    ref.save(init_dir)
    ref_logits = ref.logits(batches[0])
    ref_grads = ref.gradients(batches[0])
    ref_losses = ref.train(batches)
    ref_params = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    ref.close()

    # Phase 2: the layout under test, from the same initial weights.
    lay = _Phase(lay_cfg, _my_microbatches)
    lay.load(init_dir)
    lay_logits = lay.logits(batches[0])
    grads = lay.gradients(batches[0])
    # The gradients are resharded to TP=PP=1 the way weights are: saved in place of the
    # weights as a distributed checkpoint (the weights are reloaded right after).
    with torch.no_grad():
        for name, p in lay.model.named_parameters():
            if name in grads:
                p.copy_(grads[name])
    lay.save(grad_dir)
    lay.load(init_dir)
    lay_losses = lay.train(batches)
    lay_final_logits = lay.logits(batches[0])
    lay.save(final_dir)
    lay.close()

    # Phase 3: back at TP=PP=1, read the layout's gradients and final weights.
    back = _Phase(ref_cfg, _whole_batch)
    back.load(grad_dir)
    grads_back = {n: p.detach().clone() for n, p in back.model.named_parameters() if n in ref_grads}
    back.load(final_dir)
    params_back = {n: p.detach().clone() for n, p in back.model.named_parameters()}
    reload_logits = back.logits(batches[0])
    back.close()

    result = {
        "logits": _world_max(_logit_diff(lay_logits, ref_logits)),
        "grads": _world_max(_max_diff(ref_grads, grads_back)),
        "loss": _world_max(max(abs(a - b) for a, b in zip(ref_losses, lay_losses))),
        "params": _world_max(_max_diff(ref_params, params_back)),
        "reload_logits": _world_max(_logit_diff(lay_final_logits, reload_logits)),
    }
    return {**result, "reference_losses": ref_losses, "layout_losses": lay_losses}


def _logit_diff(part, whole) -> float:
    """Largest difference between a rank's rows of logits and the same rows of a whole batch."""
    if part is None or whole is None:
        return 0.0  # not a last pipeline stage at one of the layouts: nothing held here
    (rows, first), (all_rows, _) = part, whole
    return float((rows - all_rows[first:first + rows.shape[0]]).abs().max())


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_vlm.logs import configure_logging

    configure_logging()
    from megatron_vlm.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    workdir = Path(args.workdir) if args.workdir else None
    own_tmp = workdir is None
    if own_tmp:
        # Every rank must use the same directory: rank 0 picks it and the others read it.
        from megatron_vlm.runtime.distributed import init_process_group_only

        init_process_group_only(cfg.parallel.backend, cfg.parallel.timeout_minutes,
                                cfg.parallel.device)
        holder = [tempfile.mkdtemp(prefix="check_parallel_") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        workdir = Path(holder[0])
    try:
        result = run_check(cfg, args.tp, args.pp, args.dp, args.distributed_optimizer,
                           args.steps, workdir)
    finally:
        if own_tmp and dist.is_initialized():
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(workdir, ignore_errors=True)
    limits = {k: args.param_tolerance if k == "params" else args.tolerance for k in CHECKS}
    failed = [k for k in CHECKS if not result[k] <= limits[k]]
    if dist.get_rank() == 0:
        layout = (f"TP={args.tp} PP={args.pp} DP={dist.get_world_size() // (args.tp * args.pp)}"
                  + (" distributed-optimizer" if args.distributed_optimizer else ""))
        if args.json:
            print(json.dumps({"layout": layout, "limits": limits, "failed": failed, **result}))
        else:
            print(f"check_parallel {layout} vs TP=PP=DP=1, {args.steps} steps")
            for k in CHECKS:
                verdict = "FAIL" if k in failed else "ok"
                print(f"  {k:14s} max |diff| = {result[k]:.3e}  (limit {limits[k]:g})  {verdict}")
            print(f"  losses: {['%.6f' % x for x in result['layout_losses']]}")
            print("PASSED" if not failed else f"FAILED: {', '.join(failed)}")
    from megatron_vlm.runtime import shutdown

    shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, "check_parallel")
