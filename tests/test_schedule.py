"""LR schedule arithmetic (warmup-cosine, continue, rewarmup), checkpoint metadata, apply_lr and
the schedule plot tool."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

from megatron_vlm.training.schedule import (
    LRSchedule,
    ScheduleMetadata,
    apply_lr,
    checkpoint_steps,
)

PEAK, FINAL = 1e-2, 1e-5
TOTAL, WARMUP = 5000, 500


@pytest.fixture
def text_run() -> LRSchedule:
    return LRSchedule.warmup_cosine(TOTAL, WARMUP, PEAK, FINAL, tokens_per_step=1024)


# ----------------------------------------------------------------------------- warmup_cosine

def test_warmup_cosine_known_points(text_run):
    assert text_run.lr(0) == 0.0
    assert text_run.lr(WARMUP // 2) == pytest.approx(PEAK / 2, rel=1e-12)
    assert text_run.lr(WARMUP) == PEAK
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert text_run.lr(middle) == pytest.approx((PEAK + FINAL) / 2, rel=1e-12)
    assert text_run.lr(TOTAL) == FINAL
    assert text_run.lr(TOTAL + 100) == FINAL  # constant after the end
    # Linear warmup: lr(k) = peak * k / warmup.
    for k in (1, 7, 499):
        assert text_run.lr(k) == pytest.approx(PEAK * k / WARMUP, rel=1e-12)


def test_linear_and_constant_decay():
    lin = LRSchedule.warmup_cosine(100, 10, 1.0, 0.1, decay_style="linear")
    assert lin.lr(55) == pytest.approx(0.55, rel=1e-12)
    assert lin.lr(100) == 0.1
    const = LRSchedule.warmup_cosine(100, 10, 1.0, 0.1, decay_style="constant")
    assert const.lr(10) == const.lr(99) == 1.0


def test_no_warmup_starts_at_peak():
    s = LRSchedule.warmup_cosine(10, 0, 1.0, 0.0)
    assert s.lr(0) == 1.0 and s.lr(10) == 0.0


def test_monotone_after_warmup(text_run):
    values = [text_run.lr(k) for k in range(WARMUP, TOTAL + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    warm = [text_run.lr(k) for k in range(WARMUP + 1)]
    assert all(a < b for a, b in zip(warm, warm[1:]))


# ----------------------------------------------------------------------------- continue

def test_continue_from_80_percent(text_run):
    s0 = 4000
    parent = text_run.metadata(s0)
    assert parent.fraction == 0.8
    cont = LRSchedule.continue_from(parent, 1000)
    assert cont.lr(0) == text_run.lr(s0)
    assert abs(cont.first_lr - parent.lr) <= 1e-12
    assert cont.lr(cont.total_steps) == FINAL
    assert cont.last_lr == FINAL
    values = [cont.lr(k) for k in range(cont.total_steps + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # Same step budget as the rest of the text run: the two curves coincide.
    assert cont.lr(500) == pytest.approx(text_run.lr(4500), rel=1e-12)
    assert cont.warmup_steps == 0


@pytest.mark.parametrize("new_total", [137, 1000, 28000])
def test_continue_maps_rest_of_parent_onto_new_budget(text_run, new_total):
    cont = LRSchedule.continue_from(text_run.metadata(4000), new_total)
    assert cont.lr(0) == text_run.lr(4000)
    assert cont.lr(new_total) == FINAL
    for k in (1, new_total // 3, new_total - 1):
        x = 4000 + (TOTAL - 4000) * k / new_total
        assert cont.lr(k) == pytest.approx(text_run.lr(x), rel=1e-12)


def test_continue_from_inside_warmup_includes_rest_of_warmup(text_run):
    cont = LRSchedule.continue_from(text_run.metadata(100), 4900)  # same step budget
    assert cont.lr(0) == text_run.lr(100)
    assert cont.warmup_steps == 400
    assert cont.lr(400) == PEAK
    assert cont.lr(4900) == FINAL


def test_continue_from_100_percent_is_a_clear_error(text_run):
    with pytest.raises(ValueError, match=r"100\.0%.*rewarmup"):
        LRSchedule.continue_from(text_run.metadata(TOTAL), 1000)


def test_continue_without_metadata_is_a_clear_error():
    with pytest.raises(ValueError, match="schedule metadata"):
        LRSchedule.continue_from(None, 1000)


def test_continue_of_a_continued_schedule(text_run):
    first = LRSchedule.continue_from(text_run.metadata(4000), 1000)
    second = LRSchedule.continue_from(first.metadata(500), 300)
    assert second.lr(0) == first.lr(500)
    assert second.lr(300) == FINAL


def test_describe_mentions_parent_position(text_run):
    line = LRSchedule.continue_from(text_run.metadata(4000), 1000).describe()
    assert "mode=continue" in line and "4000/5000" in line and "80.0%" in line
    assert "first_lr=" in line and "last_lr=1e-05" in line
    assert "mode=warmup_cosine" in text_run.describe() and "warmup=500" in text_run.describe()


# ----------------------------------------------------------------------------- rewarmup, fraction

def test_rewarmup_reaches_peak_at_end_of_warmup_and_final_at_end(text_run):
    rw = LRSchedule.rewarmup(1000, 100, 3e-3, FINAL, parent=text_run.metadata(TOTAL))
    assert rw.lr(0) == 0.0
    assert rw.lr(99) < 3e-3
    assert rw.lr(100) == 3e-3
    assert rw.lr(1000) == FINAL
    assert rw.metadata(10).parent.step == TOTAL
    assert "5000/5000" in rw.describe()


def test_warmup_fraction():
    ft = LRSchedule.from_fraction(5198, 0.05, 3e-4, 0.0)
    assert ft.warmup_steps == math.ceil(0.05 * 5198) == 260
    assert LRSchedule.warmup_cosine_fraction(1000, 0.05, 3e-4, 0.0).warmup_steps == 50
    assert ft.lr(260) == 3e-4 and ft.lr(5198) == 0.0


@pytest.mark.parametrize("mode", ["from_scratch", "rewarmup"])
def test_training_takes_a_fraction_warmup_as_the_schedule_does(mode):
    """0.07 * 100 is 7.000000000000001 in floating point: the run's warmup is 7 steps, as
    LRSchedule.from_fraction says, not 8."""
    from megatron_vlm.config import load_config
    from megatron_vlm.training.loop import build_schedule

    cfg = load_config("tiny", [f"schedule.mode={mode}", "schedule.warmup_fraction=0.07",
                               "train.train_iters=100"])
    assert build_schedule(cfg, None).warmup_steps == 7
    assert LRSchedule.from_fraction(100, 0.07, 1e-3, 0.0).warmup_steps == 7


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, name", [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=-5), "total_steps"),
    (dict(total_steps=10.5), "total_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=101), "warmup_steps"),
    (dict(peak_lr=0.0), "peak_lr"),
    (dict(peak_lr=float("nan")), "peak_lr"),
    (dict(final_lr=float("nan")), "final_lr"),
    (dict(final_lr=2.0), "final_lr"),
    (dict(final_lr=-1.0), "final_lr"),
    (dict(decay_style="exp"), "decay_style"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = dict(total_steps=100, warmup_steps=10, peak_lr=1.0, final_lr=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        LRSchedule.warmup_cosine(**args)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_bad_warmup_fraction(fraction):
    with pytest.raises(ValueError, match="warmup_fraction"):
        LRSchedule.from_fraction(100, fraction, 1.0, 0.0)


def test_bad_step():
    s = LRSchedule.warmup_cosine(10, 2, 1.0, 0.0)
    with pytest.raises(ValueError, match="step"):
        s.lr(-1)
    with pytest.raises(ValueError, match="step"):
        s.lr(float("nan"))


# ----------------------------------------------------------------------------- metadata

def test_metadata_round_trip_through_json(text_run):
    cont = LRSchedule.continue_from(text_run.metadata(4000, tokens_seen=4000 * 1024), 1000,
                                    tokens_per_step=512)
    meta = cont.metadata(250)
    assert meta.tokens_seen == 250 * 512 and meta.mode == "continue"
    assert meta.parent_start_step == 4000 and meta.parent.tokens_seen == 4000 * 1024
    back = ScheduleMetadata.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert back == meta
    assert back.lr == cont.lr(250)
    assert back.fraction == 0.25
    rebuilt = LRSchedule.from_metadata(back)
    assert [rebuilt.lr(k) for k in range(0, 1001, 50)] == [cont.lr(k) for k in range(0, 1001, 50)]
    plain = text_run.metadata(123)
    assert ScheduleMetadata.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    assert plain.tokens_seen == 123 * 1024


@pytest.mark.parametrize("key", ["step", "total_steps", "warmup_steps", "peak_lr", "final_lr",
                                 "decay_style", "tokens_seen", "mode"])
def test_from_dict_missing_key_is_named(text_run, key):
    data = text_run.metadata(10).to_dict()
    del data[key]
    with pytest.raises(ValueError, match=rf"\b{key}\b.*missing"):
        ScheduleMetadata.from_dict(data)


def test_from_dict_wrong_types_are_named(text_run):
    data = text_run.metadata(10).to_dict()
    for key, bad in [("step", "10"), ("step", 1.5), ("peak_lr", "big"), ("mode", 3),
                     ("tokens_per_step", 2.5), ("step", True)]:
        broken = dict(data, **{key: bad})
        with pytest.raises(ValueError, match=key):
            ScheduleMetadata.from_dict(broken)
    with pytest.raises(ValueError, match="bogus"):
        ScheduleMetadata.from_dict(dict(data, bogus=1))
    nested = LRSchedule.continue_from(text_run.metadata(4000), 10).metadata(1).to_dict()
    del nested["parent"]["peak_lr"]
    with pytest.raises(ValueError, match=r"parent\.peak_lr"):
        ScheduleMetadata.from_dict(nested)
    cont = LRSchedule.continue_from(text_run.metadata(4000), 10).metadata(1).to_dict()
    cont["parent"] = None
    cont["parent_start_step"] = None
    with pytest.raises(ValueError, match="parent"):
        ScheduleMetadata.from_dict(cont)


# ----------------------------------------------------------------------------- checkpoint steps

def test_checkpoint_steps():
    assert checkpoint_steps(1000, (0.2, 0.4, 0.6, 0.8, 1.0)) == {
        200: 0.2, 400: 0.4, 600: 0.6, 800: 0.8, 1000: 1.0}
    assert checkpoint_steps(1000, [0.8, 0.2, 0.8]) == {200: 0.2, 800: 0.8}
    assert checkpoint_steps(10, [0.25]) == {3: 0.25}   # 2.5 rounds half up
    assert checkpoint_steps(10, [0.01]) == {1: 0.01}   # never step 0
    assert checkpoint_steps(10, [0.33, 0.34]) == {3: 0.33}  # same step: merged


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.2, float("nan"), "0.5"])
def test_checkpoint_steps_bad_fraction_is_named(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        checkpoint_steps(1000, [0.2, bad])


# ----------------------------------------------------------------------------- apply_lr

def test_apply_lr_torch_optimizer():
    import torch

    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=1.0,
                            weight_decay=0.0)
    assert apply_lr(opt, 1e-3) == 2
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    p.grad, q.grad = torch.ones(3), -torch.ones(2)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 1 - 1e-3), atol=1e-6)
    assert torch.allclose(q.detach(), torch.full((2,), 1 + 1e-3), atol=1e-6)

    class Holder:  # anything exposing param_groups
        param_groups = [{"lr": 0.5}, {"lr": 0.5}]

    h = Holder()
    apply_lr(h, 0.25)
    assert [g["lr"] for g in h.param_groups] == [0.25, 0.25]
    with pytest.raises(ValueError, match="lr"):
        apply_lr(h, float("nan"))


_MEGATRON_SCRIPT = textwrap.dedent("""
    import json, warnings
    warnings.simplefilter("ignore")
    from megatron_vlm.runtime.distributed import initialize, shutdown
    initialize()
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron_vlm.training.schedule import apply_lr

    class Tiny(MegatronModule):
        def __init__(self, config):
            super().__init__(config)
            self.lin = torch.nn.Linear(4, 3)
        def forward(self, x):
            return self.lin(x)

    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1,
                               use_cpu_initialization=True)
    out = {}
    for distributed in (False, True):
        model = Tiny(config)
        ddp = DistributedDataParallel(
            config=config, module=model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                     use_distributed_optimizer=distributed))
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1.0, weight_decay=0.0, clip_grad=0.0,
                            use_distributed_optimizer=distributed), [ddp])
        groups = apply_lr(opt, 1e-3)
        w0 = model.lin.weight.detach().clone()
        ddp.zero_grad_buffer(); opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        ddp.finish_grad_sync()
        ok = opt.step()[0]
        delta = (model.lin.weight.detach() - w0).abs()
        out[str(distributed)] = dict(type=type(opt).__name__, groups=groups, ok=bool(ok),
                                     lrs=[g["lr"] for g in opt.param_groups],
                                     max=delta.max().item(), min=delta.min().item())
    shutdown()
    print(json.dumps(out))
