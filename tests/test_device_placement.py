"""Device placement without a GPU: the step's tensors follow the model's device.

A CPU test cannot see a tensor left on the wrong device when everything is on the CPU. Here the
model and the batch go to the ``meta`` device instead: any tensor the forward pass or the loss
bookkeeping creates on the CPU (a missing ``device=``) then fails with a device mismatch or
comes out on the CPU, and any host synchronisation (``.item()``, ``bool(tensor)``,
``.tolist()``) fails because meta tensors hold no data.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config import load_config
from megatron_vlm.data.batch import random_batch
from megatron_vlm.training.device_batches import DeviceMicroBatches, to_device

META = torch.device("meta")


def _meta_model(cfg):
    from megatron_vlm.model.build import build_model

    model = build_model(cfg).to(META)
    # megatron keeps the rotary frequencies as a plain attribute made on the build device (the
    # GPU on CUDA runs, where layers are not built on the CPU); .to() does not move it.
    rotary = model.language_model.rotary_pos_emb
    rotary.inv_freq = rotary.inv_freq.to(META)
    return model


def _host_batch(cfg, rows=4, documents=False):
    enc = cfg.model.encoder
    batch = random_batch(torch.Generator().manual_seed(3), rows, cfg.train.seq_length,
                         cfg.model.decoder.vocab_size, enc.num_image_tokens, enc.embed_dim)
    batch["source_ids"] = torch.arange(rows) % 3
    if documents:
        from megatron_vlm.data.batch import document_boundaries

        segments = torch.zeros(rows, cfg.train.seq_length, dtype=torch.int32)
        segments[:, cfg.train.seq_length // 2:] = 1
        segments[0, -3:] = -1
        batch["segment_ids"] = segments
        batch["cu_seqlens"], batch["max_seqlen"] = document_boundaries(segments)
    return batch


@pytest.mark.parametrize("documents,text_only", [(False, False), (True, False), (False, True)])
def test_forward_and_loss_bookkeeping_stay_on_the_model_device(runtime, documents, text_only):
    from megatron_vlm.training.step import forward_step

    cfg = load_config("tiny")
    model = _meta_model(cfg)
    host = _host_batch(cfg, documents=documents)
    if text_only:
        host["image_mask"] = torch.zeros_like(host["image_mask"])
        del host["image_embeddings"]
    batch = to_device(host, META)
    assert all(v.device == META for v in batch.values() if isinstance(v, torch.Tensor))
    output, loss_func = forward_step(iter([batch]), model)
    assert output.device == META and output.shape == batch["tokens"].shape
    loss_sum, num_tokens, report = loss_func(output)
    assert loss_sum.device == META and num_tokens.device == META
    assert report["loss by source"].device == META
    # without source ids every row counts as the first source, on the same device
    batch.pop("source_ids")
    _, loss_func = forward_step(iter([batch]), model)
    assert loss_func(output)[2]["loss by source"].device == META


def test_online_encoder_runs_on_the_model_device(runtime):
    from megatron_vlm.training.step import forward_step

    cfg = load_config("tiny", ["model.encoder.mode=online"])
    model = _meta_model(cfg)
    enc = cfg.model.encoder
    host = random_batch(torch.Generator().manual_seed(4), 2, cfg.train.seq_length,
                        cfg.model.decoder.vocab_size, enc.num_image_tokens, enc.embed_dim,
                        image_size=enc.image_size)
    output, loss_func = forward_step(iter([to_device(host, META)]), model)
    assert output.device == META and loss_func(output)[0].device == META


def test_step_loss_reduction_is_made_on_the_runtime_device(runtime, monkeypatch):
    from megatron_vlm.training import step

    monkeypatch.setattr(step, "current_device", lambda: META)
    per_step = [{"loss by source": torch.ones(3, 2, device=META)} for _ in range(2)]
    total = step.reduce_losses(per_step)
    assert total.device == META and total.shape == (3, 2)
    # a pipeline stage without losses contributes zeros made on the runtime device
    monkeypatch.setattr(step.parallel_state, "is_pipeline_last_stage", lambda: False)
    assert step.reduce_losses([]).device == META


def test_device_micro_batches_hand_over_every_batch_with_its_values():
    batches = [{"tokens": torch.full((2, 3), i), "max_seqlen": 3 + i} for i in range(3)]
    seen = list(DeviceMicroBatches(batches, torch.device("cpu")))
    assert [b["max_seqlen"] for b in seen] == [3, 4, 5]
    assert [int(b["tokens"][0, 0]) for b in seen] == [0, 1, 2]
    moved = list(DeviceMicroBatches(batches, META))
    assert all(b["tokens"].device == META and isinstance(b["max_seqlen"], int) for b in moved)
    assert list(DeviceMicroBatches([], torch.device("cpu"))) == []


def test_a_single_process_run_takes_a_free_port_beside_another_run(repo_root):
    """Without a launcher's MASTER_PORT a run of one process picks a free port, so it starts
    while another run (here: a socket on the old fixed default) holds one."""
    import os
    import socket
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(repo_root))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    script = ("from megatron_vlm.runtime import initialize, shutdown\n"
              "initialize(1, 1, device='cpu')\nshutdown()\nprint('started')")
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 29517))
        busy.listen(1)
        proc = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("started")
