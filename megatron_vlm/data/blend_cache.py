"""The blend index's on-disk cache: a directory per set of inputs, complete or absent.

The index is a function of its inputs, so the cache holds what describes it rather than the
order: ``manifest.json`` (the inputs, the merge tree, its bounds, the number of global batches
and the summary with its checks) and, per variable-length source, ``tokens-<i>.npy`` (the
positions of each of its sequences), so that a cache directory alone rebuilds the index
(:func:`megatron_vlm.data.blend.load_cached_index`). Files are written into a temporary
directory, fsynced and renamed into place; every file's size and CRC32 are in the manifest and
checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from megatron_vlm.data.blend_sources import BlendSource, PerSequence

logger = logging.getLogger("megatron_vlm.data.blend")


def _array_digest(value: Optional[PerSequence]) -> Any:
    if value is None or isinstance(value, int):
        return value
    arr = np.ascontiguousarray(value)
    h = hashlib.sha256()
    h.update(str(arr.dtype.newbyteorder("<")).encode())
    h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).data)
    return f"sha256:{h.hexdigest()}"


def cache_key(sources: Sequence[BlendSource], fractions: np.ndarray, total_tokens: Optional[int],
              num_batches: Optional[int], seq_length: int, global_batch_size: int,
              seed: int, format_version: int) -> dict[str, Any]:
    """Everything the index depends on, as a JSON-able dict (its hash names the cache)."""
    return {
        "format_version": format_version,
        "sources": [{"name": s.name, "num_sequences": s.num_sequences,
                     "tokens_per_sequence": _array_digest(s.tokens_per_sequence),
                     "loss_tokens": _array_digest(s.loss_tokens),
                     "image_positions": _array_digest(s.image_positions)} for s in sources],
        "fractions": [repr(float(f)) for f in fractions],
        "total_tokens": total_tokens, "num_batches": num_batches, "seq_length": seq_length,
        "global_batch_size": global_batch_size, "seed": seed,
    }


def cache_path_for(cache_dir: Union[str, Path], key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"blend-{digest}"


def _crc32(path: Path) -> int:
    crc = 0
    buf = bytearray(1 << 24)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
    return crc


def _write_synced(path: Path, write) -> dict[str, int]:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "crc32": _crc32(path)}


def _tree_to_json(tree: Any) -> Any:
    return tree if isinstance(tree, int) else [_tree_to_json(ch) for ch in tree]


def save_index(index, sources: Sequence[BlendSource], key: dict[str, Any], final: Path) -> None:
    """Write ``index`` (a BlendIndex built from ``sources``) to ``final`` atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        files, described = {}, []
        for c, s in enumerate(sources):
            tps = s.tokens_per_sequence
            if isinstance(tps, int):
                described.append({"name": s.name, "num_sequences": s.num_sequences,
                                  "tokens_per_sequence": tps})
                continue
            name = f"tokens-{c}.npy"
            files[name] = _write_synced(tmp / name, lambda f: np.save(f, np.ascontiguousarray(tps)))
            described.append({"name": s.name, "num_sequences": s.num_sequences,
                              "tokens_per_sequence": name})
        manifest = {"key": key, "key_hash": final.name, "files": files, "sources": described,
                    "fractions": [float(x) for x in index.fractions],
                    "tree": _tree_to_json(index.tree), "bounds": [float(x) for x in index.bounds],
                    "seq_length": index.seq_length, "global_batch_size": index.global_batch_size,
                    "seed": index.seed, "num_batches": index.num_batches,
                    "summary": index._summary}
        _write_synced(tmp / "manifest.json",
                      lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if final.exists():
            # Another process may have finished the same index meanwhile: keep a sound copy.
            if read_cache(final, key, quiet=True) is not None:
                return
            shutil.rmtree(final, ignore_errors=True)   # a corrupt earlier copy
        try:
            os.replace(tmp, final)
        except OSError:
            if read_cache(final, key, quiet=True) is None:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_cache(path: Union[str, Path], key: Optional[dict[str, Any]] = None, verify: bool = True,
               quiet: bool = False) -> Optional[tuple[dict[str, Any], list[BlendSource]]]:
    """(manifest, sources) of the cache at ``path``, or None when it is missing, incomplete,
    corrupt or made for other inputs (logged unless ``quiet``)."""
    path = Path(path)
    warn = (lambda *a: None) if quiet else logger.warning
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        if path.exists():
            warn("blend index cache %s has no manifest; rebuilding", path)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if key is not None and manifest["key"] != json.loads(json.dumps(key)):
            warn("blend index cache %s was made for other inputs; rebuilding", path)
            return None
        sources = []
        for entry in manifest["sources"]:
            tps = entry["tokens_per_sequence"]
            if isinstance(tps, str):
                fpath = path / tps
                meta = manifest["files"][tps]
                if fpath.stat().st_size != meta["bytes"]:
                    raise ValueError(f"{tps} has {fpath.stat().st_size} bytes, expected "
                                     f"{meta['bytes']}")
                if verify and _crc32(fpath) != meta["crc32"]:
                    raise ValueError(f"{tps} fails its CRC32 checksum")
                tps = np.load(fpath)
            sources.append(BlendSource(entry["name"], entry["num_sequences"], tps))
    except (OSError, ValueError, KeyError, TypeError) as err:
        warn("blend index cache %s is unreadable (%s); rebuilding", path, err)
        return None
    return manifest, sources
