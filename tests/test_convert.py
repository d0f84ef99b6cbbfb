"""DCLM/OpenLM checkpoints into megatron and back: parity with an independent reference at
TP=1, TP=2 and PP=2, bitwise round trips, the DCLM-1B/7B shapes on the meta device, malformed
input, schedule metadata, the tokenizer check, and pretrain_vlm.py continuing a converted
checkpoint's schedule."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from distributed import REPO, free_port, last_json, torchrun
from reference.openlm_reference import openlm_logits, random_openlm_state_dict

from megatron_vlm.convert import openlm
from megatron_vlm.convert.metadata import ScheduleArgs, check_tokenizer, schedule_metadata

# The tiny recipe's decoder (2 layers, d 64, 4 heads, SwiGLU 256) with a vocabulary that TP=2
# must pad: 501 -> 502.
LAYERS, D, HEADS, VOCAB, FFN = 2, 64, 4, 501, 256
PADDED = 502
SCHEDULE = ["--total-steps", "100", "--warmup-steps", "10", "--peak-lr", "3e-3",
            "--final-lr", "1e-5"]


def write_tokenizer(path, size, eos_id=0):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    names = [f"w{i}" for i in range(size)]
    names[eos_id] = "<|endoftext|>"
    names[1 if eos_id != 1 else 2] = "<unk>"
    tok = Tokenizer(WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return str(path)


def run_tool(script, *args, timeout=300):
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An OpenLM epoch_3.pt (DDP-prefixed keys, step 40) with its stats_3.pt, and the raw
    state dict."""
    root = tmp_path_factory.mktemp("openlm")
    state = random_openlm_state_dict(LAYERS, D, VOCAB, FFN, HEADS, seed=3)
    torch.save({"epoch": 3, "name": "tiny", "step": 40, "samples_seen": 1280,
                "state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "epoch_3.pt")
    torch.save({"percentage_of_data_seen": 40.0, "step": 40}, root / "stats_3.pt")
    return root / "epoch_3.pt", state


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """Converted for TP=2 from one process by the command-line tool, with a tokenizer check."""
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    tok = write_tokenizer(out.parent / "tokenizer.json", 400)
    proc = run_tool("tools/convert_dclm_checkpoint.py", "--input", source[0], "--output", out,
                    "--tp", "2", *SCHEDULE, "--tokenizer", tok)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "projector (mlp2" in proc.stderr and "random initialization" in proc.stderr
    assert "padded from 501 to 502" in proc.stderr
    return out


@pytest.fixture(scope="module")
def continued(converted, tmp_path_factory):
    """pretrain_vlm.py, 2 steps in continue mode from the converted checkpoint (weights only)."""
    run = tmp_path_factory.mktemp("continued")
    proc = run_tool("pretrain_vlm.py", "--recipe", "tiny", f"model.decoder.vocab_size={PADDED}",
                    "data.kind=random", "train.train_iters=2", "train.global_batch_size=4",
                    "train.micro_batch_size=2", "train.seq_length=32",
                    f"checkpoint.load={converted}", "schedule.mode=continue",
                    "checkpoint.load_optimizer=false", "checkpoint.save_fractions=[1.0]",
                    f"output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc.stderr


def tiny_model(vocab=PADDED):
    from megatron_vlm.config import load_config
    from megatron_vlm.model.build import build_model

    return build_model(load_config("tiny", [f"model.decoder.vocab_size={vocab}"]))


def checkpoint_weights(directory, vocab=PADDED):
    from megatron_vlm.training.checkpointing import load_checkpoint

    model = tiny_model(vocab)
    load_checkpoint(directory, model, None, with_rng=False)
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def random_tokens(seed=0, batch=2, seq=24):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- parity


def test_reference_is_fp32_accurate(source):
    tokens = random_tokens()
    ref32 = openlm_logits(source[1], tokens, HEADS)
    ref64 = openlm_logits(source[1], tokens, HEADS, dtype=torch.float64)
    assert ref32.dtype == torch.float32 and ref32.shape == (2, 24, VOCAB)
    assert float((ref32.double() - ref64).abs().max()) < 1e-5


def test_logits_match_reference_at_tp1(runtime, source, converted):
    model, _ = checkpoint_weights(converted)
    tokens = random_tokens()
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 24, PADDED)
    reference = openlm_logits(source[1], tokens, HEADS)
    assert float((logits[..., :VOCAB] - reference).abs().max()) <= 1e-5
    assert float(logits[..., VOCAB:].abs().max()) == 0.0  # zero-padded output rows


def test_evaluation_scores_a_converted_checkpoint_like_the_reference(runtime, source, converted):
    """The evaluation engine on a converted DCLM checkpoint gives the OpenLM model's own
    log-likelihoods: the zero rows added to divide the vocabulary over TP take no probability."""
    from megatron_vlm.evaluation.engine import EvalModel

    engine = EvalModel.from_checkpoint(converted)
    assert engine.vocab_size == PADDED and engine.output_vocab == VOCAB
    tokens = random_tokens(seed=5, batch=3, seq=20)
    rows = [tokens[0].tolist(), tokens[1, :11].tolist(), tokens[2, :6].tolist()]
    scored = engine.score_tokens(rows, batch_size=2)
    reference = torch.log_softmax(openlm_logits(source[1], tokens, HEADS).double(), dim=-1)
    for i, (logp, greedy) in enumerate(scored):
        n = len(rows[i]) - 1
        expected = reference[i, :n].gather(-1, tokens[i, 1:n + 1].unsqueeze(-1)).squeeze(-1)
        assert float((torch.from_numpy(logp) - expected).abs().max()) < 1e-4
        assert (torch.from_numpy(greedy) == (reference[i, :n].argmax(-1) == tokens[i, 1:n + 1])).all()


@pytest.mark.slow  # torchrun launches; TP=1 stays in the default tier
def test_logits_match_reference_at_tp2_and_pp2(source, converted, tmp_path):
    proc = torchrun("tests/scripts/convert_check.py",
                    ["--openlm", str(source[0]), "--converted", str(converted), "--workdir",
                     str(tmp_path), "--vocab", str(VOCAB), "--num-heads", str(HEADS)],
                    nproc=2, module=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    result = last_json(proc.stdout)
    # Saved at TP=PP=1 and resharded on load; or saved by each rank at TP=2 / PP=2.
    for key in ("tp2", "tp2_torchrun", "pp2", "pp2_torchrun"):
        assert result[key] <= 1e-5, (key, result)
    assert result["padded_logits_max"] == 0.0
    assert result["tp2_torchrun_saved_layout"] == {"tensor_parallel": 2, "pipeline_parallel": 1}
    assert result["pp2_torchrun_saved_layout"] == {"tensor_parallel": 1, "pipeline_parallel": 2}
    assert result["tp2_model_vocab"] == PADDED and result["pp2_torchrun_model_vocab"] == VOCAB
    assert result["tp2_torchrun_schedule_step"] == 40


# ------------------------------------------------------------------------------------- metadata


def test_converted_checkpoint_records_schedule_source_and_tokenizer(converted, source):
    from megatron_vlm.training.checkpointing import read_common
    from megatron_vlm.training.schedule import ScheduleMetadata

    common = read_common(converted)
    meta = ScheduleMetadata.from_dict(common["schedule"])
    assert (meta.step, meta.total_steps, meta.warmup_steps) == (40, 100, 10)  # step from epoch_3
    assert (meta.peak_lr, meta.final_lr, meta.decay_style) == (3e-3, 1e-5, "cosine")
    assert common["step"] == 40 and common["fraction"] == 0.4
    assert common["loader"] == {"consumed_global_batches": 0}
    assert common["contents"] == ["model"]
    assert common["config"]["model"]["decoder"]["vocab_size"] == PADDED
    assert common["config"]["parallel"]["tensor_parallel"] == 2
    src = common["source"]
    assert src["path"] == str(source[0].resolve()) and src["format"] == "openlm"
    assert re.fullmatch(r"[0-9a-f]{64}", src["sha256"])
    assert src["vocab_size"] == VOCAB and src["percentage_of_data_seen"] == 40.0
    assert common["tokenizer"]["vocab_size"] == 400 and common["tokenizer"]["eos_id"] == 0
    assert common["projector"] == {"initialized": True, "seed": 1234}


@pytest.mark.slow  # a training after a conversion
def test_converted_checkpoint_continues_its_schedule_in_pretrain(converted, continued):
    from megatron_vlm.training.checkpointing import read_common
    from megatron_vlm.training.schedule import ScheduleMetadata

    run, log = continued
    meta = ScheduleMetadata.from_dict(read_common(converted)["schedule"])
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1
    assert lines[0]["lr"] == pytest.approx(meta.lr, rel=1e-12)  # the source run's LR at step 40
    assert "from its step 40/100" in log and "(weights only)" in log


@pytest.mark.parametrize("given,expected", [
    (dict(step=30, total_steps=100), (30, 100)),
    (dict(fraction=0.8, total_steps=1000), (800, 1000)),
    (dict(step=400, fraction=0.2), (400, 2000)),
])
def test_schedule_metadata_from_step_total_or_fraction(given, expected):
    args = ScheduleArgs(warmup_steps=5, peak_lr=1e-2, final_lr=1e-5, **given)
    meta = schedule_metadata(args)
    assert (meta.step, meta.total_steps) == expected and meta.mode == "warmup_cosine"


def test_schedule_metadata_refuses_to_guess():
    with pytest.raises(ValueError) as err:
        schedule_metadata(ScheduleArgs(fraction=0.5, peak_lr=1e-2), checkpoint_step=None,
                          data_seen=50.0)
    message = str(err.value)
    for missing in ("--step", "--total-steps", "--warmup-steps", "--final-lr",
                    "percentage_of_data_seen=50"):
        assert missing in message
    assert "--peak-lr" not in message
    with pytest.raises(ValueError, match="disagrees"):
        schedule_metadata(ScheduleArgs(step=30, total_steps=100, fraction=0.5, warmup_steps=1,
                                       peak_lr=1e-2, final_lr=0.0))


def test_tokenizer_check_reports_and_enforces_neox_eos(tmp_path, caplog):
    good = check_tokenizer(write_tokenizer(tmp_path / "a.json", 300), 501)
    assert (good.vocab_size, good.eos_id) == (300, 0)
    other = write_tokenizer(tmp_path / "b.json", 300, eos_id=7)
    with pytest.raises(ValueError, match="--allow-other-eos"):
        check_tokenizer(other, 501)
    assert check_tokenizer(other, 501, allow_other_eos=True).eos_id == 7
    assert "allowed by --allow-other-eos" in caplog.text


# ------------------------------------------------------------------------------------- round trips


def test_openlm_megatron_openlm_is_bitwise(runtime, source, converted, tmp_path):
    from safetensors.torch import load_file

    from megatron_vlm.convert.megatron_io import export_openlm

    summary = export_openlm(converted, tmp_path / "export")
    assert summary["vocab_size"] == VOCAB  # the TP padding is dropped again
    back = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert back.keys() == source[1].keys()
    for key, value in source[1].items():
        assert torch.equal(back[key], value), key


def test_megatron_openlm_megatron_is_bitwise(runtime, continued, tmp_path):
    """A trained checkpoint (2 steps of pretrain_vlm.py) out to OpenLM safetensors and back."""
    from safetensors.torch import load_file

    from megatron_vlm.convert.megatron_io import convert_openlm, export_openlm

    trained = continued[0] / "checkpoints" / "step_0000002"
    export_openlm(trained, tmp_path / "export", layout="hf")
    exported = tmp_path / "export" / "model.safetensors"
    assert all(k.startswith("model.") for k in load_file(str(exported)))
    convert_openlm(exported, tmp_path / "back", projector=str(tmp_path / "export" /
                                                               "projector.safetensors"),
                   schedule=None, hash_files=False)
    model, before = checkpoint_weights(trained)
    _, after = checkpoint_weights(tmp_path / "back")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # The exported decoder computes the trained model's logits under the reference.
    tokens = random_tokens(seed=9)
    with torch.no_grad():
        logits = model(tokens)
    reference = openlm_logits(load_file(str(exported)), tokens, HEADS)
    assert float((logits - reference).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------------- layout


def test_qkv_rows_regroup_per_head():
    heads, hd, d = 3, 2, 1
    rows = torch.arange(3 * heads * hd, dtype=torch.float32).reshape(-1, d)  # [Q; K; V]
    grouped = openlm.qkv_openlm_to_megatron(rows, heads).flatten().tolist()
    q, k, v = (list(range(i * heads * hd, (i + 1) * heads * hd)) for i in range(3))
    expected = []
    for h in range(heads):
        expected += q[h * hd:(h + 1) * hd] + k[h * hd:(h + 1) * hd] + v[h * hd:(h + 1) * hd]
    assert grouped == expected
    assert torch.equal(openlm.qkv_megatron_to_openlm(openlm.qkv_openlm_to_megatron(rows, heads),
                                                     heads), rows)


def test_megatron_shape_table_matches_the_built_decoder(runtime):
    model = tiny_model()
    built = {n: tuple(p.shape) for n, p in model.named_parameters()
             if n.startswith("language_model.")}
    assert built == openlm.megatron_decoder_shapes(LAYERS, D, FFN, PADDED)


@pytest.mark.parametrize("recipe,layers,d,heads,tp,count", [
    ("1b", 24, 2048, 16, 1, 1_439_893_504),
    ("7b", 32, 4096, 32, 2, None),
])
def test_dclm_shapes_convert_on_the_meta_device(recipe, layers, d, heads, tp, count):
    from megatron_vlm.convert.megatron_io import converted_config
    from megatron_vlm.model.param_count import decoder_parameters

    shape = openlm.OpenLMShape(layers, d, heads, 50432, openlm.swiglu_hidden(d), True)
    state = {f"module._orig_mod.{k}": torch.empty(s, device="meta")
             for k, s in openlm.openlm_shapes(shape, with_inv_freq=True).items()}
    state = openlm.strip_prefixes(state)
    if recipe == "1b":  # REFERENCE.md's table
        assert state["layers.3.attention.in_proj.weight"].shape == (6144, 2048)
        assert state["layers.3.feed_forward.w12.weight"].shape == (11264, 2048)
        assert state["layers.3.feed_forward.w3.weight"].shape == (2048, 5632)
        assert state["layers.3.attention.pos_embed.inv_freq"].shape == (64,)
    assert openlm.infer_shape(state) == shape  # heads from the inv_freq buffers
    cfg = converted_config(shape, tp)
    assert cfg.name == recipe
    dec = cfg.model.decoder
    mapped = openlm.openlm_to_megatron(state, shape, dec.vocab_size)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == openlm.megatron_decoder_shapes(
        layers, d, dec.resolved_ffn_hidden_size(), dec.vocab_size)
    total = sum(v.numel() for v in mapped.values())
    assert total == decoder_parameters(dec)
    if count is not None:
        assert total == count


def test_safetensors_and_bare_state_dicts_read_like_epoch_files(source, tmp_path):
    from safetensors.torch import save_file

    state = source[1]
    save_file({f"model.{k}": v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "bare.pt")
    for path, fmt in ((tmp_path / "model.safetensors", "safetensors"), (tmp_path, "safetensors"),
                      (tmp_path / "bare.pt", "state_dict")):
        read, info = openlm.read_openlm(path, hash_files=False)
        assert info.format == fmt and read.keys() == state.keys()
        assert all(torch.equal(read[k], state[k]) for k in state)
    read, info = openlm.read_openlm(source[0], hash_files=False)
    assert (info.step, info.epoch, info.percentage_of_data_seen) == (40, 3, 40.0)


# ------------------------------------------------------------------------------------- malformed


def _broken(state, kind):
    state = dict(state)
    if kind == "missing":
        del state["layers.1.attention.k_norm.weight"]
        return state, "layers.1.attention.k_norm.weight"
    if kind == "shape":
        state["layers.0.feed_forward.w12.weight"] = state["layers.0.feed_forward.w12.weight"][:-2]
        return state, "layers.0.feed_forward.w12.weight"
    if kind == "prefix":
        return {f"transformer.{k}": v for k, v in state.items()}, "transformer.tok_embeddings.weight"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "shape", "prefix"])
def test_malformed_checkpoints_stop_with_one_error_naming_the_key(runtime, source, tmp_path, kind):
    from megatron_vlm.convert.megatron_io import convert_openlm

    state, key = _broken(source[1], kind)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        convert_openlm(tmp_path / "bad.pt", tmp_path / "out", num_heads=HEADS, schedule=None,
                       hash_files=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_embedding_is_an_error(runtime, source, tmp_path):
    from megatron_vlm.convert.megatron_io import convert_openlm

    tok = write_tokenizer(tmp_path / "tokenizer.json", 600)
    with pytest.raises(ValueError, match=r"'tok_embeddings\.weight' has 501 rows.*600 tokens"):
        convert_openlm(source[0], tmp_path / "out", tokenizer=tok, schedule=None,
                       hash_files=False)


def test_decoder_shape_overrides_and_occupied_output_are_refused(runtime, source, tmp_path):
    from megatron_vlm.convert.megatron_io import convert_openlm

    with pytest.raises(ValueError, match="model.decoder.hidden_size comes from the checkpoint"):
        convert_openlm(source[0], tmp_path / "out", overrides=["model.decoder.hidden_size=32"],
                       schedule=None, hash_files=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="--overwrite"):
        convert_openlm(source[0], tmp_path / "full", schedule=None, hash_files=False)
