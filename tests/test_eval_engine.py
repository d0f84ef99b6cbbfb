"""The inference engine (megatron_vlm.evaluation.engine) on a tiny random checkpoint.

Every expectation comes from plain forward passes of the same model (``model(tokens)``
logits, no cache): scoring is the log-softmax of one forward; greedy generation is the argmax
of a full forward re-run after every token. So a KV cache that is not advanced, a wrong rotary
position, left padding, a misplaced image or a batch that leaks between rows all show up as
different tokens or log-probabilities. The parallel layouts run under torchrun (gloo, CPU).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from distributed import last_json, torchrun
from evaluation_helpers import save_tiny_checkpoint

N_IMG, D_ENC, VOCAB, MAX_LEN = 16, 32, 512, 96  # the tiny recipe with TINY_EVAL_OVERRIDES


@pytest.fixture(scope="module")
def checkpoint(runtime, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval_engine") / "step_0000000")


@pytest.fixture(scope="module")
def engine(checkpoint):
    from megatron_vlm.evaluation.engine import EvalModel

    return EvalModel.from_checkpoint(checkpoint)


def make_prompts(seed: int = 0):
    """Seven prompts of different lengths, four with images (all different): sorted longest
    first, batches of 3 mix image and text rows, and a batch of 6 spans lengths 11 to 32."""
    from megatron_vlm.evaluation.engine import Prompt

    g = torch.Generator().manual_seed(seed)
    spec = [(3, True), (11, False), (1, True), (25, False), (7, True), (2, False), (16, True)]
    return [Prompt(torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                   torch.randn(N_IMG, D_ENC, generator=g) if image else None)
            for n, image in spec]


def direct_logits(engine, prompt_tokens, image=None) -> torch.Tensor:
    """float32 [n, vocab] logits of one unpadded row, image positions first (no cache)."""
    n_img = 0 if image is None else N_IMG
    tokens = torch.tensor([[0] * n_img + list(prompt_tokens)])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, :n_img] = True
    with torch.no_grad():
        logits = engine.model(tokens, image_mask=mask,
                              image_embeddings=None if image is None else image[None])
    return logits[0].float()


def reference_generation(engine, prompt, max_new_tokens, stop_ids=()):
    """Greedy decoding by re-running the whole forward after every token (no KV cache)."""
    n_img = 0 if prompt.image is None else N_IMG
    ids, out = list(prompt.tokens), []
    for _ in range(min(max_new_tokens, MAX_LEN - n_img - len(ids))):
        token = int(direct_logits(engine, ids, prompt.image)[-1].argmax())
        if token in stop_ids:
            return out, "stop"
        out.append(token)
        ids.append(token)
    return out, "length"


# --------------------------------------------------------------------------------- scoring


def test_score_tokens_equals_log_softmax_of_a_direct_forward(engine):
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 30, 2, 17, 60)]
    # Rows that continue greedily, so that some targets are the argmax.
    for prompt in make_prompts()[1::2]:
        rows.append(prompt.tokens + reference_generation(engine, prompt, 6)[0])
    scored = engine.score_tokens(rows, batch_size=2)
    assert len(scored) == len(rows)
    flags = []
    for row, (logp, greedy) in zip(rows, scored):
        full = torch.log_softmax(direct_logits(engine, row[:-1]), dim=-1)
        targets = torch.tensor(row[1:])
        expected = full.gather(1, targets[:, None])[:, 0].numpy()
        assert logp.dtype == np.float64 and logp.shape == (len(row) - 1,)
        assert greedy.dtype == np.bool_ and greedy.shape == (len(row) - 1,)
        np.testing.assert_allclose(logp, expected, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(greedy, (full.argmax(-1) == targets).numpy())
        flags.extend(greedy.tolist())
    assert any(flags) and not all(flags)


def test_score_tokens_rejects_bad_rows_naming_them(engine):
    with pytest.raises(ValueError, match=r"row 1 has 97 tokens.*max_seq_length=96"):
        engine.score_tokens([[1, 2], list(range(97))])
    with pytest.raises(ValueError, match="row 0 must be a sequence of at least 2"):
        engine.score_tokens([[5]])
    with pytest.raises(ValueError, match=r"row 2: token id 512 is outside the vocabulary"):
        engine.score_tokens([[1, 2], [3, 4], [5, 512]])
    assert engine.score_tokens([]) == []


# ------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("batch_size", [3, 6])
def test_generate_batched_equals_one_at_a_time(engine, batch_size):
    prompts = make_prompts()
    alone = engine.generate(prompts, max_new_tokens=10, batch_size=1, first_logprobs=True)
    batched = engine.generate(prompts, max_new_tokens=10, batch_size=batch_size,
                              first_logprobs=True)
    for one, many in zip(alone, batched):
        assert many.tokens == one.tokens and many.stop == one.stop
        torch.testing.assert_close(many.first_logprobs, one.first_logprobs, atol=1e-4, rtol=0)
    # A random model still varies from prompt to prompt (else the check above is weak).
    assert len({tuple(g.tokens) for g in alone}) == len(prompts)


def test_generate_equals_a_no_cache_reference(engine):
    prompts = make_prompts(seed=1)
    out = engine.generate(prompts, max_new_tokens=12, batch_size=len(prompts))
    for prompt, generation in zip(prompts, out):
        assert (generation.tokens, generation.stop) == reference_generation(engine, prompt, 12)
        assert generation.first_logprobs is None


def test_first_logprobs_are_the_last_prompt_position_of_a_direct_forward(engine):
    prompts = make_prompts(seed=2)
    out = engine.generate(prompts, max_new_tokens=2, batch_size=4, first_logprobs=True)
    for prompt, generation in zip(prompts, out):
        expected = torch.log_softmax(direct_logits(engine, prompt.tokens, prompt.image)[-1], -1)
        first = generation.first_logprobs
        assert first.dtype == torch.float32 and first.shape == (VOCAB,)
        assert first.device.type == "cpu"
        torch.testing.assert_close(first, expected, atol=1e-4, rtol=0)
        assert generation.tokens[0] == int(expected.argmax())


def test_generation_stops_at_a_stop_id_without_including_it(engine):
    prompts = make_prompts(seed=4)
    free, _ = reference_generation(engine, prompts[0], 10)
    # The first token that did not occur earlier, at least 2 tokens in.
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stop_ids = [free[k], VOCAB - 1]
    out = engine.generate(prompts, max_new_tokens=10, stop_ids=stop_ids, batch_size=4)
    assert out[0].tokens == free[:k] and out[0].stop == "stop"
    for prompt, generation in zip(prompts, out):  # the other rows stop at their own time
        assert (generation.tokens, generation.stop) == reference_generation(
            engine, prompt, 10, stop_ids)


def test_length_limits_per_row_and_at_max_length(engine):
    from megatron_vlm.evaluation.engine import Prompt

    short = make_prompts(seed=5)[1]
    g = torch.Generator().manual_seed(6)
    near_full = Prompt(torch.randint(0, VOCAB, (MAX_LEN - 4,), generator=g).tolist())
    out = engine.generate([short, near_full], max_new_tokens=7, batch_size=2)
    assert len(out[0].tokens) == 7 and out[0].stop == "length"
    # 92 prompt positions: 4 tokens fill the model's 96 positions.
    assert len(out[1].tokens) == 4 and out[1].stop == "length"
    assert (out[1].tokens, "length") == reference_generation(engine, near_full, 7)
    assert (out[0].tokens, "length") == reference_generation(engine, short, 7)


def test_generate_rejects_bad_prompts_naming_them(engine):
    from megatron_vlm.evaluation.engine import Prompt

    good = Prompt([1, 2, 3])
    with pytest.raises(ValueError, match=r"prompt 1: image embedding has shape \(8, 32\)"):
        engine.generate([good, Prompt([1], torch.randn(8, D_ENC))])
    with pytest.raises(ValueError, match=r"prompt 0 has 96 positions \(16 image \+ 80 tokens\)"):
        engine.generate([Prompt([1] * 80, torch.randn(N_IMG, D_ENC))])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([good, Prompt([])])
    with pytest.raises(ValueError, match="prompt 0: token id -1"):
        engine.generate([Prompt([-1])])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        engine.generate([good], max_new_tokens=0)
    assert engine.generate([]) == []


# --------------------------------------------------------------------------------- loading


def test_checkpoint_of_another_shape_is_a_clear_error(checkpoint):
    from megatron_vlm.evaluation.engine import EvalModel

    with pytest.raises(ValueError, match=r"model.decoder.hidden_size=64 but this run has 128"):
        EvalModel.from_checkpoint(checkpoint, ["model.decoder.hidden_size=128"])
    # A projector of another width: megatron's loader raises a BaseException naming the key.
    with pytest.raises(ValueError, match=r"its projector.encoder.linear_fc1.weight is "
                                         r"torch.Size\(\[128, 32\]\), the config builds"):
        EvalModel.from_checkpoint(checkpoint, ["model.projector.hidden_multiplier=2"])
    # No shape changes, but the checkpoint's q/k norm gains would be dropped silently.
    with pytest.raises(ValueError, match=r"model.decoder.qk_norm=True but this run has False"):
        EvalModel.from_checkpoint(checkpoint, ["model.decoder.qk_norm=false"])


def test_overrides_apply_and_a_checkpoints_directory_resolves(checkpoint):
    from megatron_vlm.evaluation.engine import EvalModel

    (checkpoint.parent / "latest").write_text(checkpoint.name)
    loaded = EvalModel.from_checkpoint(checkpoint.parent, ["model.decoder.max_seq_length=64",
                                                           "train.seq_length=64"])
    assert loaded.checkpoint == checkpoint and loaded.max_length == 64
    assert loaded.num_image_tokens == N_IMG and not loaded.model.training


def test_checkpoint_without_config_is_a_clear_error(checkpoint, tmp_path):
    from megatron_vlm.evaluation.engine import EvalModel

    copy = tmp_path / "no_config"
    shutil.copytree(checkpoint, copy)
    common = json.loads((copy / "common.json").read_text())
    del common["config"]
    (copy / "common.json").write_text(json.dumps(common))
    with pytest.raises(ValueError, match=r"no_config/common.json has no 'config'"):
        EvalModel.from_checkpoint(copy)


@pytest.mark.parametrize("fault", ["truncated", "missing", "no_index", "bad_index"])
def test_damaged_checkpoint_is_one_clear_line(checkpoint, tmp_path, fault):
    """A data file cut short or gone, or the index gone or garbled: one line naming the
    checkpoint and the file, before torch's loader fails deep inside with a long traceback."""
    from megatron_vlm.evaluation.engine import EvalModel

    copy = tmp_path / "damaged"
    shutil.copytree(checkpoint, copy)
    data = sorted(copy.glob("*.distcp"))[-1]
    if fault == "truncated":
        size = data.stat().st_size
        with open(data, "r+b") as f:
            f.truncate(size - 100)
        match = rf"checkpoint .*damaged is incomplete: {data.name} has {size - 100:,} bytes"
    elif fault == "missing":
        data.unlink()
        match = rf"checkpoint .*damaged is incomplete: {data.name} is missing"
    elif fault == "no_index":
        (copy / ".metadata").unlink()
        match = r"checkpoint .*damaged is incomplete: its index .metadata is missing"
    else:
        (copy / ".metadata").write_bytes(b"not a pickle")
        match = r"checkpoint .*damaged: its index .metadata cannot be read"
    with pytest.raises(ValueError, match=match):
        EvalModel.from_checkpoint(copy)


