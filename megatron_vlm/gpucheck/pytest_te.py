"""A pytest plugin the check loads (``-p megatron_vlm.gpucheck.pytest_te``) to select the
Transformer Engine tests of tests/gpu or to leave them out.

A TE test is one that uses the ``transformer_engine`` fixture, or is parametrized with
``te=True`` (it asks for that fixture inside). The fixture fails, not skips, where TE does not
import, so the check leaves those tests out there (``--te-tests auto``, reported as deselected)
and ``--te-tests only`` runs them alone.
"""

from __future__ import annotations

import importlib.util


def pytest_addoption(parser):
    parser.addoption("--te-tests", choices=("auto", "only", "include", "exclude"),
                     default="auto", help="auto: the Transformer Engine tests only where TE "
                     "imports; only: those alone; include / exclude: always / never")


def is_te_test(item) -> bool:
    if "transformer_engine" in getattr(item, "fixturenames", ()):
        return True
    callspec = getattr(item, "callspec", None)
    return bool(callspec is not None and callspec.params.get("te") is True)


def te_imports() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises several error types when its extension is absent
        return False
    return True


def pytest_collection_modifyitems(config, items):
    mode = config.getoption("--te-tests")
    if mode == "include":
        return
    if mode == "auto":
        mode = "include" if te_imports() else "exclude"
        if mode == "include":
            return
    keep_te = mode == "only"
    kept = [i for i in items if is_te_test(i) == keep_te]
    dropped = [i for i in items if is_te_test(i) != keep_te]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
