"""Finds the operations that make the host wait for the GPU, on any machine, the CPU included.

A training step that never reads a device value on the host lets the CPU run ahead and queue
kernels while the GPU computes. One read (``.item()``, a data-dependent output size as in
``nonzero`` or boolean-mask indexing, a copy to host memory, a blocking copy of Python data to
the device) stalls that pipeline once per occurrence. ``torch.cuda.set_sync_debug_mode`` finds
these on a GPU; on the CPU, where the GPU path is exercised through the CPU redirect layer
(:mod:`megatron_vlm.runtime.cpu_compat`), nothing ever waits, so they have to be recognised by
the operation itself. :class:`HostReadMonitor` does that at three levels:

* aten operations (a ``TorchDispatchMode``): ``_local_scalar_dense`` (``item``, ``bool()``,
  ``float()``), ``nonzero``, ``masked_select``, ``equal``, ``is_nonzero``, the ``unique``
  family, ``bincount``, ``repeat_interleave`` without ``output_size``, and ``index`` /
  ``index_put`` with a boolean index;
* tensor methods that bring data to the host (a ``TorchFunctionMode``): ``cpu``, ``tolist``,
  ``numpy``, ``item`` and ``to`` naming the CPU;
* device requests the CPU redirect layer rewrites: ``torch.tensor`` / ``as_tensor`` /
  ``asarray`` of host data onto CUDA (a pageable, blocking copy) and ``torch.cuda.synchronize``.

Used by the tests (``tests/test_host_sync.py``: whole train steps on the CPU) and by the GPU
tests beside ``set_sync_debug_mode``; ``strict=True`` raises at the first read with the Python
frame that asked for it, otherwise every read is collected in :attr:`HostReadMonitor.reads`.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten overload packets whose result size or value the host must know before it can go on.
_ALWAYS_READS = {
    aten._local_scalar_dense: "reads a value on the host (item / bool() / float())",
    aten.nonzero: "nonzero: an output size that depends on the data",
    aten.masked_select: "masked_select: an output size that depends on the data",
    aten.equal: "equal: a comparison answered on the host",
    aten.is_nonzero: "is_nonzero: a truth value read on the host",
    aten.unique_dim: "unique: an output size that depends on the data",
    aten._unique: "unique: an output size that depends on the data",
    aten._unique2: "unique: an output size that depends on the data",
    aten.unique_consecutive: "unique_consecutive: an output size that depends on the data",
    aten.bincount: "bincount: an output size that depends on the data",
    # the backward of masked_scatter selects the masked gradient (masked_select inside the op)
    aten.masked_scatter_backward: "masked_scatter backward: a masked_select inside, an output "
                                  "size that depends on the data",
}
_BOOLEAN_INDEXED = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)
# Tensor methods that copy device data into host memory (or read it there).
_HOST_COPIES = {torch.Tensor.cpu: "cpu()", torch.Tensor.tolist: "tolist()",
                torch.Tensor.numpy: "numpy()", torch.Tensor.item: "item()"}


@dataclass(frozen=True)
class HostRead:
    """One operation that waits for the device: what it was and the project frame asking."""

    op: str
    reason: str
    where: str

    def __str__(self) -> str:
        return f"{self.op}: {self.reason} (at {self.where})"


class HostSyncError(RuntimeError):
    """An operation that reads a device value on the host, where none may happen."""


# Reads of tensors that live in host memory by design, found by the function doing the read
# (file suffix, function): torch.optim's optimizers keep each parameter's step counter on the
# host unless built capturable or fused, and read it there (no device is involved).
HOST_STATE_READS = {
    ("torch/optim/optimizer.py", "_get_value"): "torch.optim's step counter, kept on the host",
}
# Frames of the machinery between an operation and the code that asked for it.
_MACHINERY = ("/runtime/host_sync.py", "/torch/utils/_python_dispatch.py", "/torch/overrides.py",
              "/torch/_compile.py", "/torch/_dynamo/eval_frame.py")


def _origin() -> tuple[str, Optional[str]]:
    """(the innermost frame outside torch and this layer: the code that asked for the read,
    why the read touches host memory only, or None), from one walk of the stack."""
    stack = traceback.extract_stack()[:-2]
    host_state = None
    for frame in reversed(stack):  # the frame doing the read, under the modes' machinery
        name = frame.filename.replace("\\", "/")
        if name.endswith(_MACHINERY):
            continue
        host_state = next((why for (suffix, function), why in HOST_STATE_READS.items()
                           if name.endswith(suffix) and frame.name == function), None)
        break
    for frame in reversed(stack):
        name = frame.filename.replace("\\", "/")
        if "/torch/" in name or name.endswith(("/runtime/host_sync.py", "/runtime/cpu_compat.py")):
            continue
        return f"{frame.filename}:{frame.lineno} in {frame.name}", host_state
    return "?", host_state


def _names_cpu(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cpu"
    return isinstance(device, str) and device.startswith("cpu")


def _is_boolean_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in (indices or ()))


class _DispatchWatch(TorchDispatchMode):
    def __init__(self, monitor: "HostReadMonitor"):
        super().__init__()
        self.monitor = monitor

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        reason = _ALWAYS_READS.get(packet)
        if reason is None and packet in _BOOLEAN_INDEXED and len(args) > 1:
            if _is_boolean_index(args[1]):
                reason = "boolean-mask indexing: an output size that depends on the data"
        if (reason is None and func is aten.repeat_interleave.Tensor
                and kwargs.get("output_size") is None):
            reason = "repeat_interleave without output_size: an output size that depends on the data"
        if reason is not None:
            self.monitor.record(str(func), reason)
        return func(*args, **kwargs)


class _FunctionWatch(TorchFunctionMode):
    def __init__(self, monitor: "HostReadMonitor"):
        super().__init__()
        self.monitor = monitor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _HOST_COPIES.get(func)
        if what is not None:
            self.monitor.record(what, "copies device data to the host")
        elif func is torch.Tensor.to:
            device = kwargs.get("device", args[1] if len(args) > 1 else None)
            if _names_cpu(device):
                self.monitor.record("to(cpu)", "copies device data to the host")
        return func(*args, **kwargs)


class HostReadMonitor:
    """Context manager: records (or, ``strict``, raises at) every host read inside it.

    ``allow()`` opens a region where reads are expected (e.g. a log step reading its loss);
    reads there, and reads of host-resident state (:data:`HOST_STATE_READS`), are collected
    in :attr:`allowed` instead.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.reads: list[HostRead] = []
        self.allowed: list[HostRead] = []
        self._allow_depth = 0
        self._modes: list = []

    def record(self, op: str, reason: str) -> None:
        where, host_state = _origin()
        read = HostRead(op, host_state or reason, where)
        if self._allow_depth or host_state is not None:
            self.allowed.append(read)
            return
        self.reads.append(read)
        if self.strict:
            raise HostSyncError(f"host synchronisation: {read}")

    def _observe_redirect(self, name: str, args: tuple, kwargs: dict) -> None:
        """Called by the CPU redirect layer for a device request it rewrites to the CPU."""
        if name in ("tensor", "as_tensor", "asarray"):
            data = args[0] if args else kwargs.get("data")
            if not isinstance(data, torch.Tensor):
                self.record(f"torch.{name}(..., device=cuda)",
                            "copies Python data to the device from pageable memory (blocking)")
        elif name == "synchronize":
            self.record("torch.cuda.synchronize", "waits for the device")

    @contextlib.contextmanager
    def allow(self) -> Iterator[None]:
        self._allow_depth += 1
        try:
            yield
        finally:
            self._allow_depth -= 1

    def __enter__(self) -> "HostReadMonitor":
        from megatron_vlm.runtime import cpu_compat

        cpu_compat.add_redirect_observer(self._observe_redirect)
        self._modes = [_FunctionWatch(self), _DispatchWatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from megatron_vlm.runtime import cpu_compat

        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
        cpu_compat.remove_redirect_observer(self._observe_redirect)

    def report(self, limit: Optional[int] = 20) -> str:
        """The reads, one per line, most frequent first (with their counts)."""
        counts: dict[str, int] = {}
        for read in self.reads:
            counts[str(read)] = counts.get(str(read), 0) + 1
        lines = [f"{n} x {text}" for text, n in sorted(counts.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines[:limit])
