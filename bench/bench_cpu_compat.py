"""Cost of the CPU redirect layer (megatron_vlm.runtime.cpu_compat) per tiny train step.

    python bench/bench_cpu_compat.py [--steps 12] [--warmup 3] [--set train.seq_length=64 ...]

A megatron-core train step cannot run on a CPU without some redirection of its CUDA requests, so
"the same step without the layer" is not something one can time directly. Instead, in one
process (the tiny recipe, random data, TP=PP=DP=1, OMP_NUM_THREADS as the caller set it):

(a) the median wall time of a train step with the layer installed, as CPU mode runs it;
(b) the median wall time of the same step with the previous design, a process-wide
    ``TorchFunctionMode`` that intercepts every torch call, entered on top (``_OldGlobalMode``,
    kept here for this comparison only); (a) and (b) steps alternate, after warmup steps, and
    the ratio is also given as the median over adjacent (a, b) pairs and in process CPU time,
    which other processes on the host disturb less;
(c) the layer's own cost per step: one extra step (batch making included) is run with every
    replacement the layer installed (``cpu_compat.patches()``) behind a counter that also keeps
    one sample call per distinct call form (replacement, argument types, keywords, whether a
    device names CUDA). Each sample is then timed against the original torch function on the
    arguments the replacement hands it (a CUDA device made the CPU), interleaved repeats, best
    of each; the per-call difference times the call count, summed over forms, is (c).
    Stand-ins with no usable original (``torch.cuda.synchronize``, ``Tensor.cuda``, ...) count
    with their whole call time, and a negative difference (timer noise) counts as zero, so (c)
    is an upper estimate.

The step without the layer would take (a) - (c); the printed overhead ratio is (c) / ((a) - (c)).
The ratio (b) / (a) shows what the previous design cost on the same step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode


class _OldGlobalMode(TorchFunctionMode):
    """The previous design of the layer: every torch call of the process passes through here
    (it also rewrote integer positional arguments of ``new_*`` as devices, the bug the targeted
    layer fixed; the tiny step makes no such call)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=torch.device("cpu"))
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            args = tuple(torch.device("cpu") if i > 0 and _names_cuda(a) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class _CountingMode(TorchFunctionMode):
    """Counts the torch calls a process-wide mode would intercept."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _names_cuda(device) -> bool:
    """The previous design's test for a CUDA device argument (used by ``_OldGlobalMode``)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _call_form(name: str, args, kwargs) -> tuple:
    """What distinguishes the work one call through a replacement does: argument types,
    keywords, and whether its device argument names CUDA (and gets rewritten)."""
    from megatron_vlm.runtime.cpu_compat import _names_cuda as names_cuda

    device = kwargs.get("device")
    if device is None and name == "to" and len(args) > 1:
        device = args[1]
    return (tuple(type(a).__name__ for a in args), tuple(sorted(kwargs)),
            device is not None and names_cuda(device))


def _count_layer_calls(run_step) -> tuple[dict, dict]:
    """Runs one step with every replacement behind a counter; returns
    ({(patch index, form): count}, {(patch index, form): (args, kwargs)})."""
    from megatron_vlm.runtime import cpu_compat

    counts: Counter = Counter()
    samples: dict = {}

    def counting(index, name, replacement):
        def counted(*args, **kwargs):
            key = (index, _call_form(name, args, kwargs))
            counts[key] += 1
            samples.setdefault(key, (args, dict(kwargs)))
            return replacement(*args, **kwargs)
        return counted

    patches = cpu_compat.patches()
    for i, p in enumerate(patches):
        if isinstance(p.replacement, type):
            continue  # stand-in classes (Stream, Event) stay classes: isinstance must hold
        setattr(p.owner, p.name, counting(i, p.name, p.replacement))
    try:
        run_step()
    finally:
        for p in patches:
            setattr(p.owner, p.name, p.replacement)
    return dict(counts), samples


def _best_ns(fn, args, kwargs, number: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(number):
        fn(*args, **kwargs)
    return (time.perf_counter_ns() - start) / number


def _as_cpu_call(name: str, args, kwargs) -> tuple:
    """The arguments the original receives from the replacement: CUDA devices made the CPU."""
    from megatron_vlm.runtime.cpu_compat import _names_cuda as names_cuda

    cpu = torch.device("cpu")
    kwargs = dict(kwargs)
    if "device" in kwargs and kwargs["device"] is not None and names_cuda(kwargs["device"]):
        kwargs["device"] = cpu
    if name == "to" and len(args) > 1 and names_cuda(args[1]):
        args = (args[0], cpu) + tuple(args[2:])
    return args, kwargs


def _per_call_ns(patch, args, kwargs, repeats: int = 7) -> float:
    """Extra nanoseconds one call through ``patch.replacement`` costs over the original on the
    arguments the original gets from it (the whole call for stand-ins)."""
    calls = [(patch.replacement, args, kwargs)]
    if patch.redirects:
        calls.append((patch.original, *_as_cpu_call(patch.name, args, kwargs)))
    for fn, a, k in calls:
        fn(*a, **dict(k))  # warm
    once = max(1.0, _best_ns(patch.replacement, args, dict(kwargs), 1))
    number = max(1, min(20_000, int(2e6 / once)))  # about 2 ms per timed batch
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for j, (fn, a, k) in enumerate(calls):
            best[j] = min(best[j], _best_ns(fn, a, dict(k), number))
    return best[0] if len(best) == 1 else max(0.0, best[0] - best[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for the tiny recipe")
    args = parser.parse_args()

    from megatron_vlm.config import load_config
    from megatron_vlm.model.build import build_model
    from megatron_vlm.runtime import cpu_compat, initialize, shutdown
    from megatron_vlm.training.loop import make_batches
    from megatron_vlm.training.step import setup_training, train_step

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cfg = load_config("tiny", ["data.kind=random", *args.set])
    initialize(1, 1, seed=cfg.seed, device="cpu")
    if not cpu_compat.installed():
        raise SystemExit("the runtime did not install the CPU redirect layer (a CUDA host?); "
                         "this benchmark measures CPU mode")
    state = setup_training(build_model(cfg), cfg)
    next_step, _ = make_batches(cfg, 0, 1, None)

    def run_step():
        """(wall seconds, process CPU seconds) of one train step, the batch made beforehand."""
        microbatches = next_step()
        wall, cpu = time.perf_counter(), time.process_time()
        train_step(state, iter(microbatches), len(microbatches), cfg)
        return time.perf_counter() - wall, time.process_time() - cpu

    for _ in range(args.warmup):
        run_step()
    with_layer, with_old_mode = [], []
    for _ in range(args.steps):
        with_layer.append(run_step())
        with _OldGlobalMode():
            with_old_mode.append(run_step())
    a = statistics.median(w for w, _ in with_layer)
    b = statistics.median(w for w, _ in with_old_mode)
    # Other processes on the host slow single steps; CPU time and the ratio of each adjacent
    # pair of steps are less sensitive to that than wall-clock medians.
    a_cpu = statistics.median(c for _, c in with_layer)
    b_cpu = statistics.median(c for _, c in with_old_mode)
    pair_ratio = statistics.median(y[0] / x[0] for x, y in zip(with_layer, with_old_mode))

    counter = _CountingMode()
    with counter:
        run_step()
    counts, samples = _count_layer_calls(run_step)
    patches = cpu_compat.patches()
    rng = torch.get_rng_state()  # replays of RNG stand-ins must not leak into later work
    by_name: Counter = Counter()
    cost_ns: Counter = Counter()
    for key, count in counts.items():
        patch = patches[key[0]]
        per_call = _per_call_ns(patch, *samples[key])
        name = f"{getattr(patch.owner, '__name__', type(patch.owner).__name__)}.{patch.name}"
        by_name[name] += count
        cost_ns[name] += count * per_call
    torch.set_rng_state(rng)
    c = sum(cost_ns.values()) / 1e9
    shutdown()

    print(f"tiny train step, {cfg.train.global_batch_size // cfg.train.micro_batch_size} "
          f"micro-batches of {cfg.train.micro_batch_size} x {cfg.train.seq_length} tokens, "
          f"torch threads {torch.get_num_threads()}; medians of {args.steps} steps; host load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other processes skew (a)"
          f" and (b))")
    print(f"  (a) step with the layer:                  {a * 1e3:9.2f} ms   (CPU time "
          f"{a_cpu * 1e3:.2f} ms)")
    print(f"  (b) step with the old global mode on top: {b * 1e3:9.2f} ms   (b)/(a) = {b / a:.3f}"
          f" (median of adjacent pairs {pair_ratio:.3f}; CPU time {b_cpu / a_cpu:.3f});"
          f" {counter.calls} torch calls per step pass through such a mode")
    print(f"  (c) the layer's own cost per step:        {c * 1e3:9.4f} ms   "
          f"({sum(by_name.values())} calls into the layer)")
    print(f"  overhead of the layer: (c)/((a)-(c)) = {100 * c / (a - c):.3f}% of the step "
          f"without it")
    for name, count in by_name.most_common():
        print(f"    {name:32s} {count:6d} calls  {cost_ns[name] / 1e3:9.1f} us")
    print(json.dumps({"step_ms": round(a * 1e3, 3), "old_mode_step_ms": round(b * 1e3, 3),
                      "old_mode_ratio": round(b / a, 4),
                      "old_mode_pair_ratio": round(pair_ratio, 4),
                      "old_mode_cpu_ratio": round(b_cpu / a_cpu, 4),
                      "layer_ms_per_step": round(c * 1e3, 5),
                      "layer_calls_per_step": sum(by_name.values()),
                      "overhead_ratio": round(c / (a - c), 6)}))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
