"""Micro-batches onto the device, in one place: pinned host memory, non-blocking copies, and the
next micro-batch's copy issued on a side CUDA stream while the current one computes.

In CPU mode the batches are already where the model is and pass through untouched.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch


def to_device(batch: dict, device: torch.device, non_blocking: bool = True) -> dict:
    """The batch with every tensor on ``device`` (non-tensor values, e.g. ``max_seqlen``, kept).
    Host tensors are pinned first when the copy goes to a GPU, so that it can be asynchronous."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            if device.type == "cuda" and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=non_blocking)
        out[key] = value
    return out


class DeviceMicroBatches:
    """Iterates ``microbatches`` (host batches) as batches on ``device``.

    On CUDA, micro-batch ``i + 1`` is copied on a side stream while micro-batch ``i`` computes;
    handing a batch over makes the compute stream wait for its copy and records the tensors as
    used there, so the caching allocator does not reuse their memory early. The host batches
    must stay alive while the iterator is in use (the caller's list holds them).
    """

    def __init__(self, microbatches: Iterable[dict], device: torch.device):
        self.device = device
        self._host: Iterator[dict] = iter(microbatches)
        self._stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._next: Optional[dict] = self._copy_next()

    def _copy_next(self) -> Optional[dict]:
        batch = next(self._host, None)
        if batch is None:
            return None
        if self._stream is None:
            return to_device(batch, self.device)
        with torch.cuda.stream(self._stream):
            return to_device(batch, self.device)

    def __iter__(self) -> "DeviceMicroBatches":
        return self

    def __next__(self) -> dict:
        batch = self._next
        if batch is None:
            raise StopIteration
        if self._stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self._stream)
            for value in batch.values():
                if isinstance(value, torch.Tensor):
                    value.record_stream(compute)
        self._next = self._copy_next()
        return batch
