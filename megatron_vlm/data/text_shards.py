"""Text shards: megatron-core ``IndexedDataset`` files, written, opened and listed.

Text is stored in megatron-core's own format (``PREFIX.bin``/``PREFIX.idx``, int32 tokens, one
megatron document per corpus document; layout: docs/data.md), written with megatron-core's
builder (:class:`TextShardWriter`, :func:`write_text_dataset`) and read with its
``IndexedDataset`` (:func:`open_text_dataset`). :func:`preprocess_text` in
:mod:`megatron_vlm.data.text_preprocess` writes a corpus as shards ``PREFIX_00000`` ... with a
manifest; :func:`text_manifest_path` and :func:`text_shard_prefixes` say where they are, and
:func:`training_text_prefixes` checks that the corpus is finished and not empty.
:class:`megatron_vlm.data.text_windows.PackedTextWindows` cuts them into training windows.

Crash safety: the files are written under ``.tmp`` names, fsync'd and renamed into place by
:meth:`TextShardWriter.commit`. torch and megatron-core are imported only by the functions that
need them.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Iterable, Sequence

import numpy as np

from megatron_vlm.data.shard_io import read_json
from megatron_vlm.fsutil import TMP_SUFFIX, sha256_file
from megatron_vlm.fsutil import fsync_dir as _fsync_dir

TEXT_FORMAT = "megatron-vlm-text"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def import_indexed_dataset():
    """megatron-core's ``indexed_dataset`` module (its import warnings silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class TextShardWriter:
    """One megatron-core IndexedDataset (``PREFIX.bin``/``PREFIX.idx``, int32 tokens) written
    with megatron-core's ``IndexedDatasetBuilder``; one megatron document per added document.

    Files go to temp names and are fsync'd and renamed by :meth:`commit`, which returns their
    sizes and sha256; :meth:`abort` removes them.
    """

    def __init__(self, path_prefix: str):
        self._mod = import_indexed_dataset()
        self.path_prefix = path_prefix
        self.bin_path = self._mod.get_bin_path(path_prefix)
        self.idx_path = self._mod.get_idx_path(path_prefix)
        self._builder = self._mod.IndexedDatasetBuilder(self.bin_path + TMP_SUFFIX, dtype=np.int32)
        self._hash = hashlib.sha256()
        self.documents = 0
        self.tokens = 0
        self._done = False

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Adds one document (its tokens as given; append the EOS yourself)."""
        import torch

        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        self._builder.add_item(torch.from_numpy(arr))
        self._builder.end_document()
        self._hash.update(arr.tobytes())
        self.documents += 1
        self.tokens += int(arr.size)

    def commit(self) -> dict:
        """Finalizes and renames the files into place; returns {documents, tokens, files}."""
        if self.documents == 0:
            self.abort()
            raise ValueError(f"{self.path_prefix}: a text dataset needs at least one document")
        self._builder.finalize(self.idx_path + TMP_SUFFIX)
        self._done = True
        files = {}
        for kind, path in (("bin", self.bin_path), ("idx", self.idx_path)):
            _fsync_path(path + TMP_SUFFIX)
            os.replace(path + TMP_SUFFIX, path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.bin_path)))
        files["bin"] = {"file": os.path.basename(self.bin_path),
                        "bytes": os.path.getsize(self.bin_path), "sha256": self._hash.hexdigest()}
        files["idx"] = {"file": os.path.basename(self.idx_path),
                        "bytes": os.path.getsize(self.idx_path), "sha256": sha256_file(self.idx_path)}
        return {"documents": self.documents, "tokens": self.tokens, "files": files}

    def abort(self) -> None:
        if not self._done:
            self._builder.data_file.close()
            self._done = True
        for path in (self.bin_path, self.idx_path):
            if os.path.exists(path + TMP_SUFFIX):
                os.remove(path + TMP_SUFFIX)


def write_text_dataset(path_prefix: str, documents: Iterable[Sequence[int] | np.ndarray]) -> dict:
    """Writes ``documents`` (token lists, each stored as one megatron document exactly as
    given) to ``path_prefix.bin/.idx`` atomically; returns {documents, tokens, files}."""
    writer = TextShardWriter(path_prefix)
    try:
        for doc in documents:
            writer.add_document(doc)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


_INDEX_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents


def _check_index_size(idx_path: str) -> None:
    """ValueError naming ``idx_path`` unless its header reads and its length is what the header
    says (megatron-core's layout: int32 lengths and int64 pointers per sequence, int64 document
    indices)."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_INDEX_HEADER.size)
    if len(head) < _INDEX_HEADER.size or not head.startswith(b"MMIDIDX"):
        raise ValueError(f"text dataset index {idx_path} is not a megatron index (header of "
                         f"{len(head)} bytes); rerun tools/preprocess_text.py")
    _, _, _, sequences, documents = _INDEX_HEADER.unpack(head)
    need = _INDEX_HEADER.size + 12 * sequences + 8 * documents
    if size < need:
        raise ValueError(f"text dataset index {idx_path} has {size:,} bytes but its header "
                         f"describes {sequences:,} sequences in {need:,}: the file is truncated; "
                         "rerun tools/preprocess_text.py")


