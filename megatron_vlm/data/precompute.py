"""The image precompute: image records -> caption shards of embeddings or of images.

One driver behind ``tools/precompute_image_embeddings.py``, with two kinds of output:

* :func:`precompute_embeddings` (``--store embeddings``) runs image records
  (:mod:`megatron_vlm.data.image_sources`) through the batch preprocessor
  (:class:`~megatron_vlm.data.dali_pipeline.ImagePreprocessor`) and a frozen encoder
  (:func:`encode_images`) and writes embedding shards
  (:class:`megatron_vlm.data.embedding_shards.EmbeddingShardWriter`), for
  ``model.encoder.mode=precomputed``;
* :func:`store_images` (``--store images``) decodes the same records with the same
  preprocessor, only to find the ones that cannot be decoded, and writes the encoded files of
  the others as they are into image shards
  (:class:`megatron_vlm.data.image_shards.ImageShardWriter`, with the resize mode the loader is
  to use), for ``model.encoder.mode=online``: the loader decodes them again for the encoder of
  the run, and every stored image is one it can decode.

Both share everything else: inputs are processed in a fixed order, rows fill shards in order,
and write batches never straddle a shard boundary, so an interrupted run resumes at the first
unfinished shard and writes the same files an uninterrupted run writes. ``precompute.json``
(:func:`check_manifest`) records the settings and the inputs, so a rerun with other settings or
inputs cannot mix rows (and a directory that holds anything else is refused);
``skipped.jsonl`` lists every skipped image and :class:`PrecomputeSummary` counts what the run
did.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from megatron_vlm.data.dali_pipeline import ImagePreprocessor
from megatron_vlm.data.embedding_shards import EmbeddingShardWriter
from megatron_vlm.data.image_io import ImageDecodeError
from megatron_vlm.data.image_shards import ImageShardWriter
from megatron_vlm.data.image_sources import ImageRecord
from megatron_vlm.fsutil import write_json_atomic, write_text_atomic

logger = logging.getLogger("megatron_vlm")

MANIFEST_NAME = "precompute.json"
SKIPPED_NAME = "skipped.jsonl"
MANIFEST_FORMAT = "megatron-vlm image precompute"


class SkipLimitExceeded(ValueError):
    """More images were skipped than ``max_skips`` allows."""


@dataclass
class SkippedImage:
    key: str
    reason: str
    detail: str
    source: str

    def as_dict(self) -> Dict[str, str]:
        return {"key": self.key, "reason": self.reason, "detail": self.detail, "source": self.source}


@dataclass
class PrecomputeSummary:
    """What a precompute run did (this run only; ``resumed`` rows were already in finished shards).

    ``embedded`` counts the rows this run wrote: embeddings, or stored images when ``store`` is
    ``"images"``."""

    embedded: int = 0
    resumed: int = 0
    skipped: List[SkippedImage] = field(default_factory=list)
    duplicates: int = 0
    shards: int = 0
    new_shards: int = 0
    seconds: float = 0.0
    pil_decoded: int = 0
    captions: int = 0
    caption_tokens: int = 0
    tokenized: bool = False
    output_dir: str = ""
    device: str = "cpu"
    decoder: str = "dali"
    store: str = "embeddings"

    @property
    def skipped_by_reason(self) -> Dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def lines(self, max_keys: int = 20) -> List[str]:
        by_reason = ", ".join(f"{r}: {n}" for r, n in self.skipped_by_reason.items()) or "none"
        captions = (f"{self.captions} with captions, {self.caption_tokens} caption tokens" if self.tokenized
                    else f"{self.captions} with captions, not stored: no --tokenizer")
        written = "images embedded " if self.store == "embeddings" else "images stored   "
        out = [
            f"precompute summary ({self.output_dir})",
            f"  {written}  {self.embedded} ({captions}; {self.pil_decoded} decoded by the PIL path)",
            f"  already done      {self.resumed} (in finished shards, not redone)",
            f"  skipped           {len(self.skipped)} ({by_reason})",
            f"  duplicate keys    {self.duplicates} (later occurrences ignored)",
            f"  shards            {self.shards} ({self.new_shards} written by this run)",
            f"  seconds           {self.seconds:.1f}",
            f"  images/s          {self.images_per_second:.1f} ({self.decoder} decode on {self.device})",
        ]
        if self.skipped:
            shown = self.skipped[:max_keys]
            out.append("  skipped keys      " + ", ".join(f"{s.key} ({s.reason})" for s in shown)
                       + (f", ... ({len(self.skipped)} in all)" if len(self.skipped) > max_keys else ""))
            out.append(f"  full list         {os.path.join(self.output_dir, SKIPPED_NAME)}")
        return out

    def as_dict(self) -> Dict[str, Any]:
        return {"embedded": self.embedded, "resumed": self.resumed, "skipped": len(self.skipped),
                "skipped_by_reason": self.skipped_by_reason, "duplicates": self.duplicates,
                "shards": self.shards, "new_shards": self.new_shards, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 2), "pil_decoded": self.pil_decoded,
                "captions": self.captions, "caption_tokens": self.caption_tokens}


def check_manifest(output_dir: str, settings: Dict[str, Any]) -> None:
    """Write ``precompute.json``, refusing a directory whose rows this run must not add to.

    A directory without ``precompute.json`` must be empty (or new): files there belong to
    something else, and the shard writer would delete any named ``shard_*``. One with it must
    have been written with the same settings, ``settings["inputs"]`` (the input paths, in
    order) included: a resumed run continues its own inputs, and rows of other inputs are not
    appended to it. Paths, not sizes, are compared, so a tar downloaded again after it was found
    truncated resumes the run.
    """
    path = os.path.join(output_dir, MANIFEST_NAME)
    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err}); delete it or use another --output") from None
        old_settings = old.get("settings", {}) if isinstance(old, dict) else {}
        diffs = [_setting_diff(k, old_settings.get(k), v) for k, v in settings.items()
                 if old_settings.get(k) != v]
        if diffs:
            raise ValueError(f"--output {output_dir} holds rows written with other settings ("
                             + "; ".join(diffs) + "); use a new --output directory or delete this one")
    elif os.listdir(output_dir):
        raise ValueError(f"--output {output_dir} is not empty and holds no {MANIFEST_NAME} (it is not "
                         f"the output of an earlier precompute); use a new or empty --output directory")
    write_json_atomic(path, {"format": MANIFEST_FORMAT, "settings": settings})


def _setting_diff(key: str, old: Any, new: Any) -> str:
    if key == "inputs" and isinstance(old, list) and isinstance(new, list):
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        at = lambda paths: repr(paths[first]) if first < len(paths) else "nothing"  # noqa: E731
        return (f"inputs: {len(old)} files before, {len(new)} now; input {first + 1} was {at(old)}, "
                f"is {at(new)} now")
    return f"{key}: {old!r} before, {new!r} now"


def _write_skipped(output_dir: str, skipped: Sequence[SkippedImage]) -> str:
    path = os.path.join(output_dir, SKIPPED_NAME)
    write_text_atomic(path, "".join(json.dumps(s.as_dict()) + "\n" for s in skipped))
    return path


def encode_images(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run the frozen encoder (eval, no autograd; bf16 autocast on CUDA) -> float32 on the CPU."""
    encoder.eval()
    with torch.inference_mode():
        if images.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = encoder(images)
        else:
            out = encoder(images)
    return out.float().cpu()


