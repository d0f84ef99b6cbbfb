"""bench/train_throughput.py and megatron_vlm/training/flops.py: the FLOPs formula against a
hand count, the peak table and the MFU labels, the PyTorch baseline against the project's model
at equal weights, the batch mix, batches made once on the device and reused by every step, the
JSON rewritten after every variant, and a tiny CPU run of the bench that prints its table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from megatron_vlm.config import load_config
from megatron_vlm.training import flops

BENCH = REPO_ROOT / "bench" / "train_throughput.py"


def _bench():
    """bench/train_throughput.py as a module (registered, as its dataclasses need)."""
    if "train_throughput" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_throughput"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_throughput"]


def _batches():
    """bench/throughput_batches.py, as the bench imports it."""
    _bench()
    return sys.modules["throughput_batches"]


# What a launcher sets: the bench runs as a lone process and binds its own free port (this
# process's MASTER_PORT is held by the module's runtime). A peak override of the caller's
# environment would change the MFU figures.
DROPPED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", flops.PEAK_ENV)


def _run_bench(args: list[str], timeout: int = 240, **env_vars) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **env_vars)
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_matches_a_hand_count_of_the_tiny_model():
    cfg = load_config("tiny")  # 2 layers, d 64, 4 heads, vocab 512; encoder width 32, 16 tokens
    # Per layer: QKV 64x192, output projection 64x64, q/k gains 2x64, SwiGLU hidden
    # 256*ceil(170/256) = 256: w12 64x512 and w3 256x64, two norm gains of 64.
    per_layer = 64 * 192 + 64 * 64 + 2 * 64 + 64 * 512 + 256 * 64 + 2 * 64
    matrices = 2 * per_layer + 64 + 512 * 64  # + final norm + output layer; no input embedding
    attention = 12 * 2 * 64 * 128  # 12 L d s at the recipe's sequence 128
    projector = 32 * 128 + 128 + 128 * 64 + 64  # mlp2: 32 -> 4*32 -> 64, with biases
    f_img = 16 / 128 / 8  # one image of 16 positions in a batch of 8 x 128
    expected = 6 * matrices + attention + 6 * projector * f_img
    assert flops.flops_per_token(cfg, f_img) == pytest.approx(expected, rel=1e-12)
    assert flops.flops_per_token(cfg) == pytest.approx(6 * matrices + attention, rel=1e-12)
    # The sequence length enters only the attention term.
    assert flops.flops_per_token(cfg, seq_length=256) == pytest.approx(
        6 * matrices + 2 * attention, rel=1e-12)
    text = flops.formula(cfg, f_img)
    assert f"{matrices:,}" in text and "no causal halving" in text and "bf16 peak" in text


def test_flops_counts_a_linear_projector_and_an_online_encoder():
    cfg = load_config("tiny", ["model.projector.type=linear"])
    base = flops.flops_per_token(cfg)
    assert flops.flops_per_token(cfg, 0.5) - base == pytest.approx(6 * (32 * 64 + 64) * 0.5)
    frozen = load_config("tiny", ["model.encoder.mode=online"])
    trained = load_config("tiny", ["model.encoder.mode=online", "model.encoder.frozen=false"])
    n_enc = 1000
    plain = flops.flops_per_token(load_config("tiny"), 0.25)
    assert flops.flops_per_token(frozen, 0.25, encoder_params=n_enc) - plain == pytest.approx(
        2 * n_enc * 0.25)  # forward only
    assert flops.flops_per_token(trained, 0.25, encoder_params=n_enc) - plain == pytest.approx(
        6 * n_enc * 0.25)
    with pytest.raises(ValueError, match="image_fraction"):
        flops.flops_per_token(cfg, 1.5)


def test_peak_table_keys_device_names_to_dense_bf16_and_fp8_peaks(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    expected = {  # CUDA device name -> (table key, dense bf16, dense FP8), TFLOP/s
        "NVIDIA H100 80GB HBM3": ("H100", 989, 1979),  # SXM: the name has no form factor
        "NVIDIA H100 PCIe": ("H100 PCIe", 756, 1513),
        "NVIDIA H100 NVL": ("H100 NVL", 835, 1671),
        "NVIDIA H200": ("H200", 989, 1979),
        "NVIDIA H200 NVL": ("H200 NVL", 835, 1671),  # a PCIe card: not the SXM figure
        "NVIDIA A100-SXM4-80GB": ("A100", 312, None),  # no FP8 tensor cores
        "NVIDIA A100-PCIE-40GB": ("A100", 312, None),
    }
    for name, (key, bf16, fp8) in expected.items():
        peaks = flops.table_peaks(name)
        assert (peaks.key, peaks.bf16, peaks.fp8) == (
            key, bf16 * 1e12, None if fp8 is None else fp8 * 1e12), name
        assert not peaks.overridden and peaks.source == "table"
        assert flops.peak_flops(name) == bf16 * 1e12
    # No key is shadowed by one before it (a bare "H200" first would take "H200 NVL").
    for key in flops.PEAKS:
        assert flops.table_peaks(f"NVIDIA {key}").key == key
    # Unknown: no peaks, and a note that says how to give them. A key matches whole words only:
    # the RTX A1000 is not an A100.
    for name in ("NVIDIA GeForce RTX 4090", "NVIDIA RTX A1000", "CPU"):
        peaks = flops.table_peaks(name)
        assert peaks.bf16 is None and peaks.fp8 is None and peaks.key is None, name
        assert repr(name) in peaks.note and "--peak-tflops" in peaks.note
        assert flops.PEAK_ENV in peaks.note and flops.peak_flops(name) is None
    assert flops.mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, None) is None
    batches = [{"image_mask": torch.tensor([[True, True, False, False]])},
               {"image_mask": torch.zeros(1, 4, dtype=torch.bool)}]
    assert flops.image_positions_fraction(batches) == 0.25


def test_peak_override_by_flag_and_environment(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    peaks = flops.device_peaks("NVIDIA H200 NVL", "900,1800")
    assert (peaks.bf16, peaks.fp8, peaks.key) == (900e12, 1800e12, "H200 NVL")
    assert peaks.overridden and peaks.source == "--peak-tflops"
    assert peaks.as_dict() == {"device_name": "NVIDIA H200 NVL", "key": "H200 NVL",
                               "bf16_tflops": 900.0, "fp8_tflops": 1800.0,
                               "source": "--peak-tflops", "overridden": True, "note": ""}
    # The variable covers a card the table does not know; without an FP8 figure there is none.
    monkeypatch.setenv(flops.PEAK_ENV, " 27.5 ")
    peaks = flops.device_peaks("NVIDIA RTX A1000")
    assert (peaks.bf16, peaks.fp8, peaks.source) == (27.5e12, None, flops.PEAK_ENV)
    assert flops.device_peaks("NVIDIA H100 PCIe", "756").bf16 == 756e12  # the flag wins
    monkeypatch.setenv(flops.PEAK_ENV, "")  # empty: as if unset
    assert flops.device_peaks("NVIDIA H100 PCIe").bf16 == 756e12
    for bad in ("abc", "989,1979,1", "0", "-5", "nan", "inf", "", "989;1979"):
        with pytest.raises(ValueError, match=r"--peak-tflops=.*expected BF16\[,FP8\]"):
            flops.device_peaks("NVIDIA H200", bad)
    monkeypatch.setenv(flops.PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=f"{flops.PEAK_ENV}='fast': expected"):
        flops.device_peaks("NVIDIA H200")


def test_bf16_and_fp8_rows_name_the_peak_their_mfu_is_measured_against(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    bench = _bench()
    peaks = flops.table_peaks("NVIDIA H200 NVL")
    # 1e6 FLOPs/token, 8192 tokens per step: a step of 8192e6 / 417.5e12 s is half the bf16
    # peak, and a quarter of the FP8 one (417.5 / 1671 = 25.0%).
    step_s, tokens, per_token = 8192e6 / 417.5e12, 8192, 1e6
    bf16 = bench.Row("megatron-te", "bf16", **bench.figures(step_s, tokens, per_token, peaks,
                                                            fp8=False))
    fp8 = bench.Row("megatron-te-fp8", "fp8 hybrid",
                    **bench.figures(step_s, tokens, per_token, peaks, fp8=True))
    assert bf16.tflops == pytest.approx(417.5) == fp8.tflops
    assert bf16.mfu_bf16_peak == pytest.approx(0.5) and bf16.mfu_fp8_peak is None
    assert fp8.mfu_bf16_peak == pytest.approx(0.5)
    assert fp8.mfu_fp8_peak == pytest.approx(417.5 / 1671)
    table = bench.format_table([bf16, fp8]).splitlines()
    assert table[0].split()[6:8] == ["MFU(bf16pk)", "MFU(fp8pk)"]  # after "step s"
    assert table[2].split()[5:7] == ["50.0%", "n/a"]
    assert table[3].split()[6:8] == ["50.0%", "25.0%"]  # after "fp8 hybrid"

    # The JSON: the rows' fields say which peak, the record which peaks, key and source.
    args = bench.parse_args(["--recipe", "tiny", "--quick"])
    setup = bench.build_setup(args)
    for setup_peaks, source in ((peaks, "table"),
                                (flops.device_peaks("NVIDIA H200 NVL", "900,1800"),
                                 "--peak-tflops")):
        setup.peaks = setup_peaks
        record = json.loads(json.dumps(bench.report(setup, args, [], [bf16, fp8], True)))
        assert record["peak"]["key"] == "H200 NVL" and record["peak"]["source"] == source
        assert record["peak"]["overridden"] == (source != "table")
        assert (record["peak"]["bf16_tflops"], record["peak"]["fp8_tflops"]) == (
            setup_peaks.bf16 / 1e12, setup_peaks.fp8 / 1e12)
    rows = {r["variant"]: r for r in record["rows"]}
    assert "mfu" not in rows["megatron-te"]  # no unnamed MFU
    assert rows["megatron-te"]["mfu_bf16_peak"] == pytest.approx(0.5)
    assert rows["megatron-te"]["mfu_fp8_peak"] is None
    assert rows["megatron-te-fp8"]["mfu_fp8_peak"] == pytest.approx(417.5 / 1671)
    text = flops.formula(setup.cfg, peaks=peaks, device_name="NVIDIA H200 NVL")
    assert "NVIDIA H200 NVL: dense bf16 835, FP8 1671 TFLOP/s (table key 'H200 NVL')" in text
    assert "mfu_fp8_peak against the FP8 peak (FP8 rows only)" in text


# ---------------------------------------------------------------------------------------------
# Batches and the baseline


def test_mixed_batch_follows_the_batch_contract_and_the_caption_share():
    from megatron_vlm.data.batch import split_microbatches

    batches = _batches()
    rows, seq, n_img = 40, 64, 16
    batch = batches.mixed_batch(rows, seq, 512, n_img, 32, caption_fraction=0.10, device="cpu")
    assert all(v.device == torch.device("cpu") for v in batch.values())
    image_rows = batch["image_mask"].any(1)
    assert int(image_rows.sum()) == 4 == batch["image_embeddings"].shape[0]
    assert batch["image_embeddings"].shape == (4, n_img, 32)
    assert (batch["image_mask"][image_rows].sum(1) == n_img).all()
    assert (batch["image_mask"][image_rows][:, :n_img]).all()  # image first
    # No loss where the next position is an image position; the last image position predicts
    # the first caption token; text and caption tokens all carry loss.
    assert (batch["loss_mask"][image_rows][:, : n_img - 1] == 0).all()
    assert (batch["loss_mask"][image_rows][:, n_img - 1:] == 1).all()
    assert (batch["loss_mask"][~image_rows] == 1).all()
    torch.testing.assert_close(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    # Spread over the batch, so every micro-batch of 10 rows holds one caption row.
    assert [mb["image_embeddings"].shape[0] for mb in split_microbatches(batch, 10)] == [1] * 4
    none = batches.mixed_batch(8, seq, 512, n_img, 32, caption_fraction=0.0)
    assert not none["image_mask"].any() and none["image_embeddings"].shape[0] == 0


def _copy_megatron_weights(baseline, model, heads: int) -> None:
    """Megatron's fused QKV groups rows per head as [q_h; k_h; v_h]; the baseline's rows are
    [Q; K; V]. The SwiGLU fc1 is [gate; up] in both."""
    lm = model.language_model
    with torch.no_grad():
        baseline.embedding.weight.copy_(lm.embedding.word_embeddings.weight)
        for ours, theirs in zip(baseline.layers, lm.decoder.layers):
            attn = theirs.self_attention
            qkv = attn.linear_qkv.weight
            d = qkv.shape[1]
            ours.qkv.weight.copy_(qkv.view(heads, 3, d // heads, d).transpose(0, 1).reshape(3 * d, d))
            ours.attention_norm.weight.copy_(theirs.input_layernorm.weight)
            ours.q_norm.weight.copy_(attn.q_layernorm.weight)
            ours.k_norm.weight.copy_(attn.k_layernorm.weight)
            ours.out.weight.copy_(attn.linear_proj.weight)
            ours.ffn_norm.weight.copy_(theirs.pre_mlp_layernorm.weight)
            ours.w12.weight.copy_(theirs.mlp.linear_fc1.weight)
            ours.w3.weight.copy_(theirs.mlp.linear_fc2.weight)
        baseline.norm.weight.copy_(lm.decoder.final_layernorm.weight)
        baseline.output.weight.copy_(lm.output_layer.weight)
        fc1, fc2 = model.projector.encoder.linear_fc1, model.projector.encoder.linear_fc2
        baseline.projector[0].weight.copy_(fc1.weight)
        baseline.projector[0].bias.copy_(fc1.bias)
        baseline.projector[2].weight.copy_(fc2.weight)
        baseline.projector[2].bias.copy_(fc2.bias)


def test_baseline_forward_equals_the_project_model_at_equal_weights(runtime):
    """The baseline is the same architecture: equal logits and per-token losses in fp32."""
    from megatron_vlm.model.build import build_model

    bench = _bench()
    cfg = load_config("tiny")
    torch.manual_seed(3)
    model = build_model(cfg, use_transformer_engine=False).eval()
    with torch.no_grad():  # gains away from 1, so that a gain copied to the wrong slot shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    baseline = bench.BaselineVLM(cfg.model).eval()
    assert sum(p.numel() for p in baseline.parameters()) == sum(
        p.numel() for p in model.parameters())
    _copy_megatron_weights(baseline, model, cfg.model.decoder.num_attention_heads)
    batch = _batches().mixed_batch(4, 48, 512, 16, 32, caption_fraction=0.5, seed=1)
    batch["image_embeddings"] = batch["image_embeddings"].float()
    with torch.no_grad():
        theirs = model(batch["tokens"], image_mask=batch["image_mask"],
                       image_embeddings=batch["image_embeddings"])
        ours = baseline(batch["tokens"], batch["image_mask"], batch["image_embeddings"])
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
        theirs_loss = model(batch["tokens"], labels=batch["labels"], image_mask=batch["image_mask"],
                            image_embeddings=batch["image_embeddings"])
        ours_loss = baseline(batch["tokens"], batch["image_mask"], batch["image_embeddings"],
                             batch["labels"])
    torch.testing.assert_close(ours_loss, theirs_loss, atol=2e-5, rtol=2e-5)


def test_batches_are_made_once_on_the_device_and_every_step_reuses_them(runtime, monkeypatch):
    """Warmup and timed steps of the torch and megatron variants get the very tensors the setup
    made on its device, and no step builds a batch or takes the train step's copy path."""
    from megatron_vlm.training import device_batches, step as train_step_module

    bench, batches = _bench(), _batches()
    monkeypatch.setattr(bench, "_RUNTIME", runtime)  # the module's runtime, not a second one
    built_on = []
    real_mixed_batch = batches.mixed_batch

    def counting_mixed_batch(*args, **kwargs):
        built_on.append(kwargs.get("device"))
        return real_mixed_batch(*args, **kwargs)

    monkeypatch.setattr(batches, "mixed_batch", counting_mixed_batch)
    setup = bench.build_setup(bench.parse_args(["--recipe", "tiny"]))
    assert built_on == [setup.device] == [runtime.device]
    # The setup's guard: a micro-batch elsewhere than the measured device (on a GPU host, the
    # host) would be copied by every step.
    with pytest.raises(RuntimeError, match="micro-batch 0 tokens is on cpu, not on the bench's "
                                           "device meta"):
        batches.check_on_device(setup.microbatches, torch.device("meta"))

    def identities(mb: dict) -> dict:
        return {k: (id(v), v.data_ptr()) for k, v in mb.items() if isinstance(v, torch.Tensor)}

    made = [identities(mb) for mb in setup.microbatches]
    assert len(made) == 4 and all(len(m) == 5 for m in made)  # tokens ... image_embeddings
    warmup, steps = 1, 2

    # torch: the tensors the model is called with.
    forward_inputs = []
    real_forward = bench.BaselineVLM.forward

    def recording_forward(self, tokens, image_mask=None, image_embeddings=None, labels=None):
        forward_inputs.append(identities({"tokens": tokens, "image_mask": image_mask,
                                          "image_embeddings": image_embeddings,
                                          "labels": labels}))
        return real_forward(self, tokens, image_mask, image_embeddings, labels)

    monkeypatch.setattr(bench.BaselineVLM, "forward", recording_forward)
    row = bench.measure("torch", setup, warmup, steps)
    assert row.tokens_per_s > 0, row
    expected = [{k: m[k] for k in ("tokens", "image_mask", "image_embeddings", "labels")}
                for m in made]
    assert forward_inputs == expected * (warmup + steps)

    # megatron: the micro-batches the train step's iterator hands its forward step, and every
    # tensor that reaches to_device on a device other than the step's (a copy).
    handed, to_device_calls, copied = [], [], []

    class RecordingMicroBatches(device_batches.DeviceMicroBatches):
        def __next__(self):
            batch = super().__next__()
            handed.append(identities(batch))
            return batch

    real_to_device = device_batches.to_device

    def counting_to_device(batch, device, non_blocking=True):
        to_device_calls.append(device)
        copied.extend(k for k, v in batch.items()
                      if isinstance(v, torch.Tensor) and v.device != device)
        return real_to_device(batch, device, non_blocking)

    monkeypatch.setattr(train_step_module, "DeviceMicroBatches", RecordingMicroBatches)
    monkeypatch.setattr(device_batches, "to_device", counting_to_device)
    row = bench.measure("megatron-local", setup, warmup, steps)
    assert row.tokens_per_s > 0 and math.isfinite(row.loss), row
    assert handed == made * (warmup + steps)
    assert len(to_device_calls) == 4 * (warmup + steps) and copied == []
    assert built_on == [setup.device]  # still the one build of the setup


