"""Data-parallel replicas in evaluation: which share of the work is this replica's, gathering
every replica's results back, and which process writes the output.

Every TP x PP rank of a replica holds the same results, so gathering over the data-parallel
group gives every rank all of them.
"""

from __future__ import annotations


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def data_parallel_shard() -> tuple[int, int]:
    """(this replica's data-parallel rank, replicas); (0, 1) without megatron parallel state."""
    if not _distributed():
        return 0, 1
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def gather_over_data_parallel(items: list) -> list:
    """Every replica's ``items`` concatenated in replica order, on every rank."""
    _, size = data_parallel_shard()
    if size == 1:
        return list(items)
    import torch.distributed as dist
    from megatron.core import parallel_state

    parts: list = [None] * size
    dist.all_gather_object(parts, items, group=parallel_state.get_data_parallel_group())
    return [item for part in parts for item in part]


def is_global_rank0() -> bool:
    """Whether this process writes files and prints results (global rank 0, or no group)."""
    import torch.distributed as dist

    return not _distributed() or dist.get_rank() == 0
