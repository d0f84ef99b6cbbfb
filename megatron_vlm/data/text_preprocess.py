"""Text corpus preprocessing: JSONL / parquet / plain-text documents -> IndexedDataset shards.

:func:`preprocess_text` (the logic behind ``tools/preprocess_text.py``) tokenizes the documents
of JSONL (optionally ``.gz`` / ``.zst``), parquet and plain-text files, in a pool of spawned
tokenizer workers when asked, and writes them as text shards ``PREFIX_00000.bin/.idx`` ...
(:class:`megatron_vlm.data.text_shards.TextShardWriter`) plus ``PREFIX.manifest.json``, which
records the settings and every finished shard so that a rerun resumes and writes the same
bytes. :func:`expand_text_inputs`, :func:`iter_text_records` and :func:`iter_documents` are its
input side, shared with the tokenizer trainer (:mod:`megatron_vlm.data.tokenizer_training`):
which files a list of paths names, each record's text or the reason it is malformed, and the
well-formed documents with the malformed ones counted.

A plain-text file (``.txt``, optionally ``.gz`` / ``.zst``) holds one document per block of
lines separated by blank lines (``txt_document="block"``), or is one document as a whole
(``"file"``). A document is its lines as written, without the line break after its last line;
lines holding only whitespace are blank, and a file's leading UTF-8 byte order mark is dropped.

torch and megatron-core are imported only by the functions that need them (the tokenizing
workers import neither).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field as dc_field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_vlm.data.shard_io import FORMAT_VERSION, read_json
from megatron_vlm.data.text_shards import (
    TEXT_FORMAT,
    TextShardWriter,
    import_indexed_dataset,
    text_manifest_path,
)
from megatron_vlm.fsutil import TMP_SUFFIX, sha256_file, write_json_atomic

logger = logging.getLogger("megatron_vlm")

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
TXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
TEXT_INPUT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + TXT_SUFFIXES
TXT_DOCUMENT_MODES = ("block", "file")


def expand_text_inputs(inputs: Sequence[str]) -> list[str]:
    """Input paths with each directory replaced by its JSONL/parquet/.txt files (recursively,
    sorted).

    A missing path raises FileNotFoundError; an explicit file of another type, ValueError.
    """
    files: list[str] = []
    for raw in inputs:
        path = os.fspath(raw)
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path) for name in names
                if name.lower().endswith(TEXT_INPUT_SUFFIXES))
            if not found:
                raise ValueError(f"{path}: directory holds no .jsonl/.json, .parquet or .txt "
                                 f"files (.gz/.zst compressed JSONL and .txt included)")
            files.extend(found)
        elif os.path.isfile(path):
            if not path.lower().endswith(TEXT_INPUT_SUFFIXES):
                raise ValueError(f"{path}: unsupported input type (expected .jsonl, .json, "
                                 f".parquet or .txt; JSONL and .txt also as .gz or .zst)")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def _open_binary(path: str):
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ValueError(f"{path}: reading .zst needs the 'zstandard' package "
                             f"(pip install zstandard)") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"),
                                                                            closefd=True))
    return open(path, "rb")


def is_txt_input(path: str) -> bool:
    """Whether ``path`` is read as plain text (its documents have no field)."""
    return path.lower().endswith(TXT_SUFFIXES)


def check_txt_document(txt_document: str) -> None:
    if txt_document not in TXT_DOCUMENT_MODES:
        raise ValueError(f"txt_document={txt_document!r} must be one of "
                         f"{', '.join(TXT_DOCUMENT_MODES)}")


def iter_text_records(path: str, field: str = "text", txt_document: str = "block",
                      ) -> Iterator[tuple[str, Optional[str], Optional[str]]]:
    """Yields ``(where, text, problem)`` per record of a JSONL, parquet or plain-text file.

    ``where`` is ``FILE:LINE`` (1-based) for JSONL, ``FILE:row N`` (0-based) for parquet and
    ``FILE:LINE`` of a document's first line for plain text (of its first undecodable line
    when it is not valid UTF-8); exactly one of ``text`` and ``problem`` is None. Blank JSONL
    lines are not records, nor is a plain-text file or block of blank lines. A parquet file
    without the column raises ValueError naming the file and field.
    """
    if path.lower().endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path, field)
        return
    if is_txt_input(path):
        yield from _iter_txt(path, txt_document)
        return
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, None, f"invalid JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(obj, dict):
                yield where, None, f"not a JSON object (a {type(obj).__name__})"
            elif field not in obj:
                yield where, None, f"missing field {field!r}"
            elif not isinstance(obj[field], str):
                yield where, None, f"field {field!r} is {type(obj[field]).__name__}, not a string"
            else:
                yield where, obj[field], None


def _iter_txt(path: str, txt_document: str):
    check_txt_document(txt_document)
    split_on_blank = txt_document == "block"
    block: list[bytes] = []  # the raw lines of the document being read
    gap: list[bytes] = []  # blank lines inside a whole-file document, kept if text follows
    first = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                if split_on_blank and block:
                    yield _txt_record(path, first, block)
                    block = []
                elif block:
                    gap.append(raw)
                continue
            if not block:
                first = lineno
            block += gap
            gap = []
            block.append(raw)
    if block:
        yield _txt_record(path, first, block)


def _txt_record(path: str, first: int,
                lines: list[bytes]) -> tuple[str, Optional[str], Optional[str]]:
    data = b"".join(lines)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        # Decoded as one piece (fast); the line and column are found only for the message.
        line = first + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1)
        return (f"{path}:{line}", None,
                f"not valid UTF-8 ({err.reason} at byte {column}); the document of lines "
                f"{first}-{first + len(lines) - 1} is skipped")
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return f"{path}:{first}", text, None


def iter_documents(files: Sequence[str], field: str, txt_document: str, max_skips: int,
                   skipped: list[str]) -> Iterator[tuple[str, str]]:
    """``(where, text)`` of every well-formed record of ``files``, in order.

    Each malformed record is appended to ``skipped`` as ``WHERE: PROBLEM``; the one past
    ``max_skips`` raises ValueError naming the record (and the field, for JSONL and parquet).
    """
    for path in files:
        named_field = "" if is_txt_input(path) else f" (field {field!r})"
        for where, text, problem in iter_text_records(path, field, txt_document):
            if problem is None:
                yield where, text
                continue
            skipped.append(f"{where}: {problem}")
            if len(skipped) > max_skips:
                raise ValueError(f"{where}: {problem}{named_field}; more than "
                                 f"--max-skips={max_skips} malformed records")


def _iter_parquet(path: str, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(names)})")
    col_type = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise ValueError(f"{path}: column {field!r} has type {col_type}, not a string type")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is None:
                yield f"{path}:row {row}", None, f"field {field!r} is null"
            else:
                yield f"{path}:row {row}", value, None
            row += 1


# Tokenizer worker processes (spawned) hold the tokenizer in this global.
_WORKER_TOKENIZER = None


def _worker_init(tokenizer_path: str, eos_token: Optional[str]) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    from megatron_vlm.data.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path, eos_token)


def _encode_with_eos(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated int32 tokens (EOS after each text) and per-text lengths."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for x in ids:
        flat[pos:pos + len(x)] = x
        pos += len(x)
        flat[pos] = tokenizer.eos_id
        pos += 1
    return flat, lengths


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_with_eos(_WORKER_TOKENIZER, texts)


@dataclass
class TextPreprocessSummary:
    """What :func:`preprocess_text` did (also stored in the manifest)."""

    output_prefix: str
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    skipped_records: list[str] = dc_field(default_factory=list)
    shards: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    tokens_written: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def tokens_per_second(self) -> float:
        """Tokens tokenized and written in this run per second."""
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [f"output: {self.output_prefix}_*.bin/.idx "
               f"(manifest {text_manifest_path(self.output_prefix)})",
               f"documents: {self.documents}",
               f"tokens: {self.tokens}",
               f"skipped: {self.skipped}"]
        out += [f"  skipped {r}" for r in self.skipped_records]
        out += [f"shards: {self.shards} ({self.shards_written} written, "
                f"{self.shards_reused} reused from an earlier run)"
                + (" -- stopped early, run again to finish" if self.stopped_early else ""),
                f"seconds: {self.seconds:.2f}",
                f"tokens/s: {self.tokens_per_second:,.0f} (tokens written in this run)"]
        return out


def _shard_ok(base: str, entry: dict) -> bool:
    for desc in entry["files"].values():
        path = os.path.join(base, desc["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != desc["bytes"]:
            return False
        if sha256_file(path) != desc["sha256"]:
            return False
    return True


def _input_changes(old: list, new: list) -> list[str]:
    """What differs between the inputs a manifest recorded and the current ones, one phrase
    per input (empty when they are the same)."""
    old_by_path = {e.get("path"): e for e in old}
    new_paths = [e["path"] for e in new]
    changes = [f"{e['path']} is new" for e in new if e["path"] not in old_by_path]
    changes += [f"{p} is no longer an input" for p in old_by_path if p not in new_paths]
    for e in new:
        was = old_by_path.get(e["path"])
        if was is None:
            continue
        if was.get("bytes") != e["bytes"]:
            changes.append(f"{e['path']} changed ({was.get('bytes')} -> {e['bytes']} bytes)")
        elif was.get("sha256") != e["sha256"]:
            # The case a size check alone misses: an edit that kept the file's length.
            changes.append(f"{e['path']} changed (same size, different content)"
                           if was.get("sha256") else
                           f"{e['path']} has no content hash in the manifest (written by an "
                           f"older version)")
    if not changes and [e.get("path") for e in old] != new_paths:
        changes.append("the inputs are in another order")
    return changes


def preprocess_text(inputs: Sequence[str], tokenizer_path: str, output_prefix: str,
                    docs_per_shard: int = 100_000, field: str = "text", workers: int = 1,
                    max_skips: int = 0, eos_token: Optional[str] = None,
                    overwrite: bool = False, progress: bool = True, chunk_size: int = 512,
                    stop_after_shards: Optional[int] = None,
                    txt_document: str = "block") -> TextPreprocessSummary:
    """Tokenizes JSONL/parquet/.txt documents into IndexedDataset shards ``PREFIX_00000.bin/.idx``...

    Every document is tokenized without BOS and followed by the tokenizer's EOS. Valid
    documents are numbered in input order (files in the given order, directories expanded
    sorted) and document ``d`` goes to shard ``d // docs_per_shard``, so the shards depend only
    on the inputs, the tokenizer and ``docs_per_shard``. Plain-text files give a document per
    blank-line-separated block, or per file with ``txt_document="file"`` (module docstring).
    Malformed records (invalid JSON or UTF-8, missing or non-string field, null parquet value)
    are skipped and listed up to ``max_skips``; one more raises ValueError naming the record
    and field.

    Resume: ``PREFIX.manifest.json`` records the settings (the inputs with their sizes and
    sha256, so an input edited in place is noticed even when its size is unchanged) and, per
    finished shard, its files' sizes and sha256. A rerun with the same settings re-reads the
    inputs but skips tokenizing and writing every shard whose files are present and match;
    other shards are (re)written, byte-identical to an uninterrupted run. Different settings or
    changed inputs raise ValueError naming them unless ``overwrite``, which deletes the shards
    the manifest lists and starts over.

    No documents at all (empty inputs, or every record skipped) is logged as a warning; the
    manifest then lists no shards and training refuses it (:mod:`megatron_vlm.data.loader`).
    ``stop_after_shards`` ends the run after writing that many shards (a test hook that
    simulates an interruption).
    """
    from megatron_vlm.progress import Progress

    from megatron_vlm.data.tokenizer import load_tokenizer

    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard={docs_per_shard} must be at least 1")
    if max_skips < 0:
        raise ValueError(f"max_skips={max_skips} must be >= 0")
    check_txt_document(txt_document)
    files = expand_text_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path, eos_token)
    import_indexed_dataset()  # megatron-core's import (seconds) is not part of the timing
    t0 = time.perf_counter()
    base = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(base, exist_ok=True)
    stem = os.path.basename(output_prefix)
    if not stem:
        raise ValueError(f"output prefix {output_prefix!r} must end in a file name stem")
    settings = {
        "format": TEXT_FORMAT, "version": FORMAT_VERSION,
        "tokenizer_sha256": sha256_file(tokenizer.path), "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size, "dtype": "int32", "field": field,
        "docs_per_shard": int(docs_per_shard),
        # Only where it matters, so that manifests from before .txt inputs still resume.
        "txt_document": txt_document if any(is_txt_input(p) for p in files) else None,
        # Hashing reads every input once more; tokenizing them costs far more than that.
        "inputs": [{"path": os.path.realpath(p), "bytes": os.path.getsize(p),
                    "sha256": sha256_file(p)} for p in files],
    }
    manifest_path = text_manifest_path(output_prefix)
    manifest = {**settings, "shards": {}, "complete": False}
    if os.path.isfile(manifest_path):
        old = read_json(manifest_path)
        differing = [k for k in settings if k != "inputs" and old.get(k) != settings[k]]
        changed_inputs = _input_changes(old.get("inputs", []), settings["inputs"])
        if differing and not overwrite:
            raise ValueError(
                f"{manifest_path}: existing shards were made with different settings "
                f"({', '.join(differing + (['inputs'] if changed_inputs else []))}); "
                f"use another --output-prefix, or --overwrite")
        if changed_inputs and not overwrite:
            raise ValueError(
                f"{manifest_path}: the inputs changed since the existing shards were written "
                f"({'; '.join(changed_inputs)}); use another --output-prefix, or --overwrite "
                f"to rebuild")
        if overwrite:
            for entry in old.get("shards", {}).values():
                for desc in entry["files"].values():
                    path = os.path.join(base, desc["file"])
                    if os.path.exists(path):
                        os.remove(path)
        else:
            manifest["shards"] = {k: v for k, v in old.get("shards", {}).items()
                                  if _shard_ok(base, v)}
    for leftover in glob.glob(os.path.join(glob.escape(base), glob.escape(stem) + "_*" + TMP_SUFFIX)):
        os.remove(leftover)
    done = {int(k) for k in manifest["shards"]}
    write_json_atomic(manifest_path, manifest)

    summary = TextPreprocessSummary(output_prefix=output_prefix)
    summary.shards_reused = len(done)
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init,
                                             initargs=(tokenizer.path, eos_token))
    pending: deque = deque()
    max_pending = max(2, 4 * max(1, workers))
    current: dict[str, Any] = {"shard": None, "writer": None, "first": None}

    def finish_shard() -> None:
        writer = current["writer"]
        if writer is None:
            return
        entry = writer.commit()
        entry["prefix"] = f"{stem}_{current['shard']:05d}"
        entry["first_record"] = current["first"]
        manifest["shards"][str(current["shard"])] = entry
        write_json_atomic(manifest_path, manifest)
        summary.shards_written += 1
        summary.tokens_written += entry["tokens"]
        current["writer"] = None

    def write_result(shard: int, first: str, result) -> None:
        flat, lengths = result
        if current["shard"] != shard:
            finish_shard()
            current.update(shard=shard, first=first,
                           writer=TextShardWriter(os.path.join(base, f"{stem}_{shard:05d}")))
        ends = np.cumsum(lengths)
        for end, n in zip(ends, lengths):
            current["writer"].add_document(flat[end - n:end])

    def drain(limit: int) -> None:
        while len(pending) > limit:
            shard, first, res = pending.popleft()
            write_result(shard, first, res.get() if pool is not None else res)

    def submit(shard: int, first: str, texts: list[str]) -> None:
        if pool is not None:
            pending.append((shard, first, pool.apply_async(_worker_encode, (texts,))))
        else:
            pending.append((shard, first, _encode_with_eos(tokenizer, texts)))
        drain(max_pending)

    chunk: list[str] = []
    chunk_first: Optional[str] = None
    chunk_shard = -1
    doc = 0
    stop = False
    bar = Progress(None, "preprocess_text", "doc", enabled=progress)
    try:
        for where, text in iter_documents(files, field, txt_document, max_skips,
                                          summary.skipped_records):
            shard = doc // docs_per_shard
            if shard in done:
                doc += 1
                bar.update(1)
                continue
            if shard != chunk_shard or len(chunk) >= chunk_size:
                if chunk:
                    submit(chunk_shard, chunk_first, chunk)
                if shard != chunk_shard and stop_after_shards is not None:
                    # Shards are written in order: once the previous ones are done, stop.
                    drain(0)
                    finish_shard()
                    if summary.shards_written >= stop_after_shards:
                        stop = True
                        break
                chunk, chunk_first, chunk_shard = [], where, shard
            chunk.append(text)
            doc += 1
            bar.update(1)
        if chunk and not stop:
            submit(chunk_shard, chunk_first, chunk)
        drain(0)
        finish_shard()
    except BaseException:
        if current["writer"] is not None:
            current["writer"].abort()
        if pool is not None:
            pool.terminate()
            pool = None
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()

    summary.stopped_early = stop
    summary.skipped = len(summary.skipped_records)
    total_shards = (doc + docs_per_shard - 1) // docs_per_shard
    if not stop:
        for k in sorted(done):
            expected = min(docs_per_shard, doc - k * docs_per_shard)
            if manifest["shards"][str(k)]["documents"] != expected:
                raise ValueError(
                    f"{manifest_path}: shard {k} holds {manifest['shards'][str(k)]['documents']} "
                    f"documents but the inputs now give {max(expected, 0)}; the inputs changed "
                    f"since it was written: use another --output-prefix, or --overwrite")
        summary.shards = total_shards
        manifest["complete"] = True
    else:
        summary.shards = len(manifest["shards"])
    summary.documents = doc
    summary.tokens = int(sum(e["tokens"] for e in manifest["shards"].values()))
    summary.seconds = time.perf_counter() - t0
    manifest["summary"] = {"documents": doc, "tokens": summary.tokens,
                           "skipped": summary.skipped, "skipped_records": summary.skipped_records,
                           "shards": summary.shards}
    write_json_atomic(manifest_path, manifest)
    if doc == 0 and not stop:
        named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        logger.warning("preprocess_text: the inputs (%s) hold no documents%s: %s lists no shards "
                       "and training on it will be refused", named,
                       f" ({summary.skipped} records skipped as malformed)" if summary.skipped
                       else "", manifest_path)
    return summary