def test_json_is_rewritten_after_every_variant(tmp_path, monkeypatch):
    """A run stopped during its second variant leaves a file with the first one's row and
    "complete": false; each write replaces the file whole (a temporary file, os.replace)."""
    bench = _bench()
    out = tmp_path / "results" / "rows.json"
    replaced, seen_mid_run = [], []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append(Path(dst))
        return real_replace(src, dst)

    def fake_measure(variant, setup, warmup, steps, asked=True):
        if variant == "megatron-local":
            seen_mid_run.append(json.loads(out.read_text()))
            raise stop_with()
        return bench.Row(variant, "fp32", **bench.figures(0.5, 1024, 1e6, setup.peaks, False))

    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(bench, "measure", fake_measure)
    argv = ["--recipe", "tiny", "--variants", "torch,megatron-local", "--json", str(out)]

    stop_with = KeyboardInterrupt  # the run is stopped there: no later write
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    after_stop = json.loads(out.read_text())
    for record in (seen_mid_run[0], after_stop):
        assert record["complete"] is False and record["device"] == "CPU"
        assert [r["variant"] for r in record["rows"]] == ["torch"]
        assert record["rows"][0]["tokens_per_s"] == 2048.0
    assert replaced == [out] and list(out.parent.iterdir()) == [out]  # no temporary file left

    replaced.clear()
    stop_with = RuntimeError  # a variant that fails: the run goes on and finishes
    assert bench.main(argv) == 1
    final = json.loads(out.read_text())
    assert final["complete"] is True and replaced == [out] * 3  # two variants, then the end
    assert [r["variant"] for r in final["rows"]] == ["torch", "megatron-local"]
    assert final["rows"][1]["note"].startswith("error: RuntimeError")
    assert list(out.parent.iterdir()) == [out]


