"""No host synchronisation in a train step: whole steps of the tiny and 79m recipes run under
megatron_vlm.runtime.host_sync's monitor, which flags on the CPU every operation that would
make the host wait for a GPU (item, nonzero, masked_select, boolean-mask indexing,
masked_scatter's backward, copies to the host, blocking copies of Python data to the device).

Also the pieces that replaced host-reading ones: the image splice against masked_scatter, the
cross entropy against megatron-core's, and the monitor itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.config import load_config
from megatron_vlm.runtime.host_sync import HostReadMonitor, HostSyncError


def _reads(fn) -> list[str]:
    with HostReadMonitor() as monitor:
        fn()
    return [str(r) for r in monitor.reads]


# ---------------------------------------------------------------------------------------------
# The monitor


@pytest.mark.parametrize("name,op", [
    ("item", lambda x, m: x.sum().item()),
    ("bool", lambda x, m: bool(x.sum() > 0)),
    ("nonzero", lambda x, m: m.nonzero()),
    ("masked_select", lambda x, m: x.masked_select(m)),
    ("boolean index", lambda x, m: x[m]),
    ("boolean index write", lambda x, m: x.clone().__setitem__(m, 0.0)),
    ("tolist", lambda x, m: x.tolist()),
    ("cpu", lambda x, m: x.cpu()),
    ("to cpu", lambda x, m: x.to("cpu")),
    ("equal", lambda x, m: torch.equal(x, x)),
    ("unique", lambda x, m: torch.unique(m)),
])
def test_monitor_flags_each_kind_of_host_read(name, op):
    x, m = torch.randn(4, 3), torch.rand(4, 3) > 0.5
    assert _reads(lambda: op(x, m)), name
    with pytest.raises(HostSyncError, match="host synchronisation"):
        with HostReadMonitor(strict=True):
            op(x, m)


def test_monitor_flags_masked_scatter_backward_and_leaves_device_only_ops_alone():
    x = torch.randn(2, 5, 3, requires_grad=True)
    f = torch.randn(4, 3, requires_grad=True)
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[0, :2] = m[1, 1:3] = True
    y = x.masked_scatter(m.unsqueeze(-1), f)
    reads = _reads(lambda: y.sum().backward())
    assert any("masked_scatter" in r for r in reads), reads
    # cumsum, index_select, where, gather, scatter_add, foreach norms: no data-dependent sizes
    z = torch.randn(10, 3, requires_grad=True)
    flat = m.reshape(-1, 1)
    rows = (flat.reshape(-1).cumsum(0) - 1).clamp(min=0)
    assert not _reads(lambda: (torch.where(flat, z.index_select(0, rows), 0.0).sum()
                               + z.gather(0, rows[:3].unsqueeze(-1).expand(3, 3)).sum()
                               + torch.stack(torch._foreach_norm([z, z])).sum()).backward())


def test_monitor_sees_blocking_copies_through_the_cpu_redirect_layer(runtime):
    assert _reads(lambda: torch.tensor([1.0, 2.0], device="cuda"))
    assert _reads(lambda: torch.cuda.synchronize())
    assert not _reads(lambda: torch.zeros(3, device="cuda"))
    # torch.optim's step counters live on the host: read there, not from a device
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([param])
    param.grad = torch.randn(3)
    with HostReadMonitor() as monitor:
        opt.step()
    assert not monitor.reads and monitor.allowed


def test_polling_an_async_save_in_flight_does_not_wait_for_the_device(runtime):
    """The loop times checkpoint work apart from the steps; a save waits for the device anyway,
    but the poll of an async save in flight runs every step and must not."""
    from megatron_vlm.training.loop import StepClock

    clock = StepClock(torch.device("cuda"))

    def timed(wait_for_device):
        with clock.apart("checkpoint", wait_for_device=wait_for_device):
            pass

    assert not _reads(lambda: timed(False))
    assert _reads(lambda: timed(True))


# ---------------------------------------------------------------------------------------------
# The pieces that replaced host-reading ones


def test_image_splice_equals_masked_scatter_in_value_and_gradient():
    from megatron_vlm.model.vlm import splice_image_features

    gen = torch.Generator().manual_seed(0)
    s, b, d, n_img = 12, 4, 5, 3
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[0, 2:5] = mask[2, 0:3] = mask[3, 9:12] = True  # row 1 has no image
    emb = torch.randn(s, b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(3, n_img, d, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(s, b, d, generator=gen, dtype=torch.float64)

    expected = emb.transpose(0, 1).masked_scatter(mask.unsqueeze(-1), feats).transpose(0, 1)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), (emb, feats))
    spliced = splice_image_features(emb, mask, feats)
    grads = torch.autograd.grad((spliced * upstream).sum(), (emb, feats))
    torch.testing.assert_close(spliced, expected, rtol=0, atol=0)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not _reads(lambda: torch.autograd.grad(
        (splice_image_features(emb, mask, feats) * upstream).sum(), (emb, feats)))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_cross_entropy_equals_megatrons_in_value_and_gradient(runtime, fused):
    from megatron.core import parallel_state, tensor_parallel

    from megatron_vlm.model.loss import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(7, 2, 50, generator=gen)).requires_grad_()
    target = torch.randint(0, 50, (7, 2), generator=gen)
    upstream = torch.rand(7, 2, generator=gen)
    group = parallel_state.get_tensor_model_parallel_group()
    loss = vocab_parallel_cross_entropy(logits, target, group, fused=fused)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), logits)
    by_torch = F.cross_entropy(logits.reshape(-1, 50), target.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), by_torch, rtol=1e-6, atol=1e-6)
    # megatron's works in place on its input (fp32 logits become the softmax): give it a copy
    theirs = logits.detach().clone().requires_grad_()
    reference = tensor_parallel.vocab_parallel_cross_entropy(theirs * 1.0, target)
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), theirs)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-7)
    assert not _reads(lambda: torch.autograd.grad(
        vocab_parallel_cross_entropy(logits, target, group, fused=fused).sum(), logits))


# ---------------------------------------------------------------------------------------------
# Whole train steps

# Each case: recipe, overrides. Micro-batches of one row: the random batches put an image in
# every other row, so a step has micro-batches with and without images.
STEPS = {
    "tiny_unfused_loss": ("tiny", ["performance.cross_entropy_fusion=false"]),
    "tiny_fused_loss": ("tiny", ["performance.cross_entropy_fusion=true"]),
    "tiny_online_trainable_encoder": ("tiny", ["model.encoder.mode=online",
                                               "model.encoder.frozen=false"]),
    # Document attention as the local spec gives it: a dense mask built on the device. (The
    # packed form is the TE spec's; megatron's unfused rotary for packed sequences, the only
    # one the local spec has, splits them on the host: TE's fused rotary is checked on a GPU.)
    "tiny_document_mask": ("tiny", ["data.caption_fill=text"]),
    # The 79m recipe on the CPU (fp32): its 729-position SigLIP images need a longer sequence,
    # its decoder is cut to two layers to keep the step short (every layer is the same code).
    "79m": ("79m", ["parallel.device=cpu", "train.params_dtype=fp32",
                    "model.decoder.num_layers=2", "train.seq_length=768"]),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "79m" else c
                                  for c in STEPS])
def test_train_steps_do_not_read_the_device_on_the_host(runtime, case):
    """Two steps: the first untimed (lazy initialisation), the second under the monitor. Only
    the log step's reads (the loss and the gradient norm as floats) are allowed."""
    from megatron_vlm.model.build import build_model
    from megatron_vlm.training.loop import make_batches
    from megatron_vlm.training.step import setup_training, summarize_losses, train_step

    recipe, overrides = STEPS[case]
    cfg = load_config(recipe, ["data.kind=random", "train.micro_batch_size=1",
                               "train.global_batch_size=2", *overrides])
    torch.manual_seed(0)
    state = setup_training(build_model(cfg), cfg)
    next_step, _ = make_batches(cfg, 0, 1, None)
    microbatches = next_step()
    with_images = ["image_mask" in mb and bool(mb["image_mask"].any()) for mb in microbatches]
    assert True in with_images and False in with_images, with_images
    train_step(state, microbatches, len(microbatches), cfg, summarize=False)
    microbatches = next_step()
    with HostReadMonitor() as monitor:
        out = train_step(state, microbatches, len(microbatches), cfg, summarize=False)
        with monitor.allow():
            logged = summarize_losses(out["loss_sums"])
            norm = float(out["grad_norm"])
    assert not monitor.reads, "host reads in a train step:\n" + monitor.report()
    assert monitor.allowed  # the log step's reads were seen, and allowed
    assert logged["loss"] > 0 and norm > 0