def open_text_dataset(path_prefix: str):
    """megatron-core's ``IndexedDataset`` for ``path_prefix`` (.bin/.idx), memory-mapped.

    A truncated ``.idx``, or a ``.bin`` shorter than its index says, is one ValueError naming
    the file here, when the data is opened, not an unnamed buffer error at the training step
    that first reads past the end."""
    mod = import_indexed_dataset()
    idx_path, bin_path = mod.get_idx_path(path_prefix), mod.get_bin_path(path_prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text dataset file not found: {path}")
    _check_index_size(idx_path)
    dataset = mod.IndexedDataset(path_prefix, multimodal=False, mmap=True)
    index = dataset.index
    if len(index.sequence_lengths):
        need = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
        have = os.path.getsize(bin_path)
        if have < need:
            raise ValueError(f"text dataset {bin_path} has {have:,} bytes but its index "
                             f"{idx_path} places tokens up to byte {need:,}: the file is "
                             "truncated; rerun tools/preprocess_text.py")
    return dataset


def text_manifest_path(output_prefix: str) -> str:
    """Where :func:`preprocess_text` keeps its manifest for ``output_prefix``."""
    return output_prefix + ".manifest.json"


def _read_text_manifest(output_prefix: str) -> dict:
    path = text_manifest_path(output_prefix)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no text manifest {path} (run tools/preprocess_text.py first)")
    return read_json(path)


def _prefixes(output_prefix: str, manifest: dict) -> list[str]:
    base = os.path.dirname(output_prefix)
    return [os.path.join(base, manifest["shards"][k]["prefix"])
            for k in sorted(manifest["shards"], key=int)]


def text_shard_prefixes(output_prefix: str) -> list[str]:
    """The shard prefixes (``PREFIX_00000`` ...) that :func:`preprocess_text` finished."""
    return _prefixes(output_prefix, _read_text_manifest(output_prefix))


def training_text_prefixes(output_prefix: str, key: str = "data.text") -> list[str]:
    """The shard prefixes of a corpus to train on (config key ``key``): the manifest must say
    :func:`preprocess_text` finished (an interrupted run holds only part of the corpus) and
    that it found documents. Either failure is one ValueError naming ``key`` and the manifest,
    here at data opening rather than later inside the window builder."""
    manifest = _read_text_manifest(output_prefix)
    path = text_manifest_path(output_prefix)
    if not manifest.get("complete"):
        raise ValueError(f"{key}={output_prefix}: {path} is from a preprocessing run that did "
                         f"not finish ({len(manifest.get('shards', {}))} shards so far); run "
                         f"tools/preprocess_text.py again with the same arguments to finish it")
    if not manifest.get("shards"):
        summary = manifest.get("summary", {})
        raise ValueError(f"{key}={output_prefix}: the corpus holds no documents ({path} lists "
                         f"no shards; tools/preprocess_text.py found {summary.get('documents', 0)} "
                         f"documents and skipped {summary.get('skipped', 0)} records in its "
                         f"inputs)")
    return _prefixes(output_prefix, manifest)
