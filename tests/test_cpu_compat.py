"""The CPU redirect layer (megatron_vlm.runtime.cpu_compat): only device arguments that name
CUDA are rewritten, everything else behaves as plain torch, uncovered CUDA requests fail loudly,
and on a host with CUDA the process becomes a CPU process.

``install()`` changes the whole process, so the checks run in fresh interpreters: this file,
run as a script with ``cpu-host`` or ``cuda-host``, performs them and prints one JSON line of
results that the tests below read.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

from distributed import REPO, last_json


# Expressions that must give what plain torch gives (t: float32 [1, 2, 3], t2: int32 tensor).
PLAIN = {
    "new_zeros(2, 3)": lambda t, t2: t.new_zeros(2, 3),
    "zeros(2, 3)": lambda t, t2: torch.zeros(2, 3),
    "new_full((2,), 1.0)": lambda t, t2: t.new_full((2,), 1.0),
    "new_ones(4)": lambda t, t2: t.new_ones(4),
    "new_empty(2, 3)": lambda t, t2: t.new_empty(2, 3),
    "new_tensor([4, 5])": lambda t, t2: t.new_tensor([4, 5]),
    "full((2, 2), 3.0)": lambda t, t2: torch.full((2, 2), 3.0),
    "arange(5)": lambda t, t2: torch.arange(5),
    "to(float64)": lambda t, t2: t.to(torch.float64),
    "to(t2)": lambda t, t2: t.to(t2),
    "to('cpu', float64)": lambda t, t2: t.to("cpu", torch.float64),
    "to(float16, False, True)": lambda t, t2: t.to(torch.float16, False, True),
}

# CUDA requests the layer redirects: each must land on the CPU.
REDIRECTED = {
    "empty(3, device='cuda')": lambda t: torch.empty(3, device="cuda"),
    "zeros(2, device=device('cuda', 0))": lambda t: torch.zeros(2, device=torch.device("cuda", 0)),
    "ones(2, device=0)": lambda t: torch.ones(2, device=0),
    "tensor([1], device='cuda:0')": lambda t: torch.tensor([1.0], device="cuda:0"),
    "zeros_like(t, device='cuda')": lambda t: torch.zeros_like(t, device="cuda"),
    "to('cuda')": lambda t: t.to("cuda"),
    "to(device('cuda'))": lambda t: t.to(torch.device("cuda")),
    "to(0, float16)": lambda t: t.to(0, torch.float16),
    "to(device=0)": lambda t: t.to(device=0),
    "cuda()": lambda t: t.cuda(),
    "new_empty(2, device='cuda')": lambda t: t.new_empty(2, device="cuda"),
    "new_zeros((2,), device=0)": lambda t: t.new_zeros((2,), device=0),
    "Linear(2, 2, device='cuda').weight": lambda t: torch.nn.Linear(2, 2, device="cuda").weight,
    "Linear(2, 2).to('cuda').weight": lambda t: torch.nn.Linear(2, 2).to("cuda").weight,
}


def _describe(x: torch.Tensor, values: bool = True) -> dict:
    out = {"shape": list(x.shape), "dtype": str(x.dtype), "device": str(x.device)}
    if values:
        out["values"] = x.tolist()
    return out


def _outcome(fn):
    """fn()'s result, or the error it raised, so that one broken case fails only its test."""
    try:
        return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _to_script(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(3) + x.to(torch.float64) + torch.arange(3)


def _uncovered(fn) -> str:
    """The error a CUDA request the layer leaves alone raises ('' when none: a silent path)."""
    try:
        fn()
    except BaseException as exc:  # torch raises AssertionError or RuntimeError here
        return f"{type(exc).__name__}: {exc}"
    return ""


def _rng_checks() -> dict:
    from megatron.core.tensor_parallel import random as mcore_random

    state = torch.cuda.get_rng_state()
    out = {"state_is_cpu_state": torch.equal(state, torch.get_rng_state())}
    first = torch.rand(4)
    torch.cuda.set_rng_state(state)
    out["round_trip"] = torch.equal(first, torch.rand(4))
    out["megatron_state_is_cpu_state"] = torch.equal(mcore_random._get_cuda_rng_state(),
                                                     torch.get_rng_state())
    return out


def child_cpu_host() -> dict:
    from megatron_vlm.runtime import cpu_compat

    t = torch.tensor([1.0, 2.0, 3.0])
    t2 = torch.tensor([7], dtype=torch.int32)
    plain = {name: _describe(f(t, t2), "empty" not in name) for name, f in PLAIN.items()}
    assert not cpu_compat.installed() and not cpu_compat.patches()

    threads = [threading.Thread(target=cpu_compat.install) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    patched = len(cpu_compat.patches())
    cpu_compat.install()

    module = torch.nn.Linear(1, 1)
    return {
        "installed": cpu_compat.installed(),
        "patches_once": patched,
        "patches_after_second_install": len(cpu_compat.patches()),
        "cuda_available": torch.cuda.is_available(),
        "plain_expected": plain,
        "plain_got": {name: _outcome(lambda: _describe(f(t, t2), "empty" not in name))
                      for name, f in PLAIN.items()},
        "redirected": {name: _outcome(lambda: _describe(f(t), values=False))
                       for name, f in REDIRECTED.items()},
        "cuda_returns_receiver": _outcome(lambda: t.cuda() is t and module.cuda() is module),
        "to_cuda_values": _outcome(lambda: t.to("cuda").tolist()),
        "type": _outcome(lambda: [t.type(), torch.ones(1, dtype=torch.bfloat16).type(),
                                  str(t.type("torch.cuda.DoubleTensor").dtype),
                                  torch.ones(1, device="meta").type()]),
        "rng": _outcome(_rng_checks),
        "uncovered_generator": _uncovered(lambda: torch.Generator(device="cuda")),
        "uncovered_storage": _uncovered(lambda: torch.UntypedStorage(4, device="cuda")),
        "uncovered_device_properties": _uncovered(lambda: torch.cuda.get_device_properties(0)),
        "scripted": _outcome(lambda: torch.jit.script(_to_script)(t).tolist()),
        "device_context": _outcome(_device_context_devices),
    }


def _device_context_devices() -> list[str]:
    """Devices of factory outputs inside ``with torch.device("meta")`` (used to count a
    400M-parameter tower without allocating it), first used after install()."""
    with torch.device("meta"):
        return [str(torch.empty(3).device), str(torch.zeros(2, 2).device),
                str(torch.nn.Linear(4, 4).weight.device)]


def child_cuda_host() -> dict:
    """A host with CUDA, played on this CPU build: torch.cuda reports two devices until
    install() runs."""
    from megatron_vlm.runtime import cpu_compat

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_vlm").addHandler(handler)

    cpu_compat.install()
    return {
        "cuda_available": torch.cuda.is_available(),
        "accelerator_available": torch.accelerator.is_available(),
        "log": records,
        "redirected_device": str(torch.zeros(2, device="cuda").device),
        "uncovered_storage": _uncovered(lambda: torch.UntypedStorage(4, device="cuda")),
        "uncovered_unwrapped_factory": _uncovered(
            lambda: torch._C._VariableFunctions.empty(2, device="cuda")),
    }


def _run_child(which: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, which], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return last_json(proc.stdout)


@pytest.fixture(scope="module")
def cpu_host() -> dict:
    return _run_child("cpu-host")


@pytest.fixture(scope="module")
def cuda_host() -> dict:
    return _run_child("cuda-host")


@pytest.mark.parametrize("name", list(PLAIN))
def test_calls_without_a_cuda_device_behave_as_plain_torch(cpu_host, name):
    assert cpu_host["plain_got"][name] == cpu_host["plain_expected"][name]


@pytest.mark.parametrize("name", list(REDIRECTED))
def test_cuda_device_arguments_land_on_the_cpu(cpu_host, name):
    got = cpu_host["redirected"][name]
    assert got.get("device") == "cpu", got


def test_redirected_calls_keep_their_shape_dtype_and_values(cpu_host):
    got = cpu_host["redirected"]
    assert got["zeros(2, device=device('cuda', 0))"]["shape"] == [2]
    assert got["to(0, float16)"]["dtype"] == "torch.float16"
    assert got["new_zeros((2,), device=0)"]["dtype"] == "torch.float32"
    assert cpu_host["to_cuda_values"] == [1.0, 2.0, 3.0]
    assert cpu_host["cuda_returns_receiver"] is True


def test_type_reports_cuda_names_for_cpu_tensors(cpu_host):
    assert cpu_host["type"] == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor",
                                "torch.float64", "torch.meta.FloatTensor"]


def test_cuda_rng_state_is_the_cpu_generator(cpu_host):
    assert cpu_host["rng"] == {"state_is_cpu_state": True, "round_trip": True,
                               "megatron_state_is_cpu_state": True}


def test_uncovered_cuda_requests_fail_loudly(cpu_host):
    # torch.Generator is left uncovered on purpose: wrapping the class would break isinstance.
    assert "CUDA" in cpu_host["uncovered_generator"]
    assert "Torch not compiled with CUDA enabled" in cpu_host["uncovered_storage"]
    assert "Torch not compiled with CUDA enabled" in cpu_host["uncovered_device_properties"]


def test_install_is_idempotent_and_thread_safe(cpu_host):
    assert cpu_host["installed"] and not cpu_host["cuda_available"]
    assert cpu_host["patches_once"] > 0
    assert cpu_host["patches_after_second_install"] == cpu_host["patches_once"]


def test_torch_device_context_still_places_factories(cpu_host):
    assert cpu_host["device_context"] == ["meta", "meta", "meta"]


def test_torchscript_still_compiles_torch_factories(cpu_host):
    assert cpu_host["scripted"] == [1.0, 3.0, 5.0]


def test_on_a_cuda_host_the_process_becomes_a_cpu_process(cuda_host):
    assert cuda_host["cuda_available"] is False
    assert cuda_host["accelerator_available"] is False
    assert any("CPU mode on a host with 2 CUDA device(s)" in line and "is_available()" in line
               for line in cuda_host["log"]), cuda_host["log"]
    assert cuda_host["redirected_device"] == "cpu"


def test_on_a_cuda_host_uncovered_requests_are_refused(cuda_host):
    # Without the refusal these would reach a real GPU there; on this CPU build they would
    # raise torch's "not compiled" error instead of the layer's.
    for key in ("uncovered_storage", "uncovered_unwrapped_factory"):
        assert "CPU redirect layer does not cover" in cuda_host[key], cuda_host[key]


if __name__ == "__main__":
    print(json.dumps({"cpu-host": child_cpu_host, "cuda-host": child_cuda_host}[sys.argv[1]]()))