def precompute_embeddings(
    records: Iterable[ImageRecord] | Callable[[Set[str]], Iterable[ImageRecord]],
    *,
    encoder: torch.nn.Module,
    preprocessor: ImagePreprocessor,
    output_dir: str,
    n_img: int,
    d_enc: int,
    tokenizer=None,
    dtype: str = "bf16",
    rows_per_shard: int = 4096,
    max_skips: int = 0,
    settings: Optional[Dict[str, Any]] = None,
    total: Optional[int] = None,
    progress: bool = True,
    prefetch: int = 1,
) -> PrecomputeSummary:
    """Embed ``records`` into caption shards under ``output_dir`` and return the summary.

    ``records`` is an iterable, or a callable that gets the set of keys already in finished
    shards and returns one (so a reader can avoid loading those). Keys in finished shards of
    ``output_dir`` are not processed again; a resumed run starts a new shard after them.
    Encoder batches never straddle a shard boundary, so the rows of every shard (and their
    bytes) do not depend on where an earlier run stopped.

    Skipped images (missing, unreadable, corrupt, bad caption) are listed in ``skipped.jsonl``;
    more than ``max_skips`` of them stop the run with :class:`SkipLimitExceeded` naming the last
    key; the unfinished shard is dropped and the finished ones stay. A later occurrence of a key
    is ignored (counted in ``duplicates``). ``prefetch`` batches are read and decoded in a
    background thread while the encoder runs.
    """
    def open_writer():
        return EmbeddingShardWriter(output_dir, n_img=n_img, d_enc=d_enc, dtype=dtype,
                                    rows_per_shard=rows_per_shard)

    def write(writer, chunk: List[_Decoded]) -> None:
        emb = encode_images(encoder, torch.stack([c.pixels for c in chunk]))
        for c, row in zip(chunk, emb.unbind(0)):
            writer.add(c.key, row, c.tokens)

    return _precompute(records, open_writer, write, keep_pixels=True, store="embeddings",
                       preprocessor=preprocessor, output_dir=output_dir, tokenizer=tokenizer,
                       rows_per_shard=rows_per_shard, max_skips=max_skips, settings=settings,
                       total=total, progress=progress, prefetch=prefetch)


