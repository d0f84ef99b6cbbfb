"""The lm-eval adapter (megatron_vlm.evaluation.lm_eval_adapter), the CLI (python -m
megatron_vlm.lm_eval) and the text suites, on a tiny random checkpoint with ShapesWorld's
tokenizer.

Every log-likelihood is checked against a reference computed here from the text alone: the
request encoded, one unpadded forward pass of the same model, log_softmax summed over the
continuation. Tests run on two stand-ins for the model: ``direct`` (tests/scripts/
lm_eval_parallel.DirectEngine, the model's plain forward pass) always, and the inference engine
(megatron_vlm.evaluation.engine.EvalModel) once it is implemented.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distributed import REPO, free_port, torchrun
from evaluation_helpers import save_tiny_checkpoint

_spec = importlib.util.spec_from_file_location("lm_eval_parallel",
                                               REPO / "tests" / "scripts" / "lm_eval_parallel.py")
lm_eval_parallel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm_eval_parallel)
DirectEngine = lm_eval_parallel.DirectEngine
requests_from = lm_eval_parallel.requests_from

MAX_LENGTH = 96  # the tiny eval checkpoint's model.decoder.max_seq_length
LONG_CONTEXT = " ".join(["The red circle is to the left of the blue square."] * 12)
REQUESTS = [
    ["Question: What is 4 plus 13?\nAnswer:", " 17"],
    ["", "The red circle"],  # empty context: EOS conditions the continuation
    ["The blue square is to the left of", " the green triangle."],
    [LONG_CONTEXT, " yes"],  # longer than max_length: truncated on the left
    ["Ana has a blue circle and a red square.\nQuestion: How many shapes?\nAnswer:", " 2"],
    ["a", "b c d e f g"],
    ["Question: What is 4 plus 13?\nAnswer:", " 21"],
]
ROLLING = ["The red circle is to the left of the blue square.",
           " ".join(["Hana has a yellow circle and three yellow squares."] * 25),  # 3+ windows
           ""]


def engine_ready() -> bool:
    """Whether megatron_vlm.evaluation.engine is implemented (not the interface stub)."""
    from megatron_vlm.evaluation import engine

    return "NotImplementedError" not in inspect.getsource(engine.EvalModel)


needs_engine = pytest.mark.skipif(not engine_ready(),
                                  reason="megatron_vlm.evaluation.engine is still a stub")


@pytest.fixture(scope="module")
def shapesworld(tmp_path_factory):
    from megatron_vlm.synthetic import ShapesWorldConfig, generate

    out = tmp_path_factory.mktemp("lm_eval") / "sw"
    generate(str(out), ShapesWorldConfig(), progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer(shapesworld):
    from megatron_vlm.data.tokenizer import load_tokenizer

    return load_tokenizer(shapesworld / "tokenizer" / "tokenizer.json")


@pytest.fixture(scope="module")
def checkpoint(runtime, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("lm_eval_ckpt") / "ckpt")


@pytest.fixture(scope="module")
def direct(checkpoint):
    return DirectEngine.from_checkpoint(checkpoint)


@pytest.fixture(scope="module", params=["direct", pytest.param("engine", marks=needs_engine)])
def lm(request, direct, checkpoint, tokenizer):
    """The adapter on each stand-in (batches of 3 rows, so several batches are scored)."""
    from megatron_vlm.evaluation.lm_eval_adapter import MegatronVLMLM

    if request.param == "direct":
        model = direct
    else:
        from megatron_vlm.evaluation.engine import EvalModel

        model = EvalModel.from_checkpoint(checkpoint)
    return MegatronVLMLM(model, tokenizer, batch_size=3)


# ---------------------------------------------------------------------- references


def close(value, want, tolerance=1e-5):
    """Equal up to ``tolerance`` plus float32 rounding of a sum as large as ``want`` (the
    engine's vocab-parallel log-softmax rounds differently from torch.log_softmax)."""
    return abs(value - want) <= tolerance + 1e-6 * abs(want)


def reference_row_score(direct, row, n_scored):
    """(sum of the last ``n_scored`` tokens' log-probabilities, all greedy) by one unpadded
    forward pass (log-softmax in float64)."""
    logprobs = torch.log_softmax(direct.logits(torch.tensor([row]))[0].double(), dim=-1)
    total, greedy = 0.0, True
    for pos in range(len(row) - n_scored, len(row)):
        total += float(logprobs[pos - 1, row[pos]])
        greedy &= int(logprobs[pos - 1].argmax()) == row[pos]
    return total, greedy


def reference_loglikelihood(direct, tokenizer, context, continuation):
    if context:
        whole = tokenizer.encode(context + continuation)
        context_ids = tokenizer.encode(context)
        continuation_ids = whole[len(context_ids):]
    else:
        context_ids, continuation_ids = [tokenizer.eos_id], tokenizer.encode(continuation)
    row = (context_ids + continuation_ids)[-MAX_LENGTH:]
    return reference_row_score(direct, row, len(continuation_ids))


def reference_rolling(direct, tokenizer, text):
    """Every token of ``[EOS] + text`` after the first scored once, with the longest context
    that fits: windows of ``MAX_LENGTH`` tokens ending every ``MAX_LENGTH - 1`` tokens."""
    seq = [tokenizer.eos_id] + tokenizer.encode(text)
    last, ends = len(seq) - 1, []
    while not ends or ends[-1] < last:
        ends.append(min((ends[-1] if ends else 0) + MAX_LENGTH - 1, last))
    total, previous = 0.0, 0
    for end in ends:
        if end == previous:  # empty text: nothing to score
            break
        total += reference_row_score(direct, seq[max(0, end - MAX_LENGTH + 1):end + 1],
                                     end - previous)[0]
        previous = end
    return total


def greedy_request(direct, tokenizer):
    """A (context, continuation) whose one continuation token is the model's argmax."""
    for context in ("The red circle", "Question: What is 4 plus 13?\nAnswer:", "Ana has",
                    "The blue", "yes", "12 plus 19 is"):
        ids = tokenizer.encode(context)
        best = int(direct.logits(torch.tensor([ids]))[0, -1].argmax())
        continuation = tokenizer.decode([best])
        if tokenizer.encode(context + continuation)[len(ids):] == [best]:
            return [context, continuation]
    pytest.fail("no context found whose greedy token re-encodes to itself")


@pytest.fixture(scope="module")
def cases(direct, tokenizer):
    """The requests (one of them greedy) and their reference (logprob, is_greedy)."""
    pairs = REQUESTS[:3] + [greedy_request(direct, tokenizer)] + REQUESTS[3:]
    expected = [reference_loglikelihood(direct, tokenizer, c, x) for c, x in pairs]
    assert any(g for _, g in expected) and not all(g for _, g in expected)
    return pairs, expected


# ---------------------------------------------------------------------- in-process tests


def test_loglikelihood_equals_direct_forward(lm, cases):
    pairs, expected = cases
    got = lm.loglikelihood(requests_from(pairs), disable_tqdm=True)
    assert len(got) == len(expected)
    for i, ((logprob, greedy), (want, want_greedy)) in enumerate(zip(got, expected)):
        assert close(logprob, want), (i, pairs[i], logprob, want)
        assert greedy == want_greedy, (i, pairs[i])


def test_loglikelihood_batches_longest_first(direct, tokenizer, cases):
    from megatron_vlm.evaluation.lm_eval_adapter import MegatronVLMLM

    lm = MegatronVLMLM(direct, tokenizer, batch_size=3)
    direct.calls.clear()
    lm.loglikelihood(requests_from(cases[0]), disable_tqdm=True)
    lengths = [len(row) for call in direct.calls for row in call]
    assert [len(call) for call in direct.calls] == [3, 3, 2]
    assert lengths == sorted(lengths, reverse=True)
    assert max(lengths) == MAX_LENGTH  # the long request, left-truncated


def test_encode_pair_moves_trailing_spaces_to_the_continuation(lm, tokenizer):
    context_ids, continuation_ids = lm.encode_pair("Answer: ", "17")
    assert context_ids == tokenizer.encode("Answer:")
    assert continuation_ids == tokenizer.encode("Answer: 17")[len(context_ids):]
    assert lm.encode_pair("", "17") == ([tokenizer.eos_id], tokenizer.encode("17"))


def test_loglikelihood_rolling_scores_every_token_once(lm, direct, tokenizer):
    got = lm.loglikelihood_rolling(requests_from([[t] for t in ROLLING]), disable_tqdm=True)
    assert len(tokenizer.encode(ROLLING[1])) > 2 * MAX_LENGTH
    for text, value in zip(ROLLING, got):
        assert close(value, reference_rolling(direct, tokenizer, text)), text[:40]
    assert got[2] == 0.0


def test_generate_until_is_greedy_and_cut_at_until(lm, direct, tokenizer):
    from megatron_vlm.evaluation.engine import Prompt

    contexts = ["The red circle", "Question: What is 4 plus 13?\nAnswer:", "Ana has"]
    full = [tokenizer.decode(g.tokens) for g in direct.generate(
        [Prompt(tokens=tokenizer.encode(c)) for c in contexts], max_new_tokens=8,
        stop_ids=[tokenizer.eos_id])]
    cut = full[0][4:6]  # a stop string that does occur in the first answer
    assert cut and len(full[0]) > 6
    kwargs = [{"until": [cut], "max_gen_toks": 8}, {"until": ["\u2603"], "max_gen_toks": 8},
              {"until": ["\u2603"], "max_gen_toks": 5}]
    got = lm.generate_until([SimpleNamespace(args=(c, k), task_name="g", doc_id=i)
                             for i, (c, k) in enumerate(zip(contexts, kwargs))],
                            disable_tqdm=True)
    assert got[0] == full[0].split(cut)[0]
    assert got[1] == full[1]
    five = direct.generate([Prompt(tokens=tokenizer.encode(contexts[2]))], max_new_tokens=5,
                           stop_ids=[tokenizer.eos_id])[0].tokens
    assert got[2] == tokenizer.decode(five)


def test_generate_until_stops_at_end_of_text(direct, tokenizer):
    """A generation that reaches end-of-text ends there, not after max_gen_toks: the text is cut
    at the end-of-text string either way, so only the tokens decoded show that EOS is a stop id.
    End-of-text is moved to a token the model generates early, one whose text does not encode
    back to it (as sentencepiece's "</s>" does not): lm-eval adds the end-of-text string to
    `until`, and a one-token stop string would stop generation there without the id."""
    from megatron_vlm.evaluation.engine import Prompt
    from megatron_vlm.evaluation.lm_eval_adapter import MegatronVLMLM

    class Recording:
        """The engine, keeping every generation it returns."""

        def __init__(self, engine):
            self.engine, self.max_length, self.generations = engine, engine.max_length, []

        def generate(self, prompts, **kwargs):
            out = self.engine.generate(prompts, **kwargs)
            self.generations += out
            return out

    class EarlyEnd:
        """The tokenizer with another end-of-text id."""

        def __init__(self, tok, eos_id):
            self._tok, self.eos_id = tok, eos_id

        def __getattr__(self, name):
            return getattr(self._tok, name)

    context = "The red circle"
    free = direct.generate([Prompt(tokens=tokenizer.encode(context))], max_new_tokens=8)[0].tokens
    end = next(i for i in range(1, len(free)) if free[i] not in free[:i]  # emitted there first
               and tokenizer.encode(tokenizer.decode([free[i]])) != [free[i]])
    engine = Recording(direct)
    lm = MegatronVLMLM(engine, EarlyEnd(tokenizer, free[end]), batch_size=3)
    lm.generate_until([SimpleNamespace(args=(context, {"until": ["\u2603"], "max_gen_toks": 8}),
                                       task_name="g", doc_id=0)], disable_tqdm=True)
    assert [(g.tokens, g.stop) for g in engine.generations] == [(free[:end], "stop")]


def test_bad_requests_name_the_request(lm):
    from megatron_vlm.evaluation.lm_eval_adapter import MegatronVLMLM

    with pytest.raises(ValueError, match=r"loglikelihood request 1 \(task t, doc 1\).*no tokens"):
        lm.loglikelihood(requests_from([["a", " b"], ["a", ""]]), disable_tqdm=True)
    with pytest.raises(ValueError, match=r"request 0 .*at most 95 fit"):
        lm.loglikelihood(requests_from([["a", " b" * 200]]), disable_tqdm=True)
    with pytest.raises(ValueError, match="sampling"):
        lm.generate_until([SimpleNamespace(args=("a", {"do_sample": True, "temperature": 1.0}),
                                           task_name="g", doc_id=0)], disable_tqdm=True)
    with pytest.raises(ValueError, match="unknown argument.*pretrained"):
        MegatronVLMLM.create_from_arg_string("checkpoint=x,pretrained=gpt2")
    with pytest.raises(ValueError, match="checkpoint=DIR is required"):
        MegatronVLMLM.create_from_arg_string("batch_size=2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MegatronVLMLM.create_from_arg_string("checkpoint=/nonexistent/ckpt")
    with pytest.raises(ValueError, match="max_length=500 exceeds"):
        MegatronVLMLM(lm.eval_model, lm.tokenizer, max_length=500)


def test_shapesworld_suite(lm, shapesworld):
    from megatron_vlm.evaluation.text_suites import run_text_suite

    results = run_text_suite(lm, "shapesworld", str(shapesworld / "text" / "tasks"), limit=8)
    assert sorted(results) == ["shapesworld_arith", "shapesworld_count", "shapesworld_order"]
    for name, record in results.items():
        assert record["metric_used"] == "acc" and record["n"] == 8
        assert 0.0 <= record["acc"] <= 1.0 and record["score"] == record["acc"]
        assert record["stderr"] is not None and record["tasks"] == [name]
        # each document's acc from lm-eval's logged samples, keyed by its doc_id
        items = record["items"]
        assert items.ids == [str(i) for i in range(8)] and items.groups is None
        assert set(items.scores) <= {0.0, 1.0} and items.value() == pytest.approx(record["acc"])
    subset = run_text_suite(lm, ["shapesworld_order"], str(shapesworld / "text" / "tasks"),
                            limit=8)
    assert subset == {"shapesworld_order": results["shapesworld_order"]}
    with pytest.raises(ValueError, match="unknown text suite"):
        run_text_suite(lm, "nope")
    with pytest.raises(ValueError, match="unknown text suite task.*'arc'"):
        run_text_suite(lm, ["arc"])
    with pytest.raises(ValueError, match="needs include_path"):
        run_text_suite(lm, "shapesworld")


def test_cli_defaults_of_lm_eval_do_not_override_the_model(monkeypatch):
    """lm-eval passes --batch_size 1 and --device cuda:0 when they are not given: the model's
    own defaults must apply then, and the user's values when they are given."""
    from megatron_vlm import lm_eval as cli
    from megatron_vlm.evaluation import lm_eval_adapter as adapter

    seen = {}
    monkeypatch.setattr(adapter.MegatronVLMLM, "from_checkpoint", classmethod(
        lambda cls, checkpoint, **kwargs: seen.update(kwargs, checkpoint=checkpoint)))
    monkeypatch.setattr(adapter, "_UNGIVEN_LM_EVAL_ARGS", set())
    lm_eval_defaults = {"batch_size": 1, "device": "cuda:0", "max_batch_size": None}
    adapter.ignore_lm_eval_args(["batch_size", "device"])
    adapter.MegatronVLMLM.create_from_arg_obj({"checkpoint": "c"}, lm_eval_defaults)
    assert seen["batch_size"] == adapter.DEFAULT_BATCH_SIZE and seen["device"] is None
    adapter.ignore_lm_eval_args([])
    adapter.MegatronVLMLM.create_from_arg_obj({"checkpoint": "c", "batch_size": 4},
                                              lm_eval_defaults)
    assert seen["batch_size"] == 4 and seen["device"] == "cuda:0"

    def given(*argv, flag="--batch_size", short="-b"):
        return cli._flag_given(list(argv), flag, short)

    assert given("--model", "m", "--batch_size", "4") and given("-b4") and given("--batch=4")
    assert given("--config", "run.yaml", flag="--device", short=None)
    assert not given("--model_args", "batch_size=4", "--tasks", "t")
    assert not given("--device", "cpu") and given("--device", "cpu", flag="--device", short=None)
    assert cli._model_args_values(["--model_args", "checkpoint=a,tokenizer=t", "x=1", "--tasks",
                                   "checkpoint=z"], "checkpoint") == ["a"]
    assert cli._model_args_values(["--model_args=tokenizer=t,checkpoint=b"], "checkpoint") == ["b"]


def test_suite_chance_levels(shapesworld, tmp_path):
    from megatron_vlm.evaluation.text_suites import suite_chance_levels

    assert suite_chance_levels(str(shapesworld / "text" / "tasks")) == {
        "shapesworld_arith": 0.25, "shapesworld_count": 0.25, "shapesworld_order": 0.5}
    assert suite_chance_levels(None) == {} and suite_chance_levels(str(tmp_path)) == {}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks.json").write_text('{"tasks": {"mine": {"chance": 1.5}}}')
    with pytest.raises(ValueError, match=r"tasks.json: task 'mine': field 'chance' = 1.5"):
        suite_chance_levels(str(tmp_path / "tasks"))


def test_paper_suite_combines_agieval_lsat():
    from megatron_vlm.evaluation.text_suites import PAPER_SUITE, summarize

    results = {"results": {}, "n-samples": {}}
    for i, task in enumerate(("agieval_lsat_ar", "agieval_lsat_lr", "agieval_lsat_rc")):
        results["results"][task] = {"acc,none": 0.9, "acc_norm,none": 0.2 + 0.1 * i,
                                    "acc_norm_stderr,none": 0.03}
        results["n-samples"][task] = {"effective": 100 * (i + 1)}
    lsat = summarize(results, PAPER_SUITE[:1])["agieval_lsat"]
    assert lsat["metric_used"] == "acc_norm" and lsat["n"] == 600
    assert abs(lsat["score"] - 0.3) < 1e-12  # unweighted mean of the three sections
    assert abs(lsat["stderr"] - 0.03 / 3 ** 0.5) < 1e-12
    assert lsat["items"] is None  # no logged samples
    # logged samples: each section's documents are a group, so the items average as the score
    results["samples"] = {
        task: [{"doc_id": d, "filter": "none", "acc_norm": float(d < 2 + i), "acc": 0.0}
               for d in range(5 * (i + 1))]
        for i, task in enumerate(("agieval_lsat_ar", "agieval_lsat_lr", "agieval_lsat_rc"))}
    items = summarize(results, PAPER_SUITE[:1])["agieval_lsat"]["items"]
    assert items.ids[:3] == ["agieval_lsat_ar/0", "agieval_lsat_ar/1", "agieval_lsat_ar/2"]
    assert items.groups.count("agieval_lsat_rc") == 15
    assert items.value() == pytest.approx((2 / 5 + 3 / 10 + 4 / 15) / 3)
    assert [t.name for t in PAPER_SUITE] == [
        "agieval_lsat", "arc_easy", "bigbench_conceptual_combinations", "boolq", "copa",
        "hellaswag", "mathqa", "piqa", "pubmedqa"]


# ---------------------------------------------------------------------- other processes


def _cli_env():
    # A port of its own: the runtime fixture of this process holds the inherited MASTER_PORT.
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1",
                HF_HUB_OFFLINE="1", MASTER_PORT=str(free_port()))


def test_cli_end_to_end(checkpoint, shapesworld):
    args = ["--model", "megatron_vlm", "--model_args",
            f"checkpoint={checkpoint},tokenizer={shapesworld}/tokenizer/tokenizer.json",
            "--tasks", "shapesworld_arith", "--include_path", f"{shapesworld}/text/tasks",
            "--limit", "8"]
    if engine_ready():
        cmd = [sys.executable, "-m", "megatron_vlm.lm_eval", *args]
    else:  # the same CLI, with the direct stand-in for the engine
        cmd = [sys.executable, "tests/scripts/lm_eval_parallel.py", "cli", "--", *args]
    done = subprocess.run(cmd, cwd=REPO, env=_cli_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if "shapesworld_arith" in line]
    assert rows and "|acc " in rows[0], done.stdout
    value = float(rows[0].split("|")[7])
    assert 0.0 <= value <= 1.0


def test_cli_missing_checkpoint_is_one_line(tmp_path, shapesworld):
    done = subprocess.run(
        [sys.executable, "-m", "megatron_vlm.lm_eval", "--model", "megatron_vlm", "--model_args",
         f"checkpoint={tmp_path}/missing", "--tasks", "shapesworld_arith", "--include_path",
         f"{shapesworld}/text/tasks"],
        cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"megatron_vlm.lm_eval: error: checkpoint {tmp_path}/missing does not exist"


def _torchrun_scores(tmp_path, checkpoint, shapesworld, nproc, layouts, engine):
    spec = tmp_path / "requests.json"
    spec.write_text(json.dumps({"loglikelihood": REQUESTS, "rolling": ROLLING}))
    out = tmp_path / "out"
    done = torchrun("tests/scripts/lm_eval_parallel.py",
                    ["score", "--checkpoint", str(checkpoint), "--tokenizer",
                     f"{shapesworld}/tokenizer/tokenizer.json", "--requests", str(spec),
                     "--layouts", ",".join(layouts), "--out", str(out), "--engine", engine],
                    nproc=nproc, timeout=240, module=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return {layout: [json.loads((out / layout / f"rank{r}.json").read_text())
                     for r in range(nproc)] for layout in layouts}


def _assert_every_rank_matches(ranks, direct, tokenizer, tolerance):
    expected = [reference_loglikelihood(direct, tokenizer, c, x) for c, x in REQUESTS]
    rolling = [reference_rolling(direct, tokenizer, t) for t in ROLLING]
    for report in ranks:
        where = (report["layout"], report["rank"])
        got = report["loglikelihood"]
        assert len(got) == len(expected), where
        for i, ((value, greedy), (want, want_greedy)) in enumerate(zip(got, expected)):
            assert close(value, want, tolerance), (where, i, value, want)
            assert greedy == want_greedy, (where, i)
        assert len(report["rolling"]) == len(rolling), where
        for value, want in zip(report["rolling"], rolling):
            assert close(value, want, tolerance), (where, value, want)


@pytest.mark.slow  # torchrun launches
def test_parallel_layouts_equal_one_process(tmp_path, checkpoint, shapesworld, direct,
                                            tokenizer):
    """Every rank ends with all results, in order, equal to the one-process reference. With the
    engine, one 4-process run scores at TP=2 PP=2 and then at TP=1 PP=2 DP=2 (each replica
    scoring half of the batches); without it, the direct stand-in at DP=2 on 2 processes."""
    if engine_ready():
        layouts = _torchrun_scores(tmp_path, checkpoint, shapesworld, 4, ["2x2", "1x2"],
                                   "engine")
    else:
        layouts = _torchrun_scores(tmp_path, checkpoint, shapesworld, 2, ["1x1"], "direct")
    for ranks in layouts.values():
        _assert_every_rank_matches(ranks, direct, tokenizer, 1e-4)
