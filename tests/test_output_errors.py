"""An output the machine will not take (disk full, file size limit, read-only directory, no
permission) ends in one line naming the file and the cause (megatron_vlm.fsutil.
output_error_message through cli.run_main), not in a traceback or torch's "unexpected pos";
other errors keep their tracebacks.

The full disk is /dev/full (a real ENOSPC from the kernel), the short write torch reports as
"unexpected pos" a file size limit (RLIMIT_FSIZE, EFBIG) in a subprocess.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megatron_vlm import fsutil
from megatron_vlm.cli import run_main
from megatron_vlm.fsutil import output_error_message, write_text_atomic

REPO = Path(__file__).resolve().parent.parent
PROG = "precompute_image_embeddings"


def _error_line(capsys, main, prog="tool") -> str:
    """Runs ``main`` under run_main; asserts exit status 2 and returns the one stderr line."""
    with pytest.raises(SystemExit) as exc:
        run_main(main, prog)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def _fill_dev_full():
    """A write to a full disk whose OSError (raised by the flush) names no file."""
    with open("/dev/full", "wb") as f:
        f.write(b"x" * 10)


def test_messages_name_the_file_and_the_cause(tmp_path):
    with pytest.raises(OSError) as exc:
        _fill_dev_full()
    assert exc.value.filename is None  # the path comes from the open file in the traceback
    assert output_error_message(exc.value) == "cannot write /dev/full: No space left on device"
    # fsutil's atomic write names the temp file it was writing (here a link to the full disk)
    target = tmp_path / "settings.json"
    os.symlink("/dev/full", str(target) + fsutil.TMP_SUFFIX)
    with pytest.raises(OSError) as exc:
        write_text_atomic(target, "{}")
    assert exc.value.filename == str(target) + fsutil.TMP_SUFFIX and not target.exists()
    assert output_error_message(exc.value) == f"cannot write {target}.tmp: No space left on device"
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/out")
    assert output_error_message(ro) == "cannot write /data/out: Read-only file system"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out/x")
    assert output_error_message(denied) == "cannot access /data/out/x: Permission denied"
    # not the machine's doing, or not a write: None, so the traceback stays
    assert output_error_message(OSError(errno.EIO, "Input/output error", "/data/x")) is None
    assert output_error_message(PermissionError(errno.EPERM, "Operation not permitted")) is None
    assert output_error_message(RuntimeError("unexpected pos 704 vs 598")) is None
    assert output_error_message(ValueError("bad")) is None
    assert output_error_message(KeyboardInterrupt()) is None


class _CheckpointException(BaseException):
    """As torch.distributed.checkpoint's: a BaseException whose text holds the workers' errors
    (on the coordinating rank; the others get none)."""

    @property
    def failures(self):
        return self.args[1]


# The shapes of megatron-core 0.16's failed checkpoint saves (run for real on a full tmpfs, they
# print these lines too): the synchronous save's frame holds the directory, the asynchronous
# finalization only its storage writer. Compiled under megatron's file name, without importing it.
_MEGATRON_SAVES = """
def save(sharded_state_dict, checkpoint_dir):
    raise Failure("write", {0: "RuntimeError: Worker failure: [enforce fail at "
                               "inline_container.cc:672] . unexpected pos 704 vs 598"})

def save_state_dict_async_finalize(storage_writer, global_metadata, dist_wrapper):
    raise Failure("write", {0: "OSError: Worker failure: [Errno 28] No space left on device"}
                  if dist_wrapper == "coordinator" else {})
