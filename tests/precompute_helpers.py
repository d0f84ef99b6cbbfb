"""tools/precompute_image_embeddings.py in-process, and an interrupted run's shards, as the
precompute and online-encoder tests use them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "precompute_image_embeddings.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("precompute_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def run_tool(*argv) -> int:
    """The tool's main() on ``argv`` (any values; passed as strings)."""
    return tool.main([str(a) for a in argv])


def drop_last_shard(out: Path) -> int:
    """Makes ``out`` look like a run interrupted before its last shard was finished: the shard
    leaves the index and its files are gone. Returns the shard's row count."""
    index = json.loads((out / "index.json").read_text())
    last = index["shards"].pop()
    index["rows"] -= last["rows"]
    (out / "index.json").write_text(json.dumps(index))
    for desc in last["files"].values():
        (out / desc["file"]).unlink()
    return last["rows"]
