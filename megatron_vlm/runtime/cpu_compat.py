"""Lets megatron-core's CUDA-only paths run on the CPU over gloo (CPU mode).

megatron-core's DDP wrapper, optimizer, pipeline schedules, distributed checkpointing and RNG
tracker ask for CUDA devices, streams and generators in many places. Rather than re-implementing
those pieces, :func:`install` redirects the CUDA requests they make to the CPU, so that tests on
a CPU machine exercise the same megatron-core code a GPU cluster runs. The redirection is
targeted: only the torch entry points that take a device are wrapped, and only their device
arguments are rewritten.

* torch factory functions (``torch.empty``/``zeros``/``ones``/``full``/``tensor``/``arange``/
  ``rand*``/``*_like``/... , see ``_FACTORIES``) and ``Tensor.new_*`` turn a ``device=`` keyword
  that names CUDA into the CPU device;
* ``Tensor.to`` does the same for its ``device=`` keyword and for a device given as its first
  positional argument (``t.to("cuda")``, ``t.to(0, torch.float16)``); ``t.to(dtype)`` and
  ``t.to(other)`` are passed through untouched;
* a device "names CUDA" when it is a ``"cuda..."`` string, a ``torch.device`` of type cuda, or a
  bare ``int`` ordinal (megatron passes ``torch.cuda.current_device()`` around);
* ``Tensor.cuda`` / ``Module.cuda`` return their receiver unchanged;
* ``Tensor.type()`` reports ``torch.cuda.*`` names for CPU tensors (megatron checks
  ``param.type() == 'torch.cuda.FloatTensor'``);
* ``torch.cuda`` device, stream, event, memory and RNG helpers get CPU stand-ins; the CUDA RNG
  state that megatron's tracker forks is the CPU generator's state.

Any other CUDA request still reaches torch and fails loudly: on a CPU-only build with torch's
own "Torch not compiled with CUDA enabled"; on a host with CUDA, where :func:`install` also makes
``torch.cuda.is_available()`` return False, with the error of ``_refuse_cuda``.

Every replacement is recorded; :func:`patches` lists them (the overhead benchmark,
``bench/bench_cpu_compat.py``, times each against its original).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from typing import Callable, NamedTuple

import torch

logger = logging.getLogger("megatron_vlm")

_INSTALLED = False
_LOCK = threading.Lock()
_CPU = torch.device("cpu")

# torch.* functions with a ``device`` keyword (torch/_C/_VariableFunctions.pyi, torch 2.13).
# None of them takes the device positionally, so only the keyword is looked at.
_FACTORIES = (
    "arange", "as_tensor", "asarray", "bartlett_window", "blackman_window", "empty",
    "empty_like", "empty_permuted", "empty_strided", "eye", "from_file", "full", "full_like",
    "hamming_window", "hann_window", "kaiser_window", "linspace", "logspace", "normal", "ones",
    "ones_like", "rand", "rand_like", "randint", "randint_like", "randn", "randn_like",
    "randperm", "range", "scalar_tensor", "sparse_bsc_tensor", "sparse_bsr_tensor",
    "sparse_compressed_tensor", "sparse_coo_tensor", "sparse_csc_tensor", "sparse_csr_tensor",
    "tensor", "tril_indices", "triu_indices", "zeros", "zeros_like",
)
# Tensor methods whose device is keyword-only (``Tensor.to`` is handled on its own).
_TENSOR_NEW = ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_tensor",
               "new_zeros")

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


class Patch(NamedTuple):
    """One attribute :func:`install` replaced."""

    owner: object
    name: str
    original: object  # the attribute before install (None where there was none)
    replacement: object
    # True: ``replacement`` calls ``original`` with CUDA device arguments made CPU ones, so the
    # two can be timed on the same arguments. False: a stand-in that never calls the original.
    redirects: bool


_PATCHES: list[Patch] = []


def _names_cuda(device) -> bool:
    """True for a device argument that names CUDA: a "cuda..." string, a cuda torch.device or a
    bare int ordinal (not a bool). Exact class checks keep the common non-device case cheap."""
    cls = device.__class__
    if cls is torch.device:
        return device.type == "cuda"
    if cls is str:
        return device.startswith("cuda")
    return cls is int


# Called with (name, args, kwargs) for each CUDA request rewritten to the CPU, and for each
# torch.cuda.synchronize: how runtime/host_sync.py sees, on the CPU, what would wait for a GPU.
_REDIRECT_OBSERVERS: list[Callable] = []


def add_redirect_observer(observer: Callable) -> None:
    _REDIRECT_OBSERVERS.append(observer)


def remove_redirect_observer(observer: Callable) -> None:
    if observer in _REDIRECT_OBSERVERS:
        _REDIRECT_OBSERVERS.remove(observer)


def _keyword_redirect(original: Callable) -> Callable:
    """``original`` with a CUDA ``device=`` keyword replaced by the CPU device."""
    name = original.__name__

    @functools.wraps(original)
    def redirected(*args, **kwargs):
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _names_cuda(device):
                for observer in _REDIRECT_OBSERVERS:
                    observer(name, args, kwargs)
                kwargs["device"] = _CPU
        return original(*args, **kwargs)

    return redirected


def _synchronize(*args, **kwargs) -> None:
    """``torch.cuda.synchronize`` on the CPU: nothing to wait for, but observers are told."""
    for observer in _REDIRECT_OBSERVERS:
        observer("synchronize", args, kwargs)


def _to_redirect(original: Callable) -> Callable:
    """``Tensor.to`` whose device, as keyword or as first positional argument, is made the CPU
    when it names CUDA. The first positional argument of ``to`` is a device, a dtype or a
    tensor; only the device form is rewritten."""

    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and _names_cuda(args[0]):
            args = (_CPU,) + args[1:]
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _names_cuda(device):
                kwargs["device"] = _CPU
        return original(self, *args, **kwargs)

    return to


def _type_reporting_cuda(original: Callable) -> Callable:
    """``Tensor.type`` that names CPU tensors ``torch.cuda.*`` and accepts those names back."""

    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = _TYPE_NAMES.get(self.dtype) if self.is_cpu else None
            return name if name is not None else original(self)
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = "torch." + dtype[len("torch.cuda."):]
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _returns_receiver() -> Callable:
    """A ``Tensor.cuda`` / ``Module.cuda`` stand-in: the receiver already lives on the CPU."""

    def cuda(self, *args, **kwargs):
        return self

    return cuda


class _Stream:
    """Stand-in for torch.cuda.Stream: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        _synchronize()

    def query(self):
        return True

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = _Stream()
_NULL_CONTEXT = contextlib.nullcontext()


