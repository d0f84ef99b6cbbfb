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

Image sources and the encoder mode. ``data.captions`` and ``data.instruction_images`` name an
image directory of one of two kinds, read from its ``index.json``: precomputed encoder outputs
(embedding shards) or encoded images (image shards, :mod:`megatron_vlm.data.image_shards`).
``model.encoder.mode=precomputed`` needs embedding shards and batches carry
``image_embeddings``; ``model.encoder.mode=online`` needs image shards, the images are decoded,
resized (each directory's recorded mode) and normalized in the loader's workers
(:mod:`megatron_vlm.data.online_images`) and batches carry ``images`` [k, 3, S, S] for the
encoder to run on. Either kind gives the same blend index: a caption sequence counts the same
positions whatever holds its image. Any other combination stops at start with one error.

A source that holds nothing to train on (a corpus without documents or whose preprocessing did
not finish, an image directory or instruction directory without records, instructions whose
images are all missing) stops at start with one error naming its config key and path.
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
from megatron_vlm.data.batch_tally import BlendTally, SourceTally
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
    """The shards named by a :class:`~megatron_vlm.config.DataConfig`, served as samples.

    ``encoder`` is the run's :class:`~megatron_vlm.config.EncoderConfig`; its ``mode`` decides
    which kind of image directory the image sources must be (module docstring). Without it the
    sources are opened for precomputed embeddings (``mode=precomputed``).
    """

    def __init__(self, data_cfg, seq_length: int, num_image_tokens: int, embed_dim: int,
                 vocab_size: int, encoder=None):
        from megatron_vlm.data.instruction_shards import InstructionDataset
        from megatron_vlm.data.text_shards import training_text_prefixes
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
        self._blend_sources: Optional[list[BlendSource]] = None
        self.text = self.captions = self.instructions = self.instruction_images = None
        self.fill_text = data_cfg.caption_fill == "text" and "captions" in self.names
        self.encoder_given = encoder is not None
        self.encoder_mode = encoder.mode if encoder is not None else "precomputed"
        self.online = self.encoder_mode == "online"
        self.has_image_sources = "captions" in self.names or "instructions" in self.names
        self.images = None  # the online image decoder
        if self.online and self.has_image_sources:
            from megatron_vlm.data.online_images import OnlineImageDecoder

            self.images = OnlineImageDecoder(encoder)
        self.text_prefixes: list[str] = []
        if "text" in self.names or self.fill_text:
            self.text_prefixes = training_text_prefixes(data_cfg.text, "data.text")
        if "text" in self.names:
            self.text = PackedTextWindows(self.text_prefixes, seq_length, seed=data_cfg.seed)
        if self.fill_text:
            # Its own document order (another seed), so filler is not the text source's windows.
            self.filler = PackedTextWindows(self.text_prefixes, seq_length,
                                            seed=data_cfg.seed + 7919)
        if "captions" in self.names:
            self.captions = self._open_images("data.captions", data_cfg.captions, embed_dim)
            _refuse_empty("data.captions", data_cfg.captions, len(self.captions), "image records")
        if "instructions" in self.names:
            self.instructions = InstructionDataset(data_cfg.instructions)
            _refuse_empty("data.instructions", data_cfg.instructions, len(self.instructions),
                          "conversations (tools/preprocess_llava.py wrote none)")
            self.instruction_images = self._open_images("data.instruction_images",
                                                        data_cfg.instruction_images, embed_dim)
            self.instruction_rows = self._usable_instruction_rows()
        if self.online and self.captions is not None and self.instruction_images is not None \
                and self.captions.resize_mode != self.instruction_images.resize_mode:
            logger.warning("data: data.captions images are resized %s, data.instruction_images "
                           "%s; each is loaded with its own mode (the evaluation resizes like "
                           "data.captions)", self.captions.resize_mode,
                           self.instruction_images.resize_mode)

    def _open_images(self, key: str, path: str, embed_dim: int):
        """The image directory ``path`` of config key ``key``, which must be of the kind the
        encoder mode reads: embedding shards (precomputed) or image shards (online)."""
        from megatron_vlm.data.embedding_shards import EMBEDDING_FORMAT
        from megatron_vlm.data.image_shards import IMAGE_FORMAT, STORE_KINDS, open_image_store
        from megatron_vlm.data.shard_io import shard_format

        fmt = shard_format(path)
        wanted = IMAGE_FORMAT if self.online else EMBEDDING_FORMAT
        if fmt != wanted and fmt in STORE_KINDS:
            raise ValueError(self._mismatch_message(key, path, fmt))
        dataset = open_image_store(path)
        if not self.online and (dataset.n_img, dataset.d_enc) != (self.n_img, embed_dim):
            raise ValueError(f"{key}: embeddings are [{dataset.n_img}, {dataset.d_enc}] per image "
                             f"but the model expects [{self.n_img}, {embed_dim}] "
                             "(model.encoder.num_image_tokens, model.encoder.embed_dim)")
        return dataset

    def _mismatch_message(self, key: str, path: str, fmt: str) -> str:
        tool = "tools/precompute_image_embeddings.py"
        if self.online:
            return (f"{key}={path} holds precomputed embeddings (index.json format {fmt!r}) but "
                    f"model.encoder.mode=online runs the encoder on images: point {key} at image "
                    f"shards, written from the same inputs by `{tool} --store images ... "
                    f"--output DIR`, or set model.encoder.mode=precomputed")
        unknown = ("" if self.encoder_given else " (these data sources were opened without "
                   "the encoder config, which reads as precomputed: open them with "
                   "DataSources(..., encoder=cfg.model.encoder))")
        return (f"{key}={path} holds images (index.json format {fmt!r}) but "
                f"model.encoder.mode=precomputed reads precomputed embeddings: set "
                f"model.encoder.mode=online to run the encoder on these images, or point {key} at "
                f"embedding shards, written from the same inputs by `{tool} --store embeddings "
                f"... --output DIR`{unknown}")

    def _usable_instruction_rows(self) -> np.ndarray:
        """Conversations whose image is in data.instruction_images; the others are counted
        skips (e.g. an image the precompute tool skipped as corrupt)."""
        missing = [self.instructions.key(i) for i in range(len(self.instructions))
                   if self.instructions.image_key(i) is not None
                   and self.instructions.image_key(i) not in self.instruction_images]
        if len(missing) > self.cfg.max_skips:
            raise ValueError(
                f"{len(missing)} conversations in {self.cfg.instructions} refer to images that "
                f"are not in {self.cfg.instruction_images} (first: {missing[:5]}); "
                f"data.max_skips={self.cfg.max_skips}")
        if missing:
            self.skipped["instructions: image not in data.instruction_images"] = missing
            logger.warning("data: skipping %d conversations whose image is not in "
                           "data.instruction_images", len(missing))
        gone = set(missing)
        rows = np.array([i for i in range(len(self.instructions))
                         if self.instructions.key(i) not in gone], dtype=np.int64)
        _refuse_empty("data.instructions", self.cfg.instructions, rows.size,
                      f"conversations whose image is in data.instruction_images="
                      f"{self.cfg.instruction_images}")
        return rows

    def blend_sources(self) -> list[BlendSource]:
        """Per source: sequence count and the positions, loss tokens and image positions of
        every sequence, as the blend index counts them (read from the shards once; the blend
        index and the run's token ledger both use them)."""
        if self._blend_sources is None:
            self._blend_sources = self._count_blend_sources()
        return self._blend_sources

    def _count_blend_sources(self) -> list[BlendSource]:
        common = dict(n_img=self.n_img, eos_id=self.eos_id)
        kinds = {"text": ("text", self.text_prefixes),
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
        # Online, a sample names its image (image_key) and the loader decodes the batch's
        # images together (:meth:`decode_images`); precomputed, it carries its embedding.
        if source == "captions":
            key = self.captions.key(i)
            return build_caption_sample(
                self.captions.caption_tokens(i), self.n_img, self.separator_id, self.eos_id,
                self.seq_length, self.pad_id, fill=self.cfg.caption_fill, source=source,
                text_tokens_iter=self._filler_documents(slot) if self.fill_text else None,
                key=key, image_key=key if self.online else None,
                image_embedding=None if self.online else self.captions.embedding(i))
        row = int(self.instruction_rows[i])
        image_key = self.instructions.image_key(row)
        embedding = (self.instruction_images.embedding(self.instruction_images.index_of(image_key))
                     if image_key is not None and not self.online else None)
        return build_instruction_sample(
            self.instructions.tokens(row), self.instructions.loss_mask(row),
            self.n_img if image_key is not None else 0, self.seq_length, self.pad_id, self.eos_id,
            source=source, image_key=image_key, key=self.instructions.key(row),
            image_embedding=embedding)

    def decode_images(self, samples: list[Sample]) -> Optional[torch.Tensor]:
        """Online mode: the images [k, 3, S, S] of the samples that have one, in row order;
        None in precomputed mode (the samples carry their embeddings) or without images."""
        if not self.online:
            return None
        stores = {"captions": self.captions, "instructions": self.instruction_images}
        requests = [(stores[s.source], s.image_key) for s in samples if s.has_image]
        return self.images.decode(requests) if requests else None


def _refuse_empty(key: str, path: str, count: int, what: str) -> None:
    """ValueError naming config key ``key`` and ``path`` when the source has nothing to train
    on: said here, when the data is opened, not later by a blend or sampling internal."""
    if count == 0:
        raise ValueError(f"{key}={path} holds no {what}: nothing to train on; check its "
                         f"preprocessing summary, or drop {key.split('.')[-1]} from data.ratios")


def build_index(sources: DataSources, cfg) -> BlendIndex:
    """The run's blend index (cached under data.cache_dir or OUTPUT_DIR/blend_cache)."""
    data, train = cfg.data, cfg.train
    mode = cfg.model.encoder.mode
    if sources.has_image_sources and sources.encoder_mode != mode:
        # Opened without the encoder config: the batches would carry the wrong image kind.
        raise RuntimeError(f"the data sources were opened for model.encoder.mode="
                           f"{sources.encoder_mode} but the run has model.encoder.mode={mode}; "
                           "open them with DataSources(..., encoder=cfg.model.encoder)")
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
        batch = collate(samples, images=self.sources.decode_images(samples),
                        documents=self.sources.fill_text)
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
        self.index = index
        self.tally = BlendTally(index, sources.blend_sources())
        self.epoch_tokens = self.tally.epoch_tokens
        # What the global batch last returned holds of each source (the run's token ledger
        # adds it up): from the index, on the host, never from the batch's tensors.
        self.last_tally: dict[str, SourceTally] = {}
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
        self.last_tally = self.tally(self.state.consumed_global_batches)
        self.state.consumed_global_batches += 1
        return batches

    def state_dict(self) -> dict:
        return {"consumed_global_batches": self.state.consumed_global_batches}
