"""Communication of the inference engine over one model replica's pipeline and tensor groups.

Inference runs one stage after another (no micro-batch interleaving): each stage receives its
input hidden states ``[s, b, h]`` from the previous stage, runs its layers and sends its output
to the next. Both sides know the shape (every rank of a replica is called with the same
arguments), so only the tensor travels. The last stage then decides (the next tokens, the
scores) and broadcasts the decision to the other stages; tensor-parallel ranks of a stage are
each paired with the same tensor-parallel rank of the other stages, so a broadcast over the
pipeline group reaches every rank of the replica.

Everything is plain torch.distributed on megatron-core's groups: gloo with CPU tensors,
NCCL with tensors on the current CUDA device (megatron-core's own inference helpers assert
CUDA tensors, so they cannot run on the CPU). With one stage (or one TP rank) every function
here is a no-op without any communication.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def pipeline_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def is_first_stage() -> bool:
    return parallel_state.is_pipeline_first_stage(ignore_virtual=True)


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def recv_from_previous_stage(shape: tuple[int, ...], dtype: torch.dtype,
                             device: torch.device) -> torch.Tensor:
    """The previous stage's output of ``shape`` (blocking)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buffer, src=parallel_state.get_pipeline_model_parallel_prev_rank(),
              group=parallel_state.get_pipeline_model_parallel_group())
    return buffer


def send_to_next_stage(tensor: torch.Tensor) -> None:
    """Sends this stage's output to the next stage (blocking)."""
    dist.send(tensor.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank(),
              group=parallel_state.get_pipeline_model_parallel_group())


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape: tuple[int, ...],
                              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``tensor`` as the last stage holds it, on every stage (``tensor`` is ignored elsewhere
    and may be None there)."""
    if pipeline_size() == 1:
        return tensor
    if is_last_stage():
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"broadcast of {tuple(tensor.shape)} {tensor.dtype}; the other "
                               f"stages expect {tuple(shape)} {dtype}")
        tensor = tensor.contiguous()
    else:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def tensor_parallel_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tensor_parallel_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def all_reduce_tensor_parallel(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduces ``tensor`` in place over the tensor-parallel group; returns it."""
    if tensor_parallel_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return tensor
