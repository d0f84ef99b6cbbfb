"""The LLaVA-1.5 conversation JSON -> instruction shards (the logic behind tools/preprocess_llava.py).

:func:`preprocess_llava` reads the JSON list of records (``id``, optional ``image`` relative to
an image folder, ``conversations``), tokenizes each with
:func:`megatron_vlm.data.samples.tokenize_llava_record` (the conversation layout and its target
mask are in that module's docstring) and writes them as instruction shards
(:class:`megatron_vlm.data.instruction_shards.InstructionShardWriter`), keyed by ``id`` (a
repeated id gets ``#2``, ``#3``, ...) with the image's relative path as image key. Next to the
shards it writes ``images.txt`` (the distinct image paths the conversations need: the input of
the embedding precompute, which must key the embeddings by the same paths) and
``preprocess_summary.json`` (:class:`LlavaPreprocessSummary`).

Malformed records, missing images and colliding keys are skipped and listed, up to a limit.
The records are cut into blocks, one shard per block, each finished atomically with its range,
the settings and the cumulative counts, so an interrupted run resumes after the last finished
shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from megatron_vlm.data.instruction_shards import InstructionDataset, InstructionShardWriter
from megatron_vlm.data.samples import ConversationError, resolve_separator, tokenize_llava_record
from megatron_vlm.data.tokenizer import load_tokenizer
from megatron_vlm.fsutil import sha256_file, write_json_atomic

logger = logging.getLogger("megatron_vlm")
LLAVA_TOOL = "preprocess_llava"
IMAGES_LIST = "images.txt"
SUMMARY_NAME = "preprocess_summary.json"
SKIP_REASONS = ("malformed", "missing_image", "duplicate_key")


@dataclass
class LlavaPreprocessSummary:
    """What :func:`preprocess_llava` did; counts cover the whole input, resumed shards included."""

    output_dir: str
    records: int = 0
    """records in the input JSON."""
    written: int = 0
    """conversations in the output shards."""
    with_image: int = 0
    text_only: int = 0
    tokens: int = 0
    """conversation tokens written (no image positions, no EOS)."""
    loss_tokens: int = 0
    """target tokens written (responses and their separators)."""
    skipped: dict = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    """skipped records by reason."""
    skipped_records: list = field(default_factory=list)
    """``"KEY: reason: message"`` for each skipped record."""
    renamed_duplicates: int = 0
    """records whose ``id`` repeats an earlier one, written under ``ID#N``."""
    longer_than_sequence: int = 0
    """conversations that the sample builder will truncate at the given sequence length."""
    separator_in_text: int = 0
    """conversations whose text itself encodes to the separator token (choose a separator
    that plain text never produces, or responses will look finished early)."""
    distinct_images: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    def counts(self) -> dict:
        """The cumulative counters (stored with every shard, restored on resume)."""
        return {k: getattr(self, k) for k in ("written", "with_image", "text_only", "tokens",
                                                "loss_tokens", "renamed_duplicates",
                                                "longer_than_sequence", "separator_in_text")} | {
            "skipped": dict(self.skipped), "skipped_records": list(self.skipped_records)}

    def restore(self, counts: dict) -> None:
        for k, v in counts.items():
            setattr(self, k, dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)

    def lines(self) -> list[str]:
        out = [f"output: {self.output_dir} (image list {os.path.join(self.output_dir, IMAGES_LIST)})",
               f"records: {self.records}",
               f"written: {self.written} ({self.with_image} with an image, {self.text_only} text-only)",
               f"skipped: {sum(self.skipped.values())} ("
               + ", ".join(f"{k} {v}" for k, v in self.skipped.items()) + ")"]
        out += [f"  skipped {r}" for r in self.skipped_records]
        out += [f"duplicate ids renamed: {self.renamed_duplicates}",
                f"tokens: {self.tokens} ({self.loss_tokens} carry loss)",
                f"longer than the sequence (will be truncated): {self.longer_than_sequence}",
                f"separator token inside the text: {self.separator_in_text}",
                f"distinct images: {self.distinct_images}",
                f"shards: {self.shards} ({self.shards_written} written, {self.shards_reused} reused "
                f"from an earlier run)" + (" -- stopped early, run again to finish"
                                           if self.stopped_early else ""),
                f"seconds: {self.seconds:.2f}"]
        return out


