"""Process groups and megatron parallel state, on GPU (NCCL) or on CPU (gloo).

This is the one place where the parallel layout is applied: :func:`initialize` creates the
torch.distributed process group, picks the device mode (and, on a host without CUDA, installs
the CPU compatibility layer so megatron-core's CUDA paths run on the CPU), then builds
megatron-core's model-parallel groups.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("megatron_vlm")
_MODE_LOGGED = False  # the device-mode line is printed once per process
_DEVICE: Optional[torch.device] = None  # set by init_process_group_only


@dataclass(frozen=True)
class RuntimeInfo:
    """What :func:`initialize` set up."""

    device: torch.device
    backend: str
    world_size: int
    rank: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    cpu_mode: bool


def has_transformer_engine() -> bool:
    """True when Transformer Engine imports and the process computes on CUDA."""
    if not torch.cuda.is_available() or _cpu_mode_installed():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises several error types when its extension is absent
        return False
    return True


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


NO_CUDA = ("parallel.device=cuda but no CUDA device is visible; was the container started with "
           "--gpus (or CUDA_VISIBLE_DEVICES set to nothing)? For CPU mode set parallel.device=cpu")


def resolve_device(device: Optional[str]) -> str:
    """'cuda' or 'cpu' for a ``parallel.device`` value; ``None`` (tests and tools that take no
    config) means CUDA where it is visible. 'cuda' without a visible GPU is a user error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() and not _cpu_mode_installed() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"parallel.device={device!r} must be 'cuda' or 'cpu'")
    if device == "cuda" and (_cpu_mode_installed() or not torch.cuda.is_available()):
        raise ValueError(NO_CUDA)
    return device


def _cpu_mode_installed() -> bool:
    from megatron_vlm.runtime import cpu_compat

    return cpu_compat.installed()


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    backend: str = "auto",
    timeout_minutes: int = 10,
    seed: int = 1234,
    device: Optional[str] = None,
) -> RuntimeInfo:
    """Initializes torch.distributed and megatron parallel state for this process.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them;
    without them it runs as a single process. Every collective gets ``timeout_minutes`` so a
    hung peer fails the run instead of stalling it. ``device`` is ``parallel.device`` (see
    :func:`resolve_device`).
    """
    from megatron.core import parallel_state

    device, backend, rank, world_size = init_process_group_only(backend, timeout_minutes, device)
    cuda = device.type == "cuda"
    if world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel="
            f"{tensor_parallel * pipeline_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_seed(seed)
    data_parallel = world_size // (tensor_parallel * pipeline_parallel)
    info = RuntimeInfo(device, backend, world_size, rank, tensor_parallel, pipeline_parallel,
                       data_parallel, cpu_mode=not cuda)
    global _MODE_LOGGED
    if rank == 0 and not _MODE_LOGGED:
        _MODE_LOGGED = True
        if cuda:
            spec = "Transformer Engine" if has_transformer_engine() else "local (no TE)"
            logger.info("runtime: CUDA mode, %s backend, %s layer spec, world %d (TP=%d PP=%d DP=%d)",
                        backend, spec, world_size, tensor_parallel, pipeline_parallel, data_parallel)
        else:
            logger.info("runtime: CPU mode (parallel.device=cpu): %s backend, local megatron-core "
                        "spec with SDPA attention, CUDA calls redirected to the CPU; world %d "
                        "(TP=%d PP=%d DP=%d)", backend, world_size, tensor_parallel,
                        pipeline_parallel, data_parallel)
    return info


def init_process_group_only(backend: str = "auto", timeout_minutes: int = 10,
                            device: Optional[str] = None):
    """torch.distributed alone (no megatron groups); idempotent. Returns
    (device, backend, rank, world_size); ``device`` as in :func:`resolve_device`."""
    cuda = resolve_device(device) == "cuda"
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("parallel.backend=nccl needs CUDA; this run is in CPU mode (use gloo or "
                         "auto)")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    global _DEVICE
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_vlm.runtime import cpu_compat

        cpu_compat.install()
        device = torch.device("cpu")
    _DEVICE = device
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store = None
        if "MASTER_PORT" not in os.environ:
            # No launcher set one: a process of its own needs no agreed port, and a fixed one
            # would collide with any other run on this host (an evaluation beside a training).
            # The store binds port 0 itself: a port probed first and bound later could be
            # taken by another process in between.
            if world_size != 1:
                raise ValueError(f"WORLD_SIZE={world_size} but MASTER_PORT is not set: start "
                                 "the processes with torchrun")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, world_size=1, is_master=True,
                                  timeout=timeout)
            os.environ["MASTER_PORT"] = str(store.port)
            # Said only when asked (MEGATRON_VLM_LOG_LEVEL=DEBUG): a lone process's port
            # matters to no other process.
            logger.debug("runtime: MASTER_PORT not set; this process uses free port %s (set "
                         "MASTER_PORT to choose one)", store.port)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timeout, store=store)
    return device, backend, rank, world_size


