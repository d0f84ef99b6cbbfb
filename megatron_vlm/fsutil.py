"""File helpers shared by shard writers, checkpoints, the converter and the wheelhouse tool:
crash-safe writes (write a temp file, fsync it, rename it over the target, fsync the directory),
file digests, and the one-line message for an output that cannot be written
(:func:`output_error_message`, printed by :func:`megatron_vlm.cli.run_main`). Standard library
only: tools/wheelhouse.py uses it before anything is installed."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
from typing import Any, Optional

TMP_SUFFIX = ".tmp"
_HASH_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flushes a directory entry (a rename) to disk; filesystems that refuse are skipped."""
    try:
        fd = os.open(os.fspath(directory) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` via a fsync'd temp file and ``os.replace``."""
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise_naming(err, tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """Writes ``obj`` as indented JSON (plus a newline) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=1, **dumps_kwargs) + "\n")


# ---------------------------------------------------------------------------------------------
# Outputs that cannot be written
# ---------------------------------------------------------------------------------------------

# Errors of the machine, not of the program: the user fixes them (frees space, picks a writable
# directory), so they are one line naming the file rather than a traceback.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}
# torch.save's messages for a write that failed or came up short (C++ zip writer, file stream);
# they carry no file name and no errno.
_TORCH_WRITE_FAILURE = re.compile(r"unexpected pos \d+ vs \d+|iostream error")
# An OSError that reached us as text (megatron's checkpoint writer workers).
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^\n:']+)(?:: '([^'\n]+)')?")


def raise_naming(err: OSError, path: str | os.PathLike) -> None:
    """Re-raises ``err``; with ``path`` as its file name when it has none (a failed write, flush
    or fsync names no file), so the message can say which output failed."""
    if err.filename is None and err.errno is not None:
        raise OSError(err.errno, err.strerror, os.fspath(path)) from err
    raise err


def output_error_message(err: BaseException) -> Optional[str]:
    """One line for an error of writing an output for a reason outside the program: no space
    left, a quota, the file size limit, a read-only file system, no permission; naming the file
    (or the checkpoint directory being written) and the cause. None for anything else, which
    keeps its traceback.

    Besides OSError, this recognizes torch.save's write failures ("unexpected pos 704 vs 598")
    and megatron checkpoint saves that failed in their writer workers (the worker's error is
    only text by then); their path is found in the traceback (:func:`_path_in_traceback`).
    """
    if isinstance(err, OSError):
        code, cause, path = err.errno, err.strerror, err.filename
        if code in _WRITE_ERRNOS | _ACCESS_ERRNOS and path is None:
            path = _path_in_traceback(err)
        return _errno_line(code, cause, path)
    path = _path_in_traceback(err, writers_only=True)
    if path is None:
        return None
    text = str(err)
    as_text, torch_failure = _ERRNO_TEXT.search(text), _TORCH_WRITE_FAILURE.search(text)
    if as_text:
        return _errno_line(int(as_text[1]), as_text[2].strip(), as_text[3] or path)
    if torch_failure:
        return f"cannot write {path}: {_short_write_cause(path, torch_failure[0])}"
    if getattr(err, "failures", None) == {}:
        # megatron raises the writer workers' errors on the coordinating rank only; the others
        # get an empty CheckpointException, and their line points to that rank's.
        return f"cannot write {path}: the save failed on another rank, whose error names the cause"
    return None


def _errno_line(code: Optional[int], cause: str, path: Optional[str]) -> Optional[str]:
    if code in _WRITE_ERRNOS:
        return f"cannot write {path if path is not None else 'an output (file not known)'}: {cause}"
    if code in _ACCESS_ERRNOS and path is not None:  # without a file it may be no file error
        return f"cannot access {path}: {cause}"
    return None


def _short_write_cause(path: str, detail: str) -> str:
    """What a torch write failure (``detail``) most likely was: the free space of the path's
    file system tells a full disk from a quota or file size limit."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return f"the write failed (torch: {detail})"
    if free < 1 << 20:
        return f"No space left on device ({free} bytes free; torch: {detail})"
    return (f"the write came up short with {free / 2**30:.1f} GiB free: a disk quota or the file "
            f"size limit (ulimit -f)? (torch: {detail})")


def _path_in_traceback(err: BaseException, writers_only: bool = False) -> Optional[str]:
    """The output being written where ``err`` was raised, innermost frame first: the file
    argument of torch.save, the directory of a megatron checkpoint save, or (unless
    ``writers_only``) an open file object for writing among a frame's local variables."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        code, local = frame.f_code, frame.f_locals
        filename = code.co_filename.replace(os.sep, "/")
        if filename.endswith("torch/serialization.py") and code.co_name == "save" and "f" in local:
            return _file_name(local["f"])
        if "/dist_checkpointing/" in filename:
            # A synchronous save has the directory argument; an asynchronous one, finished
            # later, only its storage writer.
            where = local.get("checkpoint_dir", getattr(local.get("storage_writer"), "path", None))
            if isinstance(where, (str, os.PathLike)):
                return os.fspath(where)
        if not writers_only:
            for value in local.values():
                if isinstance(value, io.IOBase) and _is_output(value):
                    return _file_name(value)
    return None


def _is_output(f: io.IOBase) -> bool:
    mode = getattr(f, "mode", "")
    return (isinstance(mode, str) and any(c in mode for c in "wax+")
            and isinstance(getattr(f, "name", None), str))


def _file_name(f: Any) -> Optional[str]:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else None
