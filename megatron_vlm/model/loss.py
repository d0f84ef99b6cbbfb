"""The decoder's token loss without host synchronisation: vocabulary-parallel cross entropy.

megatron-core computes the loss inside ``GPTModel`` (``compute_language_model_loss``), in one of
three ways, two of which make the host wait for the GPU once per micro-batch:

* the unfused ``vocab_parallel_cross_entropy`` writes through boolean masks
  (``masked_target[target_mask] = 0``), which needs the mask's count on the host;
* Transformer Engine's kernel checks its inputs with a host comparison unless it is called with
  ``is_cg_capturable=True``, which megatron-core only passes for full-iteration CUDA graphs;
* the "native" fused loss (the same arithmetic under ``torch.compile``) is free of host reads
  once compiled.

:class:`DecoderGPTModel` is ``GPTModel`` with its loss taken from here: TE's kernel with
``is_cg_capturable=True`` where the run resolved the TE loss, and otherwise
:func:`vocab_parallel_cross_entropy`, the same arithmetic as megatron-core's with every
boolean write replaced by ``torch.where`` and a gather, fused by ``torch.compile`` on CUDA when
``performance.cross_entropy_fusion`` is on. No operation in it has a data-dependent size, so it
runs without host reads compiled or not (tests/test_host_sync.py runs it on the CPU).
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel


def _shift_and_pick(logits: torch.Tensor, logits_max: torch.Tensor, target: torch.Tensor,
                    vocab_start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """exp(logits - max) [.., V_local], its sum over this rank's vocabulary, the shifted logit
    of each target that falls in this rank's slice (0 elsewhere), and the in-slice mask."""
    vocab_local = logits.shape[-1]
    shifted = logits.float() - logits_max.unsqueeze(-1)
    local_target = target - vocab_start
    in_slice = (local_target >= 0) & (local_target < vocab_local)
    # Out-of-slice targets gather from column 0 and are zeroed by the where: no boolean write.
    index = local_target.clamp(0, vocab_local - 1).unsqueeze(-1)
    picked = torch.where(in_slice, shifted.gather(-1, index).squeeze(-1), 0.0)
    exp = shifted.exp()
    return exp, exp.sum(-1), picked, in_slice


def _gradient(softmax: torch.Tensor, target: torch.Tensor, in_slice: torch.Tensor,
              vocab_start: int, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d logits = softmax - one_hot(target) on this rank's slice, times the output
    gradient."""
    vocab_local = softmax.shape[-1]
    index = (target - vocab_start).clamp(0, vocab_local - 1).unsqueeze(-1)
    grad = softmax.scatter_add(-1, index, -in_slice.to(softmax.dtype).unsqueeze(-1))
    return (grad * grad_output.unsqueeze(-1)).to(dtype)


_COMPILED: dict[str, Callable] = {}


def _kernel(name: str, fn: Callable, fused: bool, device: torch.device) -> Callable:
    """``fn``, compiled once by torch.compile when the loss is fused on CUDA (the CPU runs it
    eagerly: nothing to fuse there worth a C++ build)."""
    if not (fused and device.type == "cuda"):
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, fused):
        world = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        rank = torch.distributed.get_rank(tp_group) if world > 1 else 0
        vocab_start = rank * logits.shape[-1]
        logits_max = logits.detach().float().amax(dim=-1)
        if world > 1:
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX,
                                         group=tp_group)
        shift = _kernel("shift", _shift_and_pick, fused, logits.device)
        exp, sum_exp, picked, in_slice = shift(logits, logits_max, target, vocab_start)
        if world > 1:  # one all-reduce for both sums, as the ranks' slices add up
            both = torch.stack((picked, sum_exp))
            torch.distributed.all_reduce(both, group=tp_group)
            picked, sum_exp = both[0], both[1]
        loss = torch.log(sum_exp) - picked
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, target, in_slice)
        ctx.vocab_start, ctx.fused, ctx.dtype = vocab_start, fused, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target, in_slice = ctx.saved_tensors
        gradient = _kernel("grad", _gradient, ctx.fused, softmax.device)
        grad = gradient(softmax, target, in_slice, ctx.vocab_start, grad_output, ctx.dtype)
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 tp_group=None, fused: bool = False) -> torch.Tensor:
    """Per-token cross entropy [s, b] of ``logits`` [s, b, vocab / TP] (this rank's vocabulary
    slice; slices in rank order) against ``target`` [s, b], reduced over ``tp_group``.
    Equal to megatron-core's ``vocab_parallel_cross_entropy`` (no label smoothing)."""
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, fused)


def _te_cross_entropy():
    """TE's loss through megatron-core's wrapper, or None where it cannot be called sync-free
    (no TE, or a TE older than 2.7 without ``is_cg_capturable``)."""
    try:
        from megatron.core.extensions import transformer_engine as te_ext
    except ImportError:
        return None
    if getattr(te_ext, "te_parallel_cross_entropy", None) is None:
        return None
    if not getattr(te_ext, "_TE_SUPPORTS_CG_CAPTURABLE", False):
        return None
    return te_ext.te_parallel_cross_entropy


def te_cross_entropy_available() -> bool:
    return _te_cross_entropy() is not None


class DecoderGPTModel(GPTModel):
    """megatron-core's GPTModel with a loss that never makes the host wait (see the module
    docstring); everything else, the state dict included, is GPTModel's."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b], as logits
        tp_group = self.pg_collection.tp if hasattr(self, "pg_collection") else \
            parallel_state.get_tensor_model_parallel_group()
        fused = self.config.cross_entropy_loss_fusion
        if fused and self.config.cross_entropy_fusion_impl == "te":
            te_loss = _te_cross_entropy()
            if te_loss is None:
                raise RuntimeError("the TE loss was resolved but cannot be called without host "
                                   "synchronisation here (Transformer Engine >= 2.7 needed)")
            loss = te_loss(logits, labels, tp_group, True)
        else:
            loss = vocab_parallel_cross_entropy(logits, labels, tp_group, fused=fused)
        return loss.transpose(0, 1).contiguous()