def current_device() -> torch.device:
    """The device this process computes on (its CUDA device, or the CPU in CPU mode)."""
    if _DEVICE is None:
        raise RuntimeError("the runtime is not initialized: call megatron_vlm.runtime.initialize()")
    return _DEVICE


def set_seed(seed: int) -> None:
    """Seeds python, torch and megatron's model-parallel RNG tracker.

    Each pipeline stage gets its own offset (as megatron does) so stages don't draw identical
    dropout masks; tensor-parallel ranks share the default stream and differ in the tracker's.
    """
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed % (2**32))
    torch.manual_seed(stage_seed)
    mcore_tp.model_parallel_cuda_manual_seed(stage_seed)


def shutdown() -> None:
    """Tears down megatron parallel state and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# What gloo says when the process at the other end of a connection is gone (killed, crashed,
# or stopped by torchrun) or stopped answering; a store hosted by a dead rank says the same.
_PEER_GONE = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|Timed out waiting|"
                        r"Socket Timeout|Connection refused")
_PEER_ADDRESS = re.compile(r"\[([^\]]+)\]:(\d+)")


def describe_peer_failure(err: BaseException, last_step: Optional[int]) -> Optional[str]:
    """What happened, in words, when ``err`` was raised because another rank of the job
    stopped (its connection closed or timed out inside a collective); None for any other error.

    With two ranks the stopped one is the other; with more, gloo names only an address (and
    once the first survivor exits, others see *its* connection close), so the address is given.
    """
    if not isinstance(err, RuntimeError) or not dist.is_initialized():
        return None
    match = _PEER_GONE.search(str(err))
    frames = [(f.filename.replace(os.sep, "/"), f.name)
              for f in traceback.extract_tb(err.__traceback__)]
    # Raised by a collective (or megatron's wait on one), not by other code with such a text.
    communicating = any(part in path for path, _ in frames
                        for part in ("torch/distributed/", "megatron/core/"))
    if match is None or not communicating:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 2:
        who = f"rank {1 - rank}"
    else:
        address = _PEER_ADDRESS.search(str(err))
        who = "a peer rank" + (f" ({address.group(1)}:{address.group(2)})" if address else "")
    timed_out = "imed out" in match.group(0) or "Timeout" in match.group(0)
    how = "timed out waiting for it" if timed_out else "lost its connection to it"
    where = _collective_in(frames)
    when = f"after step {last_step}" if last_step is not None else "before the first step"
    return f"{who} stopped: rank {rank} {how} during {where} {when}"


def _collective_in(frames: list[tuple[str, str]]) -> str:
    """The collective an error came from, given its traceback's (path, function) frames: the
    innermost public torch.distributed function ("all_reduce"), else the innermost megatron
    function that waited on one ("a collective in start_grad_sync")."""
    public = [name for path, name in frames
              if "torch/distributed/distributed_c10d" in path and not name.startswith("_")]
    if public:
        return public[-1]
    callers = [name for path, name in frames if "/megatron" in path]
    return f"a collective in {callers[-1]}" if callers else "a collective"


class StepProgress:
    """An ``on_step`` callback that keeps the last step the run completed (None before its
    first), for the line that says where a run stopped."""

    def __init__(self):
        self.step: Optional[int] = None

    def __call__(self, step: int, _metrics) -> None:
        self.step = step


@contextlib.contextmanager
def peer_failures_in_one_line(prog: str, output_dir):
    """Around a training run: when another rank stops, this rank prints one line (which rank,
    during what, where the details are), writes the traceback to OUTPUT_DIR/logs/rankN.err and
    exits with status 1, instead of a screen of gloo tracebacks per rank. Yields the
    ``on_step`` callback that tells it the last completed step (a :class:`StepProgress`).
    Any other error passes."""
    progress = StepProgress()
    try:
        yield progress
    except RuntimeError as err:
        what = describe_peer_failure(err, progress.step)
        if what is None:
            raise
        details = Path(output_dir) / "logs" / f"rank{dist.get_rank()}.err"
        try:
            details.parent.mkdir(parents=True, exist_ok=True)
            details.write_text(f"{what}\n\n" + "".join(traceback.format_exception(err)))
        except OSError as write_err:  # the line matters more than the file
            details = f"(not written: {write_err}) {details}"
        print(f"{prog}: error: {what}; details in {details}", file=sys.stderr, flush=True)
        # Exit now, skipping interpreter teardown: torch's destructors block on the dead
        # peer's connection (until torchrun's SIGTERM). What needs saving is on disk; helpers
        # die with this process (megatron_vlm.lifecycle).
        logging.shutdown()
        sys.stdout.flush()
        os._exit(1)