class _Event:
    """Stand-in for torch.cuda.Event, timing with the host clock."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        _synchronize()

    def query(self):
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._time - self._time) * 1000.0


def _cpu_get_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    # megatron's RNG tracker seeds "the CUDA generator" to derive per-TP-rank streams; here
    # that generator is the CPU one.
    torch.default_generator.manual_seed(int(seed))


def _constant(value) -> Callable:
    """A new function returning ``value`` for any arguments. Each stand-in is its own object:
    torch._dynamo keys its tracing rules by function identity and refuses one object under two
    names."""

    def stand_in(*args, **kwargs):
        return value

    return stand_in


def _refuse_cuda(*args, **kwargs):
    """``torch.cuda._lazy_init`` on a CUDA host in CPU mode: every CUDA request that reaches
    torch's device initialisation (factory functions, storages, torch.cuda queries) stops here
    instead of silently placing a tensor on a GPU."""
    raise RuntimeError(
        "CPU mode (megatron_vlm.runtime.cpu_compat is installed): a CUDA device was requested "
        "through a path the CPU redirect layer does not cover; this process computes on the CPU")


def _set(owner, name: str, replacement, redirects: bool) -> None:
    _PATCHES.append(Patch(owner, name, getattr(owner, name, None), replacement, redirects))
    setattr(owner, name, replacement)


def _patch_device_arguments() -> None:
    from torch.jit import _builtins as jit_builtins

    for name in _FACTORIES:
        original = getattr(torch, name, None)
        if original is not None:  # absent in older torch: nothing can call it there either
            redirected = _keyword_redirect(original)
            _set(torch, name, redirected, True)
            # TorchScript maps torch functions to aten ops by object identity and cannot
            # compile a Python wrapper; scripted code gets the plain op (a CUDA device there
            # still fails loudly on a CPU build).
            jit_builtins._register_builtin(redirected, "aten::" + name)
    for name in _TENSOR_NEW:
        _set(torch.Tensor, name, _keyword_redirect(getattr(torch.Tensor, name)), True)
    _set(torch.Tensor, "to", _to_redirect(torch.Tensor.to), True)


def _patch_tensor_methods() -> None:
    _set(torch.Tensor, "type", _type_reporting_cuda(torch.Tensor.type), True)
    _set(torch.Tensor, "cuda", _returns_receiver(), False)
    _set(torch.nn.Module, "cuda", _returns_receiver(), False)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    stand_ins = {
        "current_device": _constant(0),
        "device_count": lambda: 1,
        "set_device": _constant(None),
        "synchronize": _synchronize,
        "Stream": _Stream,
        "Event": _Event,
        "stream": lambda stream=None: _NULL_CONTEXT,
        "current_stream": lambda *a, **k: _DEFAULT_STREAM,
        "default_stream": lambda *a, **k: _DEFAULT_STREAM,
        "manual_seed": _cpu_manual_seed,
        # torch.manual_seed itself calls cuda.manual_seed_all, which must not recurse.
        "manual_seed_all": _constant(None),
        "get_rng_state": _cpu_get_rng_state,
        "set_rng_state": _cpu_set_rng_state,
        "get_rng_state_all": lambda: [torch.get_rng_state()],
        "set_rng_state_all": lambda states: torch.set_rng_state(states[0]),
        "memory_allocated": _constant(0),
        "max_memory_allocated": _constant(0),
        "memory_reserved": _constant(0),
        "max_memory_reserved": _constant(0),
        "reset_peak_memory_stats": _constant(None),
        "empty_cache": _constant(None),
    }
    for name, stand_in in stand_ins.items():
        _set(cuda, name, stand_in, False)
    for name in ("manual_seed", "get_rng_state", "set_rng_state"):
        _set(cuda.random, name, stand_ins[name], False)
    _set(cuda.nvtx, "range_push", _constant(None), False)
    _set(cuda.nvtx, "range_pop", _constant(None), False)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    _set(mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state, False)
    _set(mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state, False)


def _turn_off_cuda() -> None:
    """On a host with CUDA: this process becomes a CPU process."""
    count = torch.cuda.device_count()
    initialized = torch.cuda.is_initialized()
    _set(torch.cuda, "is_available", lambda: False, False)
    _set(torch.cuda, "_lazy_init", _refuse_cuda, False)
    # torch.accelerator answers from the C++ side; code choosing a device through it must see
    # a CPU-only process too.
    _set(torch.accelerator, "is_available", lambda: False, False)
    _set(torch.accelerator, "current_accelerator", lambda check_available=False: None, False)
    _set(torch.accelerator, "device_count", lambda: 0, False)
    logger.warning("CPU mode on a host with %d CUDA device(s): torch.cuda.is_available() returns "
                   "False from now on in this process, and CUDA requests are redirected to the "
                   "CPU or refused", count)
    if initialized:
        # torch initialises CUDA once; requests the layer does not redirect can no longer be
        # refused, and would place tensors on a GPU.
        logger.warning("CUDA was initialized in this process before CPU mode was installed; "
                       "CUDA requests the redirect layer does not cover are not refused")


def install() -> None:
    """Installs the CPU redirection for the rest of the process; idempotent and thread-safe.

    Called by the runtime when a run asks for CPU mode. On a host with CUDA it also makes
    ``torch.cuda.is_available()`` return False and refuses CUDA requests it does not redirect.
    """
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        # torch._dynamo builds its table of torch functions (by object identity) on import;
        # it must see the originals, which it knows how to trace (megatron imports it anyway).
        import torch._dynamo  # noqa: F401
        # torch's device context (``with torch.device("meta"):``) recognizes factories by
        # object identity from a table it builds once and caches: build it from the originals
        # now, or factories called inside such a context would ignore it.
        from torch.utils._device import _device_constructors

        _device_constructors()

        if torch.cuda.is_available():
            _turn_off_cuda()
        _patch_torch_cuda()
        _patch_device_arguments()
        _patch_tensor_methods()
        _patch_megatron_rng()
        _INSTALLED = True


def installed() -> bool:
    """True once :func:`install` ran in this process."""
    return _INSTALLED


def patches() -> tuple[Patch, ...]:
    """Every attribute :func:`install` replaced, in order (empty before install)."""
    return tuple(_PATCHES)
