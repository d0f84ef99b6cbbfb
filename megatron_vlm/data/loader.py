"""The training loader: blend index + shards -> micro-batches for this data-parallel rank.

Every micro-batch is a pure function of (blend index, global batch number, data-parallel rank,
micro-batch number), so the loader is resumable to exactly the next sample from one integer —
the number of global batches already consumed — and background workers can build batches in
any order. Data-parallel rank ``r`` of ``D`` takes rows ``r*B/D ... (r+1)*B/D`` of each global
batch of ``B`` sequences, so the ranks' rows are disjoint and together cover the batch.

What a sequence counts toward the ratios (the blend index's "tokens"): the positions its own
source fills — a whole window for text; image positions, separator, caption and EOS for a
caption sequence; image positions, conversation and EOS (cut to the sequence length) for an
instruction sequence. Padding counts for no source. With ``data.caption_fill: text`` a caption
sequence is packed full with text documents after its EOS and counts all its positions toward
the caption source (the filler comes from the text shards in an order of its own, chosen by the
sequence's place in the blend, so it is as deterministic and resumable as everything else).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_vlm.config import DATA_SOURCES
from megatron_vlm.data.batch import check_batch
from megatron_vlm.data.blend import BlendIndex, BlendSource, build_blend_index, source_from_shards
from megatron_vlm.data.samples import (
    Sample,
    build_caption_sample,
    build_instruction_sample,
    build_text_sample,
    collate,
    resolve_separator,
)

logger = logging.getLogger("megatron_vlm")

SOURCE_ORDER = DATA_SOURCES


class DataSources:
    """The shards named by a :class:`~megatron_vlm.config.DataConfig`, served as samples."""

    def __init__(self, data_cfg, seq_length: int, num_image_tokens: int, embed_dim: int,
                 vocab_size: int):
        from megatron_vlm.data.embedding_shards import EmbeddingDataset
        from megatron_vlm.data.instruction_shards import InstructionDataset
        from megatron_vlm.data.text_shards import text_shard_prefixes
        from megatron_vlm.data.text_windows import PackedTextWindows
        from megatron_vlm.data.tokenizer import load_tokenizer

        self.cfg = data_cfg
        self.seq_length = seq_length
        self.n_img = num_image_tokens
        tokenizer = load_tokenizer(data_cfg.tokenizer)
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"data.tokenizer {data_cfg.tokenizer} has {tokenizer.vocab_size} "
                             f"tokens but model.decoder.vocab_size is {vocab_size}")
        self.eos_id = tokenizer.eos_id
        self.pad_id = tokenizer.eos_id  # never a target: padding carries no loss
        self.separator_id = resolve_separator(tokenizer, data_cfg.separator_token)
        self.names = [n for n in SOURCE_ORDER if n in data_cfg.ratios]
        self.skipped: dict[str, list[str]] = {}
        self.text = self.captions = self.instructions = self.instruction_images = None
        self.fill_text = data_cfg.caption_fill == "text" and "captions" in self.names
        if "text" in self.names:
            self.text = PackedTextWindows(text_shard_prefixes(data_cfg.text), seq_length,
                                          seed=data_cfg.seed)
        if self.fill_text:
            # Its own document order (another seed), so filler is not the text source's windows.
            self.filler = PackedTextWindows(text_shard_prefixes(data_cfg.text), seq_length,
                                            seed=data_cfg.seed + 7919)
        if "captions" in self.names:
            self.captions = EmbeddingDataset(data_cfg.captions)
            self._check_embeddings(self.captions, "data.captions", embed_dim)
        if "instructions" in self.names:
            self.instructions = InstructionDataset(data_cfg.instructions)
            self.instruction_images = EmbeddingDataset(data_cfg.instruction_images)
            self._check_embeddings(self.instruction_images, "data.instruction_images", embed_dim)
            self.instruction_rows = self._usable_instruction_rows()

    def _check_embeddings(self, dataset, key: str, embed_dim: int) -> None:
        if (dataset.n_img, dataset.d_enc) != (self.n_img, embed_dim):
            raise ValueError(f"{key}: embeddings are [{dataset.n_img}, {dataset.d_enc}] per image "
                             f"but the model expects [{self.n_img}, {embed_dim}] "
                             "(model.encoder.num_image_tokens, model.encoder.embed_dim)")

    def _usable_instruction_rows(self) -> np.ndarray:
        """Conversations whose image has an embedding; the others are counted skips."""
        missing = [self.instructions.key(i) for i in range(len(self.instructions))
                   if self.instructions.image_key(i) is not None
                   and self.instructions.image_key(i) not in self.instruction_images]
        if len(missing) > self.cfg.max_skips:
            raise ValueError(
                f"{len(missing)} conversations in {self.cfg.instructions} refer to images with no "
                f"embedding in {self.cfg.instruction_images} (first: {missing[:5]}); "
                f"data.max_skips={self.cfg.max_skips}")
        if missing:
            self.skipped["instructions: image without embedding"] = missing
            logger.warning("data: skipping %d conversations whose image has no embedding",
                           len(missing))
        gone = set(missing)
        return np.array([i for i in range(len(self.instructions))
                         if self.instructions.key(i) not in gone], dtype=np.int64)

    def blend_sources(self) -> list[BlendSource]:
        """Per source: sequence count and the positions, loss tokens and image positions of
        every sequence, as the blend index counts them."""
        from megatron_vlm.data.text_shards import text_shard_prefixes

        common = dict(n_img=self.n_img, eos_id=self.eos_id)
        kinds = {"text": ("text", text_shard_prefixes(self.cfg.text)),
                 "captions": ("caption", self.cfg.captions),
                 "instructions": ("instruction", self.cfg.instructions)}
        out = []
        for name in self.names:
            kind, path = kinds[name]
            rows = self.instruction_rows if name == "instructions" else None
            # With text filling, a caption sequence is all caption source: its filler text
            # counts there too (docs/data.md), so every caption sequence counts L positions.
            padding = name == "captions" and self.fill_text
            out.append(source_from_shards(name, kind, path, self.seq_length, rows=rows,
                                          count_padding=padding, **common))
        return out

    def _filler_documents(self, slot: int) -> Iterator[np.ndarray]:
        """Documents to fill caption slot ``slot`` with: one packed window of the filler text
        split after each EOS (the first may start mid-document)."""
        window = self.filler.window(slot % len(self.filler))
        ends = np.flatnonzero(window == self.eos_id) + 1
        return iter(np.split(window, ends))

    def sample(self, source: str, i: int, slot: int = 0) -> Sample:
        """Sequence ``i`` of ``source`` (as numbered in :meth:`blend_sources`); ``slot`` is the
        sequence's place in the blend, which picks the text that fills a caption sequence."""
        if source == "text":
            return build_text_sample(self.text.window(i), self.eos_id, source=source,
                                     key=f"text:{i}")
        if source == "captions":
            return build_caption_sample(
                self.captions.caption_tokens(i), self.n_img, self.separator_id, self.eos_id,
                self.seq_length, self.pad_id, fill=self.cfg.caption_fill, source=source,
                text_tokens_iter=self._filler_documents(slot) if self.fill_text else None,
                key=self.captions.key(i), image_embedding=self.captions.embedding(i))
        row = int(self.instruction_rows[i])
        image_key = self.instructions.image_key(row)
        embedding = (self.instruction_images.embedding(self.instruction_images.index_of(image_key))
                     if image_key is not None else None)
        return build_instruction_sample(
            self.instructions.tokens(row), self.instructions.loss_mask(row),
            self.n_img if image_key is not None else 0, self.seq_length, self.pad_id, self.eos_id,
            source=source, image_key=image_key, key=self.instructions.key(row),
            image_embedding=embedding)


