"""Lets megatron-core's CUDA-only paths run on a CPU host over gloo.

megatron-core's DDP wrapper, optimizer, pipeline schedules, distributed checkpointing and RNG
tracker ask for CUDA devices, streams and generators in many places. Rather than re-implementing
those pieces, this module redirects the CUDA requests they make to the CPU, so that tests on a
CPU machine exercise the same megatron-core code a GPU cluster runs:

* a ``TorchFunctionMode`` rewrites ``device=`` arguments (and positional devices of
  ``Tensor.to``) that name CUDA into the CPU device;
* ``Tensor.cuda`` / ``Module.cuda`` return their receiver unchanged;
* ``Tensor.type()`` reports ``torch.cuda.*`` names for CPU tensors (megatron checks
  ``param.type() == 'torch.cuda.FloatTensor'``);
* ``torch.cuda`` device, stream, event, memory and RNG helpers get CPU stand-ins; the CUDA RNG
  state that megatron's tracker forks is the CPU generator's state.

It must only ever be installed on hosts without CUDA; :func:`install` refuses otherwise.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_LOCK = threading.Lock()
_CPU = torch.device("cpu")

_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.int16: "torch.cuda.ShortTensor",
    torch.int8: "torch.cuda.CharTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device index means an accelerator ordinal (megatron passes
    # torch.cuda.current_device() around); there is none here.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call into the CPU device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            args = tuple(_CPU if i > 0 and _names_cuda(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _Stream:
    """Stand-in for torch.cuda.Stream: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    """Stand-in for torch.cuda.Event, timing with the host clock."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        import time

        self._time = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._time - self._time) * 1000.0


def _cpu_get_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.stream = lambda s=None: contextlib.nullcontext()
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    # megatron's RNG tracker seeds "the CUDA generator" to derive per-TP-rank streams.
    # (torch.manual_seed itself calls cuda.manual_seed_all, which must not recurse.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    cuda.set_rng_state_all = lambda states: torch.set_rng_state(states[0])
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None


def _patch_tensor_methods():
    original_type = torch.Tensor.type

    def type_reporting_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            return _TYPE_NAMES.get(self.dtype, original_type(self))
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_reporting_cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


def _patch_megatron_rng():
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state


def install() -> None:
    """Installs the CPU redirection once per process (idempotent)."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError("cpu_compat.install() called on a host with CUDA; use the GPU path")
        _patch_torch_cuda()
        _patch_tensor_methods()
        _patch_megatron_rng()
        mode = _CudaToCpuMode()
        # Stays entered for the life of the process: every later torch call is redirected.
        mode.__enter__()
        _INSTALLED = True


def installed() -> bool:
    return _INSTALLED
