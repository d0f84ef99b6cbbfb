"""What happens to the gradients between the backward pass and the optimizer's update, without
the host waiting for the GPU.

megatron-core does both steps below with a host read once per optimizer step:

* ``finalize_model_grads`` divides the gradients by the global count of loss tokens behind an
  ``if num_tokens > 0`` (a device value compared on the host);
* ``MegatronOptimizer.step`` clips by the global gradient norm, which it reads to the host
  (``.item()``) to decide in Python whether to scale; without apex or Transformer Engine its
  norm fallback also reads one value per gradient tensor (``local_multi_tensor_l2_norm``).

:func:`finalize_grads` is megatron's ``finalize_model_grads`` (every reduction of it) with the
division done on the device (a count of zero leaves the gradients as they are, as megatron
does: they are all zero then). :func:`optimizer_step` runs the optimizer's own three phases
(``prepare_grads``, clipping, ``step_with_ready_grads``) with the clipping done by
:func:`clip_grad_norm`: the norm of all main gradients with ``torch._foreach_norm`` (one
multi-tensor kernel per dtype on CUDA), reduced over the optimizer's gradient-statistics group,
and every gradient multiplied by ``min(1, max_norm / (norm + 1e-6))`` (the coefficient megatron
uses; multiplying by exactly 1.0 where megatron skips the scaling changes nothing). The norm
stays a device tensor; the train loop reads it at log steps only.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from megatron_vlm.runtime.distributed import current_device

# Which gradient-norm path ran (logged at start, and in the benchmark's notes): this one, in
# place of megatron-core's (apex's or TE's multi-tensor kernel with a host read, or without
# either a host read per gradient tensor).
GRAD_NORM_KERNEL = "torch._foreach_norm, on the device"
GRAD_NORM_PATH = (f"gradient norm and clipping: {GRAD_NORM_KERNEL} (read on the host at log "
                  "steps only)")


def finalize_grads(model: list, num_tokens: Optional[torch.Tensor] = None, pg_collection=None,
                   force_all_reduce: Optional[bool] = False) -> None:
    """megatron-core's ``finalize_model_grads`` (same signature: it is the model config's
    ``finalize_model_grads_func``) without the host read of the token count."""
    finalize_model_grads(model, None, pg_collection=pg_collection,
                         force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    if pg_collection is not None:
        pp_group, dp_cp_group = pg_collection.pp, pg_collection.dp_cp
    else:
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    # Only the last pipeline stage counted the tokens: broadcast, then sum over DP ranks.
    last_rank = torch.distributed.get_process_group_ranks(pp_group)[-1]
    torch.distributed.broadcast(num_tokens, src=last_rank, group=pp_group)
    torch.distributed.all_reduce(num_tokens, group=dp_cp_group)
    scaling = 1.0 / num_tokens.clamp(min=1)
    for model_chunk in model:
        model_chunk.scale_gradients(scaling)


def _parts(optimizer) -> list:
    """The optimizers that own parameters (a ChainedOptimizer's members, or the optimizer)."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [p for p in parts if not getattr(p, "is_stub_optimizer", False)]


def _grads_of(params: list) -> list:
    return [p.grad.detach() for p in params if p.grad is not None]


@torch.no_grad()
def clip_grad_norm(optimizer, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the main gradients (a device tensor) after scaling every gradient
    so that it is at most ``max_norm``; no host read."""
    parts = _parts(optimizer)
    for_norm = [g for part in parts for g in part.get_main_grads_for_grad_norm()]
    device = for_norm[0].device if for_norm else current_device()
    squares = torch.zeros((), dtype=torch.float32, device=device)
    by_dtype: dict = {}
    for grad in for_norm:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in by_dtype.values():
        norms = torch._foreach_norm(grads, 2.0)
        squares = squares + torch.stack(norms).float().square().sum()
    group = optimizer.get_grad_stats_parallel_group()
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(squares, group=group)
    norm = squares.sqrt()
    if max_norm > 0:
        coefficient = (max_norm / (norm + 1.0e-6)).clamp(max=1.0)
        grads = [g for part in parts for g in _grads_of(part.get_parameters())]
        if grads:
            torch._foreach_mul_(grads, coefficient)
    return norm


def optimizer_step(optimizer, clip_grad: float) -> tuple[bool, torch.Tensor]:
    """One update: (success, the gradient norm before clipping as a device tensor).

    The phases of megatron-core's ``MegatronOptimizer.step`` in its order, with the clipping
    of :func:`clip_grad_norm`. ``prepare_grads`` reports non-finite gradients only where a
    loss scaler exists (fp16, which this project does not use): bf16 and fp32 runs have none.
    """
    if optimizer.prepare_grads():
        return False, torch.full((), float("nan"))
    norm = clip_grad_norm(optimizer, clip_grad)
    return bool(optimizer.step_with_ready_grads()), norm