def store_images(
    records: Iterable[ImageRecord] | Callable[[Set[str]], Iterable[ImageRecord]],
    *,
    preprocessor: ImagePreprocessor,
    output_dir: str,
    tokenizer=None,
    rows_per_shard: int = 4096,
    max_skips: int = 0,
    settings: Optional[Dict[str, Any]] = None,
    total: Optional[int] = None,
    progress: bool = True,
    prefetch: int = 1,
) -> PrecomputeSummary:
    """Store the encoded images of ``records`` (as read, undecoded) and their caption tokens
    in image shards under ``output_dir``; return the summary.

    Every image is decoded once by ``preprocessor`` (the loader's preprocessor, so DALI and its
    PIL path), only to skip the ones that cannot be: what is stored, the loader can decode. The
    shards record ``preprocessor.resize_mode`` as the mode the loader resizes with. Inputs,
    resume, skips and duplicates as :func:`precompute_embeddings`.
    """
    def open_writer():
        return ImageShardWriter(output_dir, resize_mode=preprocessor.resize_mode,
                                rows_per_shard=rows_per_shard)

    def write(writer, chunk: List[_Decoded]) -> None:
        for c in chunk:
            writer.add(c.key, c.data, c.tokens)

    return _precompute(records, open_writer, write, keep_pixels=False, store="images",
                       preprocessor=preprocessor, output_dir=output_dir, tokenizer=tokenizer,
                       rows_per_shard=rows_per_shard, max_skips=max_skips, settings=settings,
                       total=total, progress=progress, prefetch=prefetch)


@dataclass
class _Decoded:
    """A record that decoded, waiting to be written."""

    key: str
    pixels: Optional[torch.Tensor]   # [3, S, S] when the writer needs them (embeddings)
    data: bytes                      # the encoded image as read
    tokens: Optional[List[int]]      # caption tokens, or None (no tokenizer / no caption)
    has_caption: bool


