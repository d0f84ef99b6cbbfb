"""A two-host job on this machine (issue 12; docs/operations.md has the commands).

Each "host" is a network namespace of its own, the two joined by a veth pair, so the job's
traffic (rendezvous, store, gloo) really crosses from one address to another; where this
process may not create namespaces (it needs CAP_NET_ADMIN), the hosts are two loopback
addresses instead. On each host torchrun runs one worker with c10d rendezvous (DP=2 across the
hosts). The job trains, checkpoints, resumes from the middle, and must reproduce the losses of
the same job on one host. About a minute and a half on two CPU cores: ``slow``.

    pytest -m slow tests/test_multihost.py
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from distributed import (MARKER, REPO, free_port, metrics_by_step, run_env, torchrun,
                         wait_until_none_marked)

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 6, 3
TRAIN = ["--recipe", "tiny", "data.kind=random", f"train.train_iters={STEPS}",
         f"checkpoint.save_interval={SAVE_AT}"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_hosts():
    """Yields two hosts, each (command prefix, address, gloo interface): network namespaces
    where they can be made, else two loopback addresses."""
    tag = f"{os.getpid() % 100000}"
    names, links = [f"mvlm{tag}a", f"mvlm{tag}b"], [f"mv{tag}a", f"mv{tag}b"]
    made = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for k, (name, link) in enumerate(zip(names, links)):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"10.77.0.{k + 1}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        hosts = [(["ip", "netns", "exec", name], f"10.77.0.{k + 1}", link)
                 for k, (name, link) in enumerate(zip(names, links))]
    except (OSError, subprocess.CalledProcessError):  # no `ip`, or not permitted
        hosts = [([], "127.0.0.1", "lo"), ([], "127.0.0.2", "lo")]
    try:
        yield hosts
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_on_two_hosts(hosts, args: list[str], token: str) -> list[str]:
    """Runs the training on both hosts at once; returns each host's output."""
    endpoint = f"{hosts[0][1]}:{free_port()}"
    procs = []
    for k, (prefix, address, interface) in enumerate(hosts):
        cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
               "--rdzv_id", token, "--rdzv_conf", f"is_host={int(k == 0)}",
               "--local-addr", address, "pretrain_vlm.py", *args]
        env = run_env(**{MARKER: token, "GLOO_SOCKET_IFNAME": interface})
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        left = wait_until_none_marked(token, 10)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert left == {}, left
    return outputs


def test_two_host_job_trains_checkpoints_and_resumes_as_one_host_does(tmp_path):
    one_host = torchrun("pretrain_vlm.py", [*TRAIN, f"output_dir={tmp_path / 'one'}"], nproc=2,
                        module=False, timeout=600)
    assert one_host.returncode == 0, one_host.stderr[-3000:]
    out = tmp_path / "two"
    with two_hosts() as hosts:
        first = run_on_two_hosts(hosts, [*TRAIN, f"output_dir={out}"], uuid.uuid4().hex)
        assert "world 2 (TP=1 PP=1 DP=2)" in first[0]
        # Interrupted after the middle checkpoint: the last one never happened.
        shutil.rmtree(out / "checkpoints" / f"step_{STEPS:07d}")
        (out / "checkpoints" / "latest").write_text(f"step_{SAVE_AT:07d}")
        second = run_on_two_hosts(hosts, [*TRAIN, f"output_dir={out}"], uuid.uuid4().hex)
    assert f"at step {SAVE_AT}" in second[0]  # "resumed from ... at step 3"
    expected = {s: m["loss"] for s, m in metrics_by_step(tmp_path / "one").items()}
    got = {s: m["loss"] for s, m in metrics_by_step(out).items()}  # resumed steps win
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(expected, rel=1e-5)
