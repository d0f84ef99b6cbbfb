"""What a person reads when output is piped (CI, SLURM logs): no progress-bar frames, each loss
once, the config as one line plus a file, no third-party noise; on a terminal, log lines print
above the bar instead of inside it."""

import io
import logging
import os
import re
import subprocess
import sys

import pytest
import yaml

from distributed import REPO, free_port, metrics_by_step, torchrun

TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d ")  # configure_logging's format: every line of ours
# Lines a library prints on its own at start (warnings.warn's "path:line: UserWarning: ...",
# megatron-core's fallback notices, the torchvision shim, lm-eval's fewshot notice).
NOISE = re.compile(r"Warning|warnings\.warn|Transformer Engine|Apex|torchvision|Falling back|"
                   r"Overwriting default")
TINY_ONLINE = ["--recipe", "tiny", "data.kind=random", "train.global_batch_size=4",
               "train.micro_batch_size=2", "train.seq_length=64", "model.encoder.mode=online",
               "checkpoint.save_fractions=[]"]


def run_piped(args, run_dir):
    """pretrain_vlm.py with stdout and stderr into one pipe, as ``2>&1 | cat`` would."""
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    env.pop("TQDM_DISABLE", None)  # the run must decide that for itself
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_vlm.py"), *args,
                           f"output_dir={run_dir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)
    out = proc.stdout.decode()  # not text=True: its newline translation would hide a '\r'
    assert proc.returncode == 0, out[-3000:]
    return out


def test_piped_training_log_reads_as_lines(tmp_path):
    """Online encoder mode: open_clip, torchvision and megatron-core's optimizers all import."""
    out = run_piped([*TINY_ONLINE, "train.train_iters=8"], tmp_path)
    assert "\r" not in out, "a progress bar wrote frames into the pipe"
    lines = out.splitlines()
    strays = [line for line in lines if not TIMESTAMP.match(line)]
    assert not strays, f"lines that are not log lines of ours: {strays[:5]}"
    noise = [line for line in lines if NOISE.search(line)]
    assert not noise, f"third-party start-up noise: {noise[:5]}"
    # Each step's loss once: in its log line, not again in a bar postfix or a per-source copy.
    for step, record in metrics_by_step(tmp_path).items():
        assert out.count(f"step {step}/8 ") == 1
        assert out.count(f"{record['loss']:.4f}") == 1, f"loss of step {step} not printed once"
    # The config: the whole of it in the run directory, one short line in the log.
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["encoder"]["mode"] == "online" and saved["train"]["train_iters"] == 8
    config_lines = [line for line in lines if " config" in line[:20]]
    assert len(config_lines) == 1 and str(tmp_path / "config.yaml") in config_lines[0]
    assert "{" not in config_lines[0] and len(config_lines[0]) < 250, config_lines[0]
    assert "trained steps 1-8" in lines[-1]


@pytest.mark.slow
def test_only_rank0_talks_under_torchrun(tmp_path):
    proc = torchrun("pretrain_vlm.py", [*TINY_ONLINE, "train.train_iters=4",
                                        f"output_dir={tmp_path}"], nproc=2, module=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for once in ("config: ", "step 4/4 ", "throughput features", "vision encoder custom"):
        assert out.count(once) == 1, once


# --------------------------------------------------------------------- the progress helper


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    from megatron_vlm import progress

    now = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: now[0])
    return now


def piped_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "megatron_vlm"]


def test_piped_progress_is_a_line_per_tenth_at_most_every_few_seconds(clock, caplog, capsys):
    from megatron_vlm.progress import Progress

    with caplog.at_level(logging.INFO, logger="megatron_vlm"):
        with Progress(100, "embed", "img", every_s=10) as bar:
            assert not bar.is_bar
            for _ in range(100):
                clock[0] += 1.0  # 100 s of work, one item a second
                bar.update(1)
        fast = Progress(100, "quick", "img", every_s=10)
        for _ in range(100):
            clock[0] += 0.01  # done in a second: the caller's summary line is enough
            fast.update(1)
        fast.close()
    lines = piped_lines(caplog)
    # at 10, 20, ... 90% (each 10 s apart); nothing at 100%: the caller says it is done
    assert len(lines) == 9 and lines[0] == "embed: 10/100 img (10%), 1.0 img/s", lines
    assert "\r" not in capsys.readouterr().err


