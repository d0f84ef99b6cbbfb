"""Parallel layouts against one process, through megatron-core's own DDP, optimizer, pipeline
schedule and distributed checkpoints, on the CPU over gloo (see megatron_vlm.check_parallel)."""

import pytest

from distributed import last_json, torchrun

# Each layout is one torchrun launch, about 30 s of wall time and 50 s of CPU on 2 cores, so a
# layout another one contains is not launched again: plain TP=2 and PP=2 are both in tp2_pp2
# (TP without sequence parallelism, the pipeline, the plain optimizer), and plain DP=2 is
# dp2_distributed_optimizer without the optimizer's sharding (the DP=2 checkpoint tests of
# test_checkpoint_layouts.py run it with both optimizers). `python -m megatron_vlm.check_parallel`
# still checks any layout by hand.
LAYOUTS = {  # name: (ranks, arguments)
    "dp2_distributed_optimizer": (2, ["--dp", "2", "--distributed-optimizer"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    # The unfrozen-encoder ablation: SigLIP tower in the graph, replicated over TP ranks.
    "tp2_online_trainable_encoder": (2, ["--tp", "2", "model.encoder.mode=online",
                                         "model.encoder.frozen=false"]),
    # Throughput features that change the communication: sequence parallelism (the image
    # splice before the scatter, norm gradients reduced over TP) and overlapped gradient
    # reduce-scatter / parameter all-gather.
    "tp2_sequence_parallel": (2, ["--tp", "2", "performance.sequence_parallel=true"]),
    # With micro-batches of one row every other one has no image, and megatron's overlapped
    # gradient reduction still needs a gradient from the projector and the trainable encoder.
    "dp2_overlap_text_only_microbatches": (2, ["--dp", "2", "--distributed-optimizer",
                                               "performance.overlap_grad_reduce=true",
                                               "performance.overlap_param_gather=true",
                                               "train.micro_batch_size=1",
                                               "model.encoder.mode=online",
                                               "model.encoder.frozen=false"]),
    # Documents as packed sequences (the TE form, here through the SDPA attention): the
    # pipeline passes [b * s, 1, h] activations; with sequence parallelism the packed sequence
    # is what gets scattered.
    "pp2_packed_documents": (2, ["--pp", "2", "data.caption_fill=text",
                                 "performance.packed_documents=true"]),
    "tp2_sequence_parallel_packed_documents": (2, ["--tp", "2", "data.caption_fill=text",
                                                   "performance.packed_documents=true",
                                                   "performance.sequence_parallel=true"]),
}


# One layout in the default tier (DP=2 with overlapped reduce through text-only micro-batches,
# the path most likely to break); the others in the slow tier (docs/testing.md).
FAST_LAYOUTS = {"dp2_overlap_text_only_microbatches"}


@pytest.mark.parametrize("name", [n if n in FAST_LAYOUTS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in LAYOUTS])
def test_layout_matches_single_process(name):
    ranks, args = LAYOUTS[name]
    proc = torchrun("megatron_vlm.check_parallel", args + ["--json"], nproc=ranks)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = last_json(proc.stdout)
    assert result["failed"] == []
    # Logits at equal weights, gradients of the first batch, per-step losses, and a checkpoint
    # saved at the layout and loaded at TP=PP=1: all within 1e-5 in fp32.
    for key in ("logits", "grads", "loss", "reload_logits"):
        assert result[key] <= 1e-5, (key, result[key])
    # After Adam steps: a TP split changes the order of matmul reductions, which Adam's
    # per-weight normalization amplifies for weights with near-zero gradients; DP and PP
    # change nothing but the gradient all-reduce.
    assert result["params"] <= (1e-4 if name.startswith("tp") else 1e-5)
    losses = result["layout_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(abs(a - b) <= 1e-5 for a, b in zip(losses, result["reference_losses"]))


@pytest.mark.slow  # a torchrun launch
def test_mismatched_world_size_is_a_clear_error():
    proc = torchrun("megatron_vlm.check_parallel", ["--tp", "2", "--dp", "2"], nproc=2)
    assert proc.returncode != 0
    assert "world size is 2" in proc.stdout + proc.stderr


@pytest.mark.slow  # a torchrun launch; the pp layouts check the same split
def test_pipeline_stages_split_layers_and_hold_projector_on_first_stage():
    proc = torchrun("tests/scripts/pp_layout.py", [], nproc=2, module=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("[")][-1]
    first, last = sorted(__import__("json").loads(line), key=lambda r: r["rank"])
    assert first["layers"] == last["layers"] == 2
    assert first["layer_numbers"] == [1, 2] and last["layer_numbers"] == [3, 4]
    assert first["has_embedding"] and first["has_projector"] and not first["has_output_layer"]
    assert last["has_output_layer"] and not last["has_embedding"] and not last["has_projector"]