def build_index(sources: DataSources, cfg) -> BlendIndex:
    """The run's blend index (cached under data.cache_dir or OUTPUT_DIR/blend_cache)."""
    data, train = cfg.data, cfg.train
    cache = data.cache_dir or str(Path(cfg.output_dir) / "blend_cache")
    kwargs = ({"total_tokens": data.total_tokens} if data.total_tokens is not None
              else {"total_tokens": None, "num_batches": train.train_iters})
    import torch.distributed as dist

    def build() -> BlendIndex:
        return build_blend_index(sources.blend_sources(), data.ratios,
                                 seq_length=train.seq_length,
                                 global_batch_size=train.global_batch_size, seed=data.seed,
                                 cache_dir=cache, **kwargs)

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    # Rank 0 builds and caches the index; the others then load it from the cache.
    index = build() if dist.get_rank() == 0 else None
    dist.barrier()
    return index if index is not None else build()


class _RankMicroBatches(torch.utils.data.Dataset):
    """Map-style view of this rank's micro-batches from global batch ``first_batch`` on."""

    def __init__(self, sources: DataSources, index: BlendIndex, dp_rank: int, dp_size: int,
                 micro_batch_size: int, first_batch: int):
        rows = index.global_batch_size // dp_size
        if index.global_batch_size % dp_size or rows % micro_batch_size:
            raise ValueError(f"global batch {index.global_batch_size} does not split into "
                             f"{dp_size} data-parallel ranks of micro-batches of {micro_batch_size}")
        self.sources, self.index = sources, index
        self.dp_rank, self.rows = dp_rank, rows
        self.micro_batch_size = micro_batch_size
        self.per_batch = rows // micro_batch_size
        self.first_batch = first_batch

    def __len__(self) -> int:
        return (self.index.num_batches - self.first_batch) * self.per_batch

    def __getitem__(self, j: int) -> dict:
        g, m = divmod(j, self.per_batch)
        source_ids, sample_ids = self.index.batch(self.first_batch + g)
        start = self.dp_rank * self.rows + m * self.micro_batch_size
        first_slot = (self.first_batch + g) * self.index.global_batch_size + start
        names = self.index.source_names
        picks = [(names[int(s)], int(i)) for s, i in
                 zip(source_ids[start:start + self.micro_batch_size],
                     sample_ids[start:start + self.micro_batch_size])]
        samples = [self.sources.sample(name, i, first_slot + k) for k, (name, i) in enumerate(picks)]
        # Packed filler documents need attention kept inside each document.
        batch = collate(samples, documents=self.sources.fill_text)
        # Ids in SOURCE_ORDER (not the index's order) so they mean the same in every run.
        batch["source_ids"] = torch.tensor([SOURCE_ORDER.index(name) for name, _ in picks])
        # Checked here, in the worker, so the model's forward needs no host synchronisation.
        check_batch(batch, self.sources.n_img,
                    where=f"global batch {self.first_batch + g}, micro-batch {m}")
        return batch


@dataclass
class LoaderState:
    """What a checkpoint stores to resume the loader at exactly the next sample."""

    consumed_global_batches: int = 0


class BlendLoader:
    """Iterates this rank's micro-batches in order, built by background workers."""

    def __init__(self, sources: DataSources, index: BlendIndex, dp_rank: int, dp_size: int,
                 micro_batch_size: int, num_workers: int = 0,
                 state: Optional[LoaderState] = None):
        self.state = state or LoaderState()
        self.dataset = _RankMicroBatches(sources, index, dp_rank, dp_size, micro_batch_size,
                                         self.state.consumed_global_batches)
        self.microbatches_per_step = self.dataset.per_batch
        self._loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, shuffle=False, num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if num_workers else None, persistent_workers=False)
        self._it: Optional[Iterator[dict]] = None

    def next_step(self) -> list[dict]:
        """The micro-batches of the next global batch (this rank's share)."""
        if self._it is None:
            self._it = iter(self._loader)
        batches = [next(self._it) for _ in range(self.microbatches_per_step)]
        self.state.consumed_global_batches += 1
        return batches

    def state_dict(self) -> dict:
        return {"consumed_global_batches": self.state.consumed_global_batches}