def _record_keys(records: list) -> list[Optional[str]]:
    """The shard key of every record: its ``id``, or ``ID#N`` for the N-th repeat of an id
    (decided over the raw ids, so keys do not depend on which records are skipped)."""
    seen: dict[str, int] = {}
    keys: list[Optional[str]] = []
    for rec in records:
        rid = rec.get("id") if isinstance(rec, dict) else None
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            keys.append(None)
            continue
        rid = str(rid)
        n = seen[rid] = seen.get(rid, 0) + 1
        keys.append(rid if n == 1 else f"{rid}#{n}")
    return keys


def preprocess_llava(json_path: str, image_root: str, tokenizer_path: str, output_dir: str,
                     separator_token: str, system_prompt: Optional[str] = None,
                     max_skips: int = 0, records_per_shard: int = 8192,
                     eos_token: Optional[str] = None, seq_length: int = 1024,
                     num_image_tokens: int = 729, progress: bool = True,
                     stop_after_shards: Optional[int] = None) -> LlavaPreprocessSummary:
    """Tokenizes the LLaVA-1.5 conversation JSON into instruction shards in ``output_dir``.

    Each record becomes one conversation (:func:`tokenize_llava_record`, layout in the docstring
    of :mod:`megatron_vlm.data.samples`) keyed by its ``id`` (a repeated id gets ``#2``, ``#3``, ...), with its image's
    relative path as ``image_key``: the key the embedding precompute tool must use for the
    image. ``images.txt`` lists the distinct image paths of the written conversations, one per
    line, in first-use order.

    Skips (counted, listed by key, at most ``max_skips`` in all, then a ValueError naming the
    record and field): malformed records, images missing under ``image_root``, and keys that
    collide with an earlier one.

    Resume: the records are cut into blocks of ``records_per_shard``; each block's
    conversations form one shard, finished atomically with the block's range, the settings
    and the cumulative counts stored in the index. A rerun with the same settings keeps the
    finished shards and continues after the last one; different settings, or an input JSON
    whose content changed (its sha256 is among the settings), raise ValueError. No
    conversations written (an empty list, or every record skipped) is logged as a warning;
    training refuses such a directory (:mod:`megatron_vlm.data.loader`).
    ``stop_after_shards`` ends the run after writing that many shards (a test hook that
    simulates an interruption).
    """
    from megatron_vlm.progress import Progress

    t0 = time.perf_counter()
    if max_skips < 0:
        raise ValueError(f"max_skips={max_skips} must be >= 0")
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard={records_per_shard} must be at least 1")
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"LLaVA JSON not found: {json_path}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder not found: {image_root}")
    tokenizer = load_tokenizer(tokenizer_path, eos_token)
    separator_id = resolve_separator(tokenizer, separator_token)
    tokenizer_sha = sha256_file(tokenizer.path)
    with open(json_path, "rb") as f:
        raw = f.read()
    try:
        records = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    keys = _record_keys(records)
    # The content hash, not only the size: an edit that keeps the length must not resume
    # on shards of the old records.
    settings = {"tool": LLAVA_TOOL, "input_bytes": len(raw),
                "input_sha256": hashlib.sha256(raw).hexdigest(), "records": len(records), "tokenizer_sha256": tokenizer_sha,
                "separator_token": separator_token, "separator_id": separator_id,
                "system_prompt": system_prompt or "", "records_per_shard": int(records_per_shard)}

    summary = LlavaPreprocessSummary(output_dir=output_dir, records=len(records))
    start = 0
    # Rows never reach this limit: each block is finished by flush_shard() with its meta.
    with InstructionShardWriter(output_dir, rows_per_shard=records_per_shard + 1) as writer:
        for shard in sorted(writer.finished_shards()):
            meta = writer.shard_meta(shard)
            old = meta.get("settings")
            if old is None:
                raise ValueError(f"{output_dir}: shard {shard} was not written by {LLAVA_TOOL} "
                                 "(no settings stored); use another output directory")
            differing = [k for k in settings if old.get(k) != settings[k]]
            if differing:
                what = ("the input JSON changed since they were written" if differing ==
                        ["input_sha256"] else f"different settings ({', '.join(differing)})")
                raise ValueError(f"{output_dir}: existing shards were made from {json_path} with "
                                 f"{what}; use another output directory")
            start = max(start, int(meta["end_record"]))
            summary.restore(meta["counts"])
        summary.shards_reused = len(writer.finished_shards())
        bar = Progress(len(records), LLAVA_TOOL, "rec", enabled=progress, initial=start)
        try:
            block_start = start
            written_keys = writer.written_keys()
            for i in range(start, len(records)):
                record, key = records[i], keys[i]
                reason, problem, image = None, None, None
                try:
                    _, tokens, targets, image = tokenize_llava_record(
                        record, tokenizer, separator_id, system_prompt, index=i)
                    if image is not None and (os.path.isabs(image) or ".." in image.split("/")):
                        raise ConversationError(key, f"'image' must be a path inside the image "
                                                f"folder, got {image!r}", field_name="image")
                except ConversationError as err:
                    reason, problem = "malformed", str(err)
                if reason is None and image is not None and \
                        not os.path.isfile(os.path.join(image_root, image)):
                    reason = "missing_image"
                    problem = f"record {key!r}, field 'image': {os.path.join(image_root, image)} not found"
                if reason is None and key in written_keys:  # e.g. an id spelled like "X#2"
                    reason = "duplicate_key"
                    problem = f"record {key!r}, field 'id': key already written"
                if reason is not None:
                    summary.skipped[reason] += 1
                    summary.skipped_records.append(f"{key if key is not None else '#' + str(i)}: "
                                                   f"{reason}: {problem}")
                    if sum(summary.skipped.values()) > max_skips:
                        raise ValueError(f"{json_path}: {problem}; more than --max-skips={max_skips} "
                                         f"records skipped")
                else:
                    writer.add(key, tokens, targets, image_key=image)
                    written_keys.add(key)
                    summary.written += 1
                    summary.with_image += image is not None
                    summary.text_only += image is None
                    summary.renamed_duplicates += key != str(record["id"])
                    summary.tokens += len(tokens)
                    summary.loss_tokens += int(sum(targets))
                    n_img = num_image_tokens if image is not None else 0
                    summary.longer_than_sequence += n_img + len(tokens) + 1 > seq_length
                    expected_separators = len(record["conversations"]) + bool(system_prompt)
                    summary.separator_in_text += tokens.count(separator_id) > expected_separators
                bar.update(1)
                if i + 1 - block_start == records_per_shard or i + 1 == len(records):
                    meta = {"start_record": block_start, "end_record": i + 1,
                            "settings": settings, "counts": summary.counts()}
                    if writer.flush_shard(meta) is not None:
                        summary.shards_written += 1
                    block_start = i + 1
                    if stop_after_shards is not None and summary.shards_written >= stop_after_shards \
                            and i + 1 < len(records):
                        summary.stopped_early = True
                        break
        finally:
            bar.close()
        summary.shards = len(writer.finished_shards())

    dataset = InstructionDataset(output_dir)
    images = list(dict.fromkeys(k for k in (dataset.image_key(j) for j in range(len(dataset)))
                                if k is not None))
    summary.distinct_images = len(images)
    if not summary.stopped_early:
        tmp = os.path.join(output_dir, IMAGES_LIST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in images))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(output_dir, IMAGES_LIST))
    summary.seconds = time.perf_counter() - t0
    write_json_atomic(os.path.join(output_dir, SUMMARY_NAME),
                      {k: v for k, v in summary.__dict__.items()})
    if summary.written == 0 and not summary.stopped_early:
        logger.warning("%s: %s holds no usable conversations (%d records, %d skipped): %s has "
                       "no shards and training on it will be refused", LLAVA_TOOL, json_path,
                       summary.records, sum(summary.skipped.values()), output_dir)
    return summary