""")


def test_apply_lr_megatron_optimizer(repo_root):
    """Megatron's ChainedOptimizer over FP32Optimizer / DistributedOptimizer: the LR set through
    param_groups is the one its step uses (Adam's first step moves each weight by ~lr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-c", _MEGATRON_SCRIPT], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in result.values():
        assert case["type"] == "ChainedOptimizer" and case["ok"]
        assert case["groups"] >= 1 and all(lr == 1e-3 for lr in case["lrs"])
        assert case["max"] == pytest.approx(1e-3, rel=1e-3)
        assert case["min"] == pytest.approx(1e-3, rel=1e-3)


# ----------------------------------------------------------------------------- plot tool

def _plot(repo_root, *args):
    return subprocess.run([sys.executable, str(repo_root / "tools" / "plot_schedules.py"), *args],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)


def test_plot_tool_writes_png(repo_root, tmp_path):
    out = tmp_path / "fig3.png"
    specs = ["text:warmup_cosine:total=5000,warmup=500,peak=1e-2,final=1e-5"]
    specs += [f"cont{p}:continue:parent=text@{p}%,total=1500" for p in (20, 40, 60, 80)]
    specs += ["rewarm100:rewarmup:parent=text@100%,total=1500,warmup=150,peak=3e-3,final=1e-5"]
    meta = tmp_path / "ft" / "schedule.json"
    meta.parent.mkdir()
    ft = LRSchedule.from_fraction(800, 0.05, 3e-4, 0.0, tokens_per_step=4096)
    meta.write_text(json.dumps({"schedule": ft.metadata(400).to_dict()}))
    args = ["--output", str(out), "--from-metadata", str(meta)]
    for s in specs:
        args += ["--schedule", s]
    proc = _plot(repo_root, *args)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "80.0%" in proc.stdout and "mode=rewarmup" in proc.stdout


def test_plot_tool_errors_name_the_spec(repo_root, tmp_path):
    out = str(tmp_path / "x.png")
    bad = "a:warmup_cosine:total=10,warmup=2,peak=1e-2"
    proc = _plot(repo_root, "--output", out, "--schedule", bad)
    assert proc.returncode == 2 and repr(bad) in proc.stderr and "final" in proc.stderr
    proc = _plot(repo_root, "--output", out,
                 "--schedule", "t:warmup_cosine:total=10,warmup=2,peak=1,final=0",
                 "--schedule", "c:continue:parent=t@100%,total=5")
    assert proc.returncode == 2 and "rewarmup" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()



@pytest.mark.slow  # two trainings
def test_plot_from_training_configs_branches_a_continued_run(repo_root, tmp_path):
    text_dir = tmp_path / "text"
    (tmp_path / "text.yaml").write_text(textwrap.dedent(f"""\
        base: tiny
        name: text
        output_dir: {text_dir}
        train: {{train_iters: 10, lr: 1.0e-2, min_lr: 1.0e-5}}
        schedule: {{warmup_iters: 2}}
        """))
    (tmp_path / "cont.yaml").write_text(textwrap.dedent(f"""\
        base: tiny
        name: cont
        output_dir: {tmp_path / 'cont'}
        train: {{train_iters: 5}}
        schedule: {{mode: continue}}
        checkpoint: {{load: {text_dir}/checkpoints/step_0000008}}
        """))
    out = tmp_path / "configs.png"
    proc = _plot(repo_root, "--output", str(out), "--config", str(tmp_path / "text.yaml"),
                 str(tmp_path / "cont.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000
    text = LRSchedule.warmup_cosine(10, 2, 1e-2, 1e-5)
    assert "continuing warmup_cosine run from its step 8/10" in proc.stdout
    assert f"first_lr={text.lr(8):.4g}" in proc.stdout
    # without the text config nothing says what the missing checkpoint continued
    alone = _plot(repo_root, "--output", str(out), "--config", str(tmp_path / "cont.yaml"))
    assert alone.returncode == 2 and "cannot know what to continue" in alone.stderr