def test_piped_progress_without_a_total_logs_every_interval(clock, caplog):
    from megatron_vlm.progress import Progress

    with caplog.at_level(logging.INFO, logger="megatron_vlm"):
        with Progress(None, "tokenize", "doc", every_s=30) as bar:
            for _ in range(100):
                clock[0] += 1.0
                bar.update(5)
    assert piped_lines(caplog) == ["tokenize: 150 doc, 5.0 doc/s", "tokenize: 300 doc, 5.0 doc/s",
                                   "tokenize: 450 doc, 5.0 doc/s"]


def test_tracked_items_all_pass_and_are_counted(clock, caplog):
    from megatron_vlm.progress import track

    def slow(n):
        for i in range(n):
            clock[0] += 1.0
            yield i

    with caplog.at_level(logging.INFO, logger="megatron_vlm"):
        assert list(track(slow(400), 400, "captions", "rec")) == list(range(400))
    assert piped_lines(caplog)[0] == "captions: 40/400 rec (10%), 1.0 rec/s"
    assert len(piped_lines(caplog)) == 9


def test_disabled_progress_says_nothing(clock, caplog, monkeypatch):
    from megatron_vlm.progress import Progress

    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    with caplog.at_level(logging.INFO, logger="megatron_vlm"):
        with Progress(10, "other rank", enabled=False) as bar:
            clock[0] += 100
            bar.update(5)
    assert not bar.is_bar and not piped_lines(caplog) and sys.stderr.getvalue() == ""


def test_log_lines_print_above_the_bar_on_a_terminal(monkeypatch):
    """tqdm's logging redirect: a log line is its own line, not glued to a bar frame."""
    from megatron_vlm.progress import Progress

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    log = logging.getLogger("megatron_vlm.test_progress")
    log.setLevel(logging.INFO)
    with Progress(4, "train", "step", lines=False) as bar:
        assert bar.is_bar
        for step in range(4):
            bar.update(1)
            log.info("step %d done", step + 1)
    assert root.handlers == [handler], "the redirect outlived the bar"
    segments = re.split(r"[\r\n]", terminal.getvalue())
    assert "train:" in terminal.getvalue()
    for step in range(1, 5):
        assert f"step {step} done" in segments, terminal.getvalue()


def test_configure_logging_quiets_library_bars_and_fewshot_notice_when_piped(monkeypatch, caplog):
    from megatron_vlm.logs import configure_logging

    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # piped
    configure_logging()
    assert os.environ["TQDM_DISABLE"] == "1"
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    evaluator = logging.getLogger("lm_eval.evaluator")
    with caplog.at_level(logging.INFO):
        evaluator.warning("Overwriting default num_fewshot of %s from %s to %s", "arc", None, 0)
        evaluator.warning("Task %s has no test split", "arc")
    assert [r.getMessage() for r in caplog.records] == ["Task arc has no test split"]

    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    configure_logging()
    assert "TQDM_DISABLE" not in os.environ  # a terminal keeps the libraries' bars


def test_shapesworld_generation_piped_has_no_bar_frames(tmp_path, capfd):
    from megatron_vlm.synthetic import ShapesWorldConfig, generate

    generate(tmp_path / "sw", ShapesWorldConfig(images=8, llava_images=8, eval_images=4,
                                                text_docs=20, task_items=4, sentencepiece=False),
             progress=True, fsync=False)
    captured = capfd.readouterr()
    assert "\r" not in captured.err + captured.out