# ---------------------------------------------------------------------------------------------
# The command


def test_help_works():
    result = _run_bench(["--help"], timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--recipe", "--variants", "--steps", "--warmup", "--seq-length",
                 "--micro-batch-size", "--global-batch-size", "--caption-fraction", "--quick",
                 "--json", "--peak-tflops", "key=value"):
        assert flag in result.stdout
    # Which peaks MFU uses, and how to give others; the JSON's completion flag.
    for text in ("MFU(bf16pk)", "MFU(fp8pk)", "BF16[,FP8]", flops.PEAK_ENV, '"complete": false'):
        assert text in result.stdout, text


def test_bad_flags_get_one_clear_line(tmp_path):
    result = _run_bench(["--variants", "torch,megatron-fast"], timeout=60)
    assert result.returncode == 2 and "--variants: unknown megatron-fast" in result.stderr
    result = _run_bench(["--recipe", "tiny", "--seq-length", "4096"], timeout=60)
    assert result.returncode == 2
    assert "--seq-length=4096 exceeds model.decoder.max_seq_length=256" in result.stderr
    result = _run_bench(["--recipe", "tiny", "--peak-tflops", "989,fast"], timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "train_throughput.py: error: --peak-tflops='989,fast': expected BF16[,FP8], the dense "
        "peak TFLOP/s per GPU as one or two positive numbers, e.g. 989 or 989,1979")
    result = _run_bench(["--recipe", "tiny"], timeout=60, **{flops.PEAK_ENV: "-1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {flops.PEAK_ENV}='-1': expected BF16[,FP8]" in result.stderr


def test_tiny_cpu_run_prints_the_table_last(tmp_path):
    """Also: the lone process binds its own port (no MASTER_PORT given), and a --peak-tflops
    override reaches the rows (a CPU has no peak in the table)."""
    out = tmp_path / "rows.json"
    result = _run_bench(["--recipe", "tiny", "--quick", "--steps", "2", "--variants",
                         "torch,megatron-local,megatron-te,megatron-te-fp8", "--json", str(out),
                         "--peak-tflops", "0.5", "train.lr=1e-5"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.rstrip().splitlines()
    table = lines[-6:]
    assert table[0].split()[:3] == ["variant", "precision", "tokens/s"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert list(rows) == ["torch", "megatron-local", "megatron-te", "megatron-te-fp8"]
    assert "n/a: no CUDA device" in rows["megatron-te"]
    assert "n/a: no CUDA device" in rows["megatron-te-fp8"]
    assert "MFU = tokens/s per GPU * FLOPs/token" in result.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "CPU" and report["precision"] == "fp32"
    assert report["seq_length"] == 128 and report["global_batch_size"] == 8
    assert "--recipe tiny" in report["command"] and report["megatron_core"]
    assert report["complete"] is True and report["batch_device"] == "cpu"
    assert report["peak"] == {"device_name": "CPU", "key": None, "bf16_tflops": 0.5,
                              "fp8_tflops": None, "source": "--peak-tflops",
                              "overridden": True, "note": ""}
    got = {r["variant"]: r for r in report["rows"]}
    keys = {"variant", "tokens_per_s", "step_s", "tflops", "mfu_bf16_peak", "mfu_fp8_peak",
            "peak_mem_gib", "ratio_vs_torch", "ratio_vs_compile", "note"}
    assert all(keys <= set(r) for r in report["rows"])
    for name in ("torch", "megatron-local"):
        row = got[name]
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(8 * 128 / row["step_s"])
        assert row["tflops"] == pytest.approx(
            report["flops_per_token"] * row["tokens_per_s"] / 1e12)
        assert row["mfu_bf16_peak"] == pytest.approx(row["tflops"] / 0.5)
        assert row["mfu_fp8_peak"] is None  # not an FP8 row
        # Random tokens and (almost) no learning: both stay at ln(vocab), the same task.
        assert abs(row["loss"] - math.log(512)) < 0.1, row
    assert got["torch"]["ratio_vs_torch"] == 1.0
    assert got["megatron-local"]["ratio_vs_torch"] == pytest.approx(
        got["megatron-local"]["tokens_per_s"] / got["torch"]["tokens_per_s"])
    assert got["megatron-te"]["tokens_per_s"] is None