def _precompute(records, open_writer: Callable[[], Any], write: Callable[[Any, List[_Decoded]], None],
                *, keep_pixels: bool, store: str, preprocessor: ImagePreprocessor, output_dir: str,
                tokenizer, rows_per_shard: int, max_skips: int, settings: Optional[Dict[str, Any]],
                total: Optional[int], progress: bool, prefetch: int) -> PrecomputeSummary:
    """The driver: read and decode ``records`` in order (a background thread decodes ahead),
    skip and list the bad ones, and hand the others to ``write(writer, chunk)`` in chunks of at
    most the preprocessor's batch size that never straddle a shard boundary."""
    from megatron_vlm.progress import Progress

    if max_skips < 0:
        raise ValueError(f"--max-skips must be >= 0; got {max_skips}")
    if rows_per_shard < 1:
        raise ValueError(f"rows per shard must be >= 1; got {rows_per_shard}")
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    if settings is not None:
        check_manifest(output_dir, settings)
    summary = PrecomputeSummary(resumed=0, output_dir=output_dir, device=str(preprocessor.device),
                                decoder=preprocessor.decoder, tokenized=tokenizer is not None,
                                store=store)
    batch_size = preprocessor.batch_size
    seen: Set[str] = set()
    pending: List[ImageRecord] = []
    buffered: deque = deque()  # _Decoded records, not yet written
    rows_in_shard = 0  # rows written into the current (unfinished) shard by this run
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") if prefetch > 0 else None
    in_flight: deque = deque()

    bar = Progress(total, "precompute", "img", enabled=progress)

    def skip(key: str, reason: str, detail: str, source: str) -> None:
        summary.skipped.append(SkippedImage(key, reason, detail, source))
        bar.update(1)
        bar.set_note(f"skipped {len(summary.skipped)}")
        if len(summary.skipped) > max_skips:
            path = _write_skipped(output_dir, summary.skipped)
            raise SkipLimitExceeded(
                f"{len(summary.skipped)} images skipped, more than --max-skips={max_skips}; the last: "
                f"key {key!r} from {source}: {reason}: {detail}. All skipped keys are listed in {path}; "
                f"finished shards are kept and a rerun resumes after them")

    def tokens_of(record: ImageRecord) -> Optional[List[int]]:
        if tokenizer is None or record.caption is None:
            return None
        return list(tokenizer.encode(record.caption))

    def decode(batch: List[ImageRecord]):
        """Runs in the decode thread: read bytes and preprocess; returns what the main thread needs."""
        items: List[Tuple[str, bytes]] = []
        read_failures: List[Tuple[ImageRecord, ImageDecodeError]] = []
        for rec in batch:
            if rec.problem is not None:
                read_failures.append((rec, ImageDecodeError(*rec.problem)))
                continue
            try:
                items.append((rec.key, rec.read()))
            except ImageDecodeError as err:
                read_failures.append((rec, err))
        return batch, items, read_failures, preprocessor(items) if items else None

    def consume(result) -> None:
        batch, items, read_failures, pre = result
        data_of = dict(items)
        failed = {rec.key: (err.reason, err.detail) for rec, err in read_failures}
        if pre is not None:
            for f in pre.failures:
                failed[f.key] = (f.reason, f.detail)
            summary.pil_decoded += pre.pil_decoded
        decoded = dict(zip(pre.keys, pre.images.unbind(0))) if pre is not None else {}
        for rec in batch:  # keep input order
            if rec.key in failed:
                reason, detail = failed[rec.key]
                skip(rec.key, reason, detail, rec.source)
            else:
                buffered.append(_Decoded(rec.key, decoded[rec.key] if keep_pixels else None,
                                         data_of[rec.key], tokens_of(rec), rec.caption is not None))
        flush(final=False)

    def flush(final: bool) -> None:
        nonlocal rows_in_shard
        while buffered:
            room = rows_per_shard - rows_in_shard
            n = min(batch_size, room)
            if len(buffered) < n and not final:
                return
            chunk = [buffered.popleft() for _ in range(min(n, len(buffered)))]
            write(writer, chunk)
            for c in chunk:
                summary.captions += int(c.has_caption)
                summary.caption_tokens += len(c.tokens) if c.tokens is not None else 0
            summary.embedded += len(chunk)
            rows_in_shard = (rows_in_shard + len(chunk)) % rows_per_shard
            bar.update(len(chunk))

    def submit(batch: List[ImageRecord]) -> None:
        if pool is None:
            consume(decode(batch))
            return
        in_flight.append(pool.submit(decode, batch))
        while len(in_flight) > prefetch:
            consume(in_flight.popleft().result())

    writer = open_writer()
    ok = False
    try:
        done_keys = writer.written_keys()
        done_shards = len(writer.finished_shards())
        if done_keys:
            logger.info("resuming: %d images in %d finished shards of %s are kept",
                        len(done_keys), done_shards, output_dir)
        if callable(records):
            records = records(done_keys)
        for rec in records:
            if rec.key in done_keys:
                summary.resumed += 1
                bar.update(1)
                continue
            if rec.key in seen:
                summary.duplicates += 1
                bar.update(1)
                continue
            seen.add(rec.key)
            pending.append(rec)
            if len(pending) >= batch_size:
                submit(pending)
                pending = []
        if pending:
            submit(pending)
        while in_flight:
            consume(in_flight.popleft().result())
        flush(final=True)
        ok = True
    finally:
        bar.close()
        if pool is not None:
            for fut in in_flight:
                fut.cancel()
            pool.shutdown(wait=True)
        if ok:
            writer.close()
        else:
            writer.abort()
    _write_skipped(output_dir, summary.skipped)
    summary.seconds = time.perf_counter() - start
    summary.shards = len(writer.finished_shards())
    summary.new_shards = summary.shards - done_shards
    return summary