"""


def test_failed_megatron_checkpoint_saves_name_the_checkpoint(tmp_path):
    ns = {"Failure": _CheckpointException}
    exec(compile(_MEGATRON_SAVES, "/venv/megatron/core/dist_checkpointing/strategies/torch.py",
                 "exec"), ns)
    ckpt = tmp_path / "checkpoints" / "step_0000002.tmp"
    writer = type("Writer", (), {"path": ckpt})()
    with pytest.raises(_CheckpointException) as exc:
        ns["save"]({}, str(ckpt))
    line = output_error_message(exc.value)   # the cause: from the free space left (plenty here)
    assert line.startswith(f"cannot write {ckpt}: ") and line.endswith("unexpected pos 704 vs 598)")
    with pytest.raises(_CheckpointException) as exc:
        ns["save_state_dict_async_finalize"](writer, None, "coordinator")
    assert output_error_message(exc.value) == f"cannot write {ckpt}: No space left on device"
    with pytest.raises(_CheckpointException) as exc:
        ns["save_state_dict_async_finalize"](writer, None, "another rank")
    assert output_error_message(exc.value) == \
        f"cannot write {ckpt}: the save failed on another rank, whose error names the cause"


@pytest.mark.parametrize("size", [100, 100_000])   # fails at commit's flush / in write
def test_shard_files_name_themselves_when_the_disk_is_full(tmp_path, size):
    from megatron_vlm.data.shard_io import _HashingFile

    final = tmp_path / "shard_00000.emb"
    os.symlink("/dev/full", str(final) + fsutil.TMP_SUFFIX)
    f = _HashingFile(str(final))
    with pytest.raises(OSError) as exc:
        f.write(b"x" * size)
        f.commit()
    f.abort()   # the unflushed data does not fail the clean-up
    assert output_error_message(exc.value) == f"cannot write {final}.tmp: No space left on device"
    assert not final.exists()


def test_run_main_prints_one_line_and_keeps_other_tracebacks(capsys):
    torch = pytest.importorskip("torch")
    assert _error_line(capsys, _fill_dev_full) == \
        "tool: error: cannot write /dev/full: No space left on device"
    # torch.save to a path fails in C++ without naming it: its argument names the file
    line = _error_line(capsys, lambda: torch.save({"a": torch.zeros(4096)}, "/dev/full"))
    assert line.startswith("tool: error: cannot write /dev/full: ") and "torch: " in line

    def bug():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        run_main(bug, "tool")


def test_torch_short_write_is_no_longer_unexpected_pos(tmp_path):
    """The issue's "unexpected pos 704 vs 598": torch.save's write came up short (here at the
    file size limit; on a full disk the same). One line naming the file and the cause."""
    target = tmp_path / "model.pt"
    code = ("import resource, torch\n"
            "from megatron_vlm.cli import run_main\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
            f"run_main(lambda: torch.save({{'w': torch.zeros(20000)}}, {str(target)!r}), 'trainer')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"trainer: error: cannot write {target}: ")
    assert "file size limit" in lines[0] and "unexpected pos" in lines[0]


# ---- the precompute tool ---------------------------------------------------------------------

@pytest.fixture
def tar_path(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "pairs.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _tool_main(tar, out):
    pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali-cuda120) is not installed")
    from precompute_helpers import tool

    return lambda: tool.main(["--recipe", "tiny", "--store", "images", "--tar", str(tar),
                              "--output", str(out), "--no-progress"])


def test_precompute_on_a_full_disk_names_the_shard_file(tmp_path, tar_path, capsys, monkeypatch):
    from megatron_vlm.data import shard_io

    def full_disk_open(path, mode="r", *args, **kwargs):
        # shard files go to a full disk; the index and the lock file are written normally
        return open("/dev/full" if path.endswith(".img" + fsutil.TMP_SUFFIX) else path, mode,
                    *args, **kwargs)

    monkeypatch.setattr(shard_io, "open", full_disk_open, raising=False)
    out = tmp_path / "out"
    line = _error_line(capsys, _tool_main(tar_path, out), PROG)
    assert line == f"{PROG}: error: cannot write {out}/shard_00000.img.tmp: No space left on device"
    # nothing passes for a finished shard; a rerun with space resumes from the start
    assert shard_io.read_json(str(out / "index.json"))["shards"] == []


@pytest.mark.parametrize("how", ["chmod", "read-only file system"])
def test_precompute_into_a_read_only_directory_is_one_line(tmp_path, tar_path, capsys, monkeypatch,
                                                           how):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "out"
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into a mode 0555 directory")
        parent.chmod(0o555)
        expected = f"cannot access {out}: Permission denied"
    else:  # a real EROFS needs a mount: the first file the tool writes is refused instead

        def read_only_open(path, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

        monkeypatch.setattr(fsutil, "open", read_only_open, raising=False)
        expected = f"cannot write {out}/precompute.json.tmp: Read-only file system"
    try:
        assert _error_line(capsys, _tool_main(tar_path, out), PROG) == f"{PROG}: error: {expected}"
    finally:
        parent.chmod(0o755)