# ------------------------------------------------------------------------ parallel layouts


@pytest.mark.slow  # torchrun launches; test_lm_eval_adapter covers the engine end to end
@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 2)])
def test_parallel_layout_matches_one_process(engine, checkpoint, tmp_path, tp, pp):
    prompts = make_prompts(seed=7)
    g = torch.Generator().manual_seed(8)
    rows = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 2, 40, 23)]
    rows.append(prompts[1].tokens + reference_generation(engine, prompts[1], 5)[0])
    free, _ = reference_generation(engine, prompts[2], 8)
    cases = {"rows": rows, "max_new_tokens": 8, "batch_size": 3, "stop_ids": [free[3]],
             "prompts": [{"tokens": p.tokens, "image": None if p.image is None
                          else p.image.tolist()} for p in prompts]}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = torchrun("tests/scripts/eval_engine_parallel.py",
                    ["--checkpoint", str(checkpoint), "--cases", str(tmp_path / "cases.json"),
                     "--tp", str(tp), "--pp", str(pp)], nproc=tp * pp, module=False, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = last_json(proc.stdout)
    assert result["world"] == tp * pp and result["ranks_agree"]

    scores = engine.score_tokens(rows, batch_size=3)
    for (logp, greedy), (their_logp, their_greedy) in zip(scores, result["score"]):
        np.testing.assert_allclose(their_logp, logp, atol=1e-4, rtol=0)
        assert their_greedy == greedy.tolist()
    assert any(flag for _, flags in result["score"] for flag in flags)
    generations = engine.generate(prompts, max_new_tokens=8, stop_ids=[free[3]], batch_size=3,
                                  first_logprobs=True)
    for mine, theirs in zip(generations, result["generate"]):
        assert theirs["tokens"] == mine.tokens and theirs["stop"] == mine.stop
        np.testing.assert_allclose(theirs["first_logprobs"], mine.first_logprobs.numpy(),
                                   atol=1e-4, rtol=0)
    assert "stop" in {g.stop for g in generations}


def test_online_encoder_generation_runs_the_checkpoints_encoder_on_pixels(runtime, tmp_path):
    """With model.encoder.mode=online (the unfrozen-encoder ablation) prompts carry pixels that
    the checkpoint's own encoder embeds: generation equals a no-cache reference forward on the
    same pixels, batched or one at a time."""
    from megatron_vlm.evaluation.engine import EvalModel, Prompt

    checkpoint = save_tiny_checkpoint(tmp_path / "online", ["model.encoder.mode=online"])
    engine = EvalModel.from_checkpoint(checkpoint)
    assert engine.model.vision_encoder is not None
    g = torch.Generator().manual_seed(4)
    prompts = [Prompt(torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                      torch.randn(3, 56, 56, generator=g) if image else None)
               for n, image in [(4, True), (9, False), (2, True)]]
    batched = engine.generate(prompts, max_new_tokens=6, batch_size=3)
    alone = engine.generate(prompts, max_new_tokens=6, batch_size=1)
    for prompt, many, one in zip(prompts, batched, alone):
        assert many.tokens == one.tokens
        n_img = 0 if prompt.image is None else N_IMG
        ids, expected = list(prompt.tokens), []
        for _ in range(6):
            tokens = torch.tensor([[0] * n_img + ids])
            mask = torch.zeros_like(tokens, dtype=torch.bool)
            mask[0, :n_img] = True
            with torch.no_grad():
                logits = engine.model(tokens, image_mask=mask,
                                      images=None if prompt.image is None else prompt.image[None])
            expected.append(int(logits[0, -1].argmax()))
            ids.append(expected[-1])
        assert many.tokens == expected
