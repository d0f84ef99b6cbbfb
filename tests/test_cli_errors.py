"""Which errors run_main shows as one line: the project's own bad-input errors (a ValueError
raised by the project's code, a missing file, an output the machine will not take); a
ValueError from inside a library, or an internal check's RuntimeError, keeps its traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_vlm.cli import SHOW_TRACEBACK_ENV, is_user_error, run_main


def _run(main, capsys):
    """(exit status, stderr) of ``main`` under run_main; a traceback propagates as-is."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, "tool")
    return exc.value.code, capsys.readouterr().err


def _bad_override():
    from megatron_vlm.config import load_config

    load_config("tiny", ["train.no_such_key=1"])


def test_a_bad_input_the_project_names_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv(SHOW_TRACEBACK_ENV, raising=False)
    status, err = _run(_bad_override, capsys)
    assert status == 2 and err.startswith("tool: error: ") and "no_such_key" in err
    assert err.count("\n") == 1


def test_a_missing_file_is_one_line(capsys, tmp_path):
    status, err = _run(lambda: open(tmp_path / "absent.yaml").read(), capsys)
    assert status == 2 and str(tmp_path / "absent.yaml") in err and err.count("\n") == 1


@pytest.mark.parametrize("bug", [
    lambda: np.zeros(3) + np.zeros(4),       # numpy's broadcasting, inside a library call
    lambda: json.loads("{not json"),          # json's decoder, a ValueError subclass
    lambda: int("twelve"),                    # a conversion the project did not check
])
def test_a_value_error_from_a_library_keeps_its_traceback(bug, capsys):
    with pytest.raises(ValueError):
        run_main(bug, "tool")
    assert "tool: error" not in capsys.readouterr().err


def test_an_internal_check_keeps_its_traceback(capsys):
    from megatron_vlm.data.samples import collate

    with pytest.raises(RuntimeError, match="at least one sample"):
        run_main(lambda: collate([]), "tool")
    assert "tool: error" not in capsys.readouterr().err


def test_the_traceback_variable_shows_user_errors_in_full(monkeypatch):
    monkeypatch.setenv(SHOW_TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="no_such_key"):
        run_main(_bad_override, "tool")


def test_is_user_error_looks_at_where_the_error_was_raised():
    try:
        _bad_override()
    except ValueError as err:
        assert is_user_error(err)
    try:
        np.zeros(3) + np.zeros(4)
    except ValueError as err:
        assert not is_user_error(err)
    assert not is_user_error(ValueError("never raised, no traceback"))


def _ctrl_c():
    raise KeyboardInterrupt


def _interrupted(main, capsys):
    """(exit status, stderr) of ``main`` under run_main; a KeyboardInterrupt that escapes fails
    the test (rather than stopping pytest, which takes it for the user's)."""
    try:
        run_main(main, "tool")
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt left run_main (its traceback would be printed)")


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    """Ctrl-C used to print a traceback ending in KeyboardInterrupt. Under torchrun every rank
    gets it, and rank 0 alone says so."""
    monkeypatch.delenv(SHOW_TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert _interrupted(_ctrl_c, capsys) == (130, "tool: interrupted\n")

    def training():
        raise KeyboardInterrupt("after step 7 of 10; ...")

    assert _interrupted(training, capsys) == (130, "tool: interrupted after step 7 of 10; ...\n")
    monkeypatch.setenv("RANK", "1")
    assert _interrupted(_ctrl_c, capsys) == (130, "")
