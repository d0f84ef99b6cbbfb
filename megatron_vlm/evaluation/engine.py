"""A checkpoint loaded for inference at this process's TP/PP: batched log-likelihoods and
batched greedy generation with a KV cache, image embeddings spliced as in training.

Loading (:meth:`EvalModel.from_checkpoint`): the model is built from the checkpoint's own config
(``common.json``) plus the caller's overrides, at the tensor/pipeline layout of the running
megatron parallel state, whatever layout it was saved at (megatron-core's distributed checkpoints
reshard on load). Evaluation never uses FP8, sequence parallelism or recomputation (decoding
feeds one position at a time, which cannot be split over the sequence), whatever the training
run used.

Scoring (:meth:`EvalModel.score_tokens`): one forward pass per batch, rows padded on the right.
Attention is causal, so padding after a row's end changes none of its positions. The
log-softmax spans the whole vocabulary although each tensor-parallel rank holds a slice of the
logits: the log-sum-exp, the target's logit and the argmax are combined with three small
all-reduces instead of gathering ``[b, s, vocab]`` logits.

Generation (:meth:`EvalModel.generate`), as megatron-core's static-batching text generation
does it: every row's positions start at 0 (rotary positions are absolute); the batch is
prefilled up to its shortest prompt, then decoded one position at a time with megatron's
``StaticInferenceContext`` KV cache, feeding at position ``t`` the row's own prompt embedding
while ``t`` is inside its prompt and the embedding of the token it generated at ``t - 1`` after.
A row's prompt embedding (``[image x n_img][tokens]``: token embeddings with the image positions
replaced by the projected image features) is computed once, on the first pipeline stage.
So a row's tokens never depend on the other rows of its batch, up to floating-point rounding
of batched kernels. Prompts are grouped by length (longest first) so a batch's rows spend few
steps being forced through their prompts; results come back in the caller's order. A prompt
of ``n`` positions (image positions count) gets at most ``min(max_new_tokens, max_length - n)``
tokens, so prompt and answer fit the model's positions; a prompt with no room is a ValueError.
The local layer spec needs nothing special for the cache: its SDPA attention is causal for the
prefill and, as megatron switches the mask type to ``no_mask`` for cached decoding, attends to
every cached position for the one new query.

Pipeline parallelism: stages run in order, hidden states travel by send/recv
(:mod:`megatron_vlm.evaluation.pipeline_comm`); the last stage picks the next tokens (from
logits megatron gathers over tensor-parallel ranks) and broadcasts them, and every rank keeps
the same per-row state. Per decoding step the host waits once (whether every row has stopped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_vlm.evaluation import pipeline_comm as comm

logger = logging.getLogger("megatron_vlm")


@dataclass
class Prompt:
    """One generation prompt: ``[image x n_img (if image is given)][tokens]``."""

    tokens: list[int]
    """Prompt token ids (for an instruction-tuned model: ``data.samples.tokenize_prompt``)."""
    image: Optional[torch.Tensor] = None
    """Precomputed encoder output [n_img, d_enc] (any float dtype), or with an online encoder
    (``model.encoder.mode=online``) a preprocessed image [3, H, W]; None: a text-only row."""


@dataclass
class Generation:
    """The greedy continuation of one prompt."""

    tokens: list[int]
    """Generated ids, without the stop token."""
    stop: str
    """Why it ended: "stop" (a stop id was generated) or "length" (max_new_tokens reached)."""
    first_logprobs: Optional[torch.Tensor] = None
    """float32 [vocab] log-probabilities at the first generated position (CPU), when asked for."""


class EvalModel:
    """The model of a checkpoint, this rank's pipeline stage, in eval mode.

    Every method is collective over the model-parallel group (the TP x PP ranks that hold one
    replica): all of them call it with the same arguments, and all of them get the result.
    Different data-parallel replicas may be given different inputs.
    """

    cfg: object          # the RunConfig the model was built from (checkpoint config + overrides)
    common: dict         # the checkpoint's common.json
    checkpoint: Path     # the checkpoint directory that was loaded
    model: torch.nn.Module  # this stage's VLMModel
    max_length: int      # the longest sequence the model takes (model.decoder.max_seq_length)
    num_image_tokens: int
    vocab_size: int      # rows of the output layer (the length of Generation.first_logprobs)
    output_vocab: int    # rows that are tokens: the rest (padding for TP) never gets probability
    device: torch.device  # where this rank computes (the runtime's current device)

    def __init__(self, model: torch.nn.Module, cfg, common: Optional[dict] = None,
                 checkpoint: Optional[Path] = None):
        """Wraps an already built (and loaded) VLMModel of this stage; see
        :meth:`from_checkpoint` for the usual way in."""
        from megatron_vlm.runtime.distributed import current_device

        self.model = model.eval()
        self.cfg = cfg
        self.common = common or {}
        self.checkpoint = checkpoint
        self.max_length = int(cfg.model.decoder.max_seq_length)
        self.num_image_tokens = int(cfg.model.encoder.num_image_tokens)
        self.vocab_size = int(cfg.model.decoder.vocab_size)
        # A converted checkpoint's output rows beyond the source model's vocabulary are zeros
        # added to divide it over TP ranks; a logit of 0 would take probability mass.
        source_rows = (self.common.get("source") or {}).get("vocab_size")
        self.output_vocab = int(source_rows or self.vocab_size)
        self.device = current_device()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, overrides: Sequence[str] = ()) -> "EvalModel":
        """Builds the model described by the checkpoint's config (``overrides`` are config
        ``key=value`` items applied on top, e.g. ``train.params_dtype=bf16``) at the TP/PP of the
        already-initialized megatron parallel state (``megatron_vlm.runtime.initialize``), and
        loads its weights (a run directory, a checkpoint directory, or a converted DCLM
        checkpoint). A checkpoint whose shape does not fit gets one clear ValueError."""
        from megatron_vlm.model.build import build_model
        from megatron_vlm.training.checkpointing import (
            check_decoder_matches,
            load_checkpoint,
            read_common,
            resolve_checkpoint,
        )

        directory = resolve_checkpoint(checkpoint)
        common = read_common(directory)
        cfg = _eval_config(common, directory, overrides)
        check_decoder_matches(common, cfg.model.decoder, directory)
        model = build_model(cfg)
        load_checkpoint(directory, model, None, with_rng=False)
        if not dist.is_initialized() or dist.get_rank() == 0:
            par = cfg.parallel
            logger.info("evaluating checkpoint %s (step %s) at TP=%d PP=%d", directory,
                        common.get("step"), par.tensor_parallel, par.pipeline_parallel)
        return cls(model, cfg, common, directory)

    # ----------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def score_tokens(self, rows: Sequence[Sequence[int]], batch_size: int = 8
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Text-only teacher-forced scoring. For each row of n >= 2 token ids: (float64 [n-1]
        log-probability of ``row[i+1]`` given ``row[:i+1]``, bool [n-1] whether ``row[i+1]`` is
        the argmax there). Rows are batched ``batch_size`` at a time, padded on the right; a row
        longer than ``max_length`` is a ValueError."""
        _check_batch_size(batch_size)
        checked = [self._check_row(i, row) for i, row in enumerate(rows)]
        results: list = [None] * len(checked)
        for batch in _longest_first(checked, len, batch_size):
            width = max(len(checked[i]) for i in batch) - 1
            inputs = np.zeros((len(batch), width), np.int64)
            targets = np.zeros((len(batch), width), np.int64)
            for j, i in enumerate(batch):
                row = checked[i]
                inputs[j, :len(row) - 1] = row[:-1]
                targets[j, :len(row) - 1] = row[1:]
            logits = self._stage_forward(torch.from_numpy(inputs).to(self.device))
            packed = None
            if comm.is_last_stage():
                logp, greedy = vocab_parallel_scores(logits,
                                                     torch.from_numpy(targets).to(self.device),
                                                     self.output_vocab)
                packed = torch.stack([logp.double(), greedy.double()])
            packed = comm.broadcast_from_last_stage(packed, (2, len(batch), width), torch.float64,
                                                    self.device).cpu().numpy()
            for j, i in enumerate(batch):
                n = len(checked[i]) - 1
                results[i] = (packed[0, j, :n].copy(), packed[1, j, :n] > 0.5)
        return results

    def _check_row(self, index: int, row: Sequence[int]) -> np.ndarray:
        ids = _token_ids(row)
        if ids is None or ids.size < 2:
            raise ValueError(f"score_tokens: row {index} must be a sequence of at least 2 token "
                             f"ids, got {_describe(row)}")
        if ids.size > self.max_length:
            raise ValueError(f"score_tokens: row {index} has {ids.size} tokens; the model takes "
                             f"at most model.decoder.max_seq_length={self.max_length}")
        self._check_ids(f"score_tokens: row {index}", ids)
        return ids

    def _check_ids(self, where: str, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"{where}: token id {bad} is outside the vocabulary "
                             f"[0, {self.vocab_size})")

    # -------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 128,
                 stop_ids: Sequence[int] = (), batch_size: int = 8,
                 first_logprobs: bool = False) -> list[Generation]:
        """Greedy decoding of every prompt, ``batch_size`` prompts at a time, with a KV cache.
        Prompts of different lengths and with or without images share a batch; the result for a
        prompt does not depend on the other prompts of its batch (equal, token for token, to
        generating it alone). A prompt stops at the first id in ``stop_ids`` (not included in
        ``tokens``) or after ``max_new_tokens``; generation never runs past ``max_length``."""
        _check_batch_size(batch_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be a positive "
                             "integer")
        stops = _token_ids(list(stop_ids))
        if stops is None:
            raise ValueError(f"generate: stop_ids must be token ids, got {_describe(stop_ids)}")
        self._check_ids("generate: stop_ids", stops)
        lengths = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        results: list = [None] * len(prompts)
        for batch in _longest_first(lengths, lambda n: n, batch_size):
            done = self._generate_batch([prompts[i] for i in batch], [lengths[i] for i in batch],
                                        max_new_tokens, stops, first_logprobs)
            for i, generation in zip(batch, done):
                results[i] = generation
        return results

    def _check_prompt(self, index: int, prompt: Prompt) -> int:
        """The prompt's length in positions (image positions included), after checking it."""
        where = f"generate: prompt {index}"
        if not isinstance(prompt, Prompt):
            raise ValueError(f"{where} must be a Prompt, got {type(prompt).__name__}")
        ids = _token_ids(prompt.tokens)
        if ids is None:
            raise ValueError(f"{where}: tokens must be a list of token ids, got "
                             f"{_describe(prompt.tokens)}")
        self._check_ids(where, ids)
        n_img = 0
        if prompt.image is not None:
            image = prompt.image
            online = self.cfg.model.encoder.mode == "online"
            if not isinstance(image, torch.Tensor) or not image.is_floating_point():
                raise ValueError(f"{where}: image must be a float tensor, got "
                                 f"{_describe(image)}")
            if online and image.dim() != 3:
                raise ValueError(f"{where}: image has shape {tuple(image.shape)}; with "
                                 "model.encoder.mode=online it must be a preprocessed image "
                                 "[3, H, W]")
            if not online and (image.dim() != 2 or image.shape[0] != self.num_image_tokens):
                raise ValueError(f"{where}: image embedding has shape {tuple(image.shape)}; "
                                 f"expected [{self.num_image_tokens}, d_enc] (precomputed "
                                 "encoder output)")
            n_img = self.num_image_tokens
        length = n_img + int(ids.size)
        if length == 0:
            raise ValueError(f"{where} is empty (no image and no tokens)")
        if length >= self.max_length:
            raise ValueError(f"{where} has {length} positions ({n_img} image + {ids.size} "
                             f"tokens); model.decoder.max_seq_length={self.max_length} leaves no "
                             "room to generate")
        return length

    def _generate_batch(self, prompts: list[Prompt], lengths: list[int], max_new_tokens: int,
                        stops: np.ndarray, want_first: bool) -> list[Generation]:
        from megatron.core.inference.contexts import StaticInferenceContext

        b, device = len(prompts), self.device
        budgets = [min(max_new_tokens, self.max_length - n) for n in lengths]
        shortest, longest = min(lengths), max(lengths)
        # A row's last generated token is never fed back: it needs n + budget - 1 positions.
        positions = max(n + k - 1 for n, k in zip(lengths, budgets))
        length_t = torch.tensor(lengths, dtype=torch.long, device=device)
        budget_t = torch.tensor(budgets, dtype=torch.long, device=device)
        stop_t = torch.from_numpy(stops).to(device)
        rows = torch.arange(b, device=device)
        generated = torch.zeros(b, max(budgets) + 1, dtype=torch.long, device=device)
        count = torch.zeros(b, dtype=torch.long, device=device)
        stopped = torch.zeros(b, dtype=torch.bool, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        first = None
        if want_first and comm.is_last_stage():
            first = torch.zeros(b, self.vocab_size, dtype=torch.float32, device=device)

        context = StaticInferenceContext(b, positions)
        prompt_input = decoder_input = None
        if comm.is_first_stage():
            prompt_input = self._prompt_embeddings(prompts, longest)  # [longest, b, h]
            decoder_input = prompt_input[:shortest]
        position = shortest - 1  # the position whose next-token logits the forward returns
        steps = shortest
        while True:
            logits = self._stage_forward(None, b, steps, decoder_input, context)
            context.increment_sequence_len_offset(steps)
            next_tokens = None
            if comm.is_last_stage():
                scores = logits[:, -1]
                if self.output_vocab < scores.shape[-1]:
                    scores = scores.clone()
                    scores[:, self.output_vocab:] = float("-inf")
                next_tokens = scores.argmax(dim=-1)
                if first is not None and position < longest:
                    at_first = (length_t - 1 == position).unsqueeze(1)
                    first = torch.where(at_first, torch.log_softmax(scores.float(), dim=-1), first)
            next_tokens = comm.broadcast_from_last_stage(next_tokens, (b,), torch.long, device)
            # Every rank keeps the same per-row state from the broadcast tokens.
            producing = (position >= length_t - 1) & ~finished
            hit_stop = producing & torch.isin(next_tokens, stop_t)
            keep = producing & ~hit_stop
            generated[rows, count] = torch.where(keep, next_tokens, generated[rows, count])
            count += keep
            stopped |= hit_stop
            finished |= hit_stop | (count >= budget_t)
            if bool(finished.all()):  # the one host synchronisation of a step
                break
            position += 1
            steps = 1
            context.enable_decode_mode()
            if comm.is_first_stage():
                token_input = self.model.language_model.embedding(
                    input_ids=next_tokens.unsqueeze(1), position_ids=None)  # [1, b, h]
                if position < longest:
                    forced = (position < length_t).view(1, b, 1)
                    decoder_input = torch.where(forced, prompt_input[position:position + 1],
                                                token_input)
                else:
                    decoder_input = token_input
        if want_first:
            first = comm.broadcast_from_last_stage(first, (b, self.vocab_size), torch.float32,
                                                   device).cpu()
        generated, count, stopped = generated.cpu(), count.tolist(), stopped.tolist()
        return [Generation(tokens=generated[j, :count[j]].tolist(),
                           stop="stop" if stopped[j] else "length",
                           first_logprobs=first[j].clone() if want_first else None)
                for j in range(b)]

    def _prompt_embeddings(self, prompts: list[Prompt], longest: int) -> torch.Tensor:
        """Decoder input [longest, b, d_model] of the batch's prompts, left-aligned (the
        positions after a row's prompt hold token 0's embedding and are never fed)."""
        b, n_img = len(prompts), self.num_image_tokens
        tokens = torch.zeros(b, longest, dtype=torch.long)
        image_mask = torch.zeros(b, longest, dtype=torch.bool)
        images = []
        for j, prompt in enumerate(prompts):
            start = 0
            if prompt.image is not None:
                image_mask[j, :n_img] = True
                images.append(prompt.image)
                start = n_img
            tokens[j, start:start + len(prompt.tokens)] = torch.as_tensor(prompt.tokens,
                                                                         dtype=torch.long)
        stacked = None
        if images:
            shapes = {tuple(image.shape) for image in images}
            if len(shapes) > 1:
                raise ValueError(f"generate: the images of one batch have different shapes "
                                 f"{sorted(shapes)}")
            stacked = torch.stack([image.to(self.device) for image in images])
        online = self.cfg.model.encoder.mode == "online"
        return self.model.embed(tokens.to(self.device), image_mask.to(self.device),
                                None if online else stacked, stacked if online else None)

    # ---------------------------------------------------------------------------- stages

    def _stage_forward(self, tokens: Optional[torch.Tensor], b: Optional[int] = None,
                       s: Optional[int] = None, decoder_input: Optional[torch.Tensor] = None,
                       context=None) -> Optional[torch.Tensor]:
        """Runs this pipeline stage on ``tokens`` [b, s] (first stage: embedded here unless
        ``decoder_input`` [s, b, h] is given); returns the logits on the last stage (all of
        them, [b, s, vocab/TP]; with a KV ``context``: the last position's, gathered over TP,
        [b, 1, vocab]) and None elsewhere."""
        if tokens is not None:
            b, s = tokens.shape
        else:  # the token ids are not used (decoder_input, or the previous stage's output)
            tokens = torch.zeros(b, s, dtype=torch.long, device=self.device)
        if not comm.is_first_stage():
            config = self.model.config
            self.model.set_input_tensor(comm.recv_from_previous_stage(
                (s, b, config.hidden_size), config.pipeline_dtype, self.device))
        out = self.model(tokens, decoder_input=decoder_input, inference_context=context)
        if not comm.is_last_stage():
            comm.send_to_next_stage(out.to(self.model.config.pipeline_dtype))
            return None
        return out


def vocab_parallel_scores(logits: torch.Tensor, targets: torch.Tensor,
                          output_vocab: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 log-softmax of ``targets`` [b, s], bool whether each target is the argmax) for
    ``logits`` [b, s, vocab/TP] split over the tensor-parallel ranks in rank order; rows from
    ``output_vocab`` on (padding) are left out of the softmax.

    Equal to ``log_softmax(full_logits)[target]`` and ``full_logits.argmax() == target`` (the
    first index among ties, as torch's argmax) on every rank, with three all-reduces of
    [b, s] tensors instead of a gather of the logits.
    """
    logits = logits.float()
    local_vocab = logits.shape[-1]
    start = comm.tensor_parallel_rank() * local_vocab
    if output_vocab is not None and start + local_vocab > output_vocab:
        ids = torch.arange(start, start + local_vocab, device=logits.device)
        logits = logits.masked_fill(ids >= output_vocab, float("-inf"))
    local_max, local_arg = logits.max(dim=-1)
    global_max = comm.all_reduce_tensor_parallel(local_max.clone(), dist.ReduceOp.MAX)
    sum_exp = torch.exp(logits - global_max.unsqueeze(-1)).sum(dim=-1)
    log_z = global_max + torch.log(comm.all_reduce_tensor_parallel(sum_exp))
    here = (targets >= start) & (targets < start + local_vocab)
    local_index = (targets - start).clamp(0, local_vocab - 1)
    target_logit = torch.where(here, logits.gather(-1, local_index.unsqueeze(-1)).squeeze(-1),
                               torch.zeros((), dtype=logits.dtype, device=logits.device))
    target_logit = comm.all_reduce_tensor_parallel(target_logit)
    # The first global index reaching the maximum: candidates from ranks holding it, min.
    beyond = torch.iinfo(torch.long).max
    candidate = torch.where(local_max == global_max, local_arg + start,
                            torch.full_like(local_arg, beyond))
    argmax = comm.all_reduce_tensor_parallel(candidate, dist.ReduceOp.MIN)
    return target_logit - log_z, argmax == targets


# ------------------------------------------------------------------------------- helpers


def _eval_config(common: dict, directory: Path, overrides: Sequence[str]):
    """The RunConfig to evaluate with: the checkpoint's config, ``overrides`` on top, the
    runtime's TP/PP, no FP8 / sequence parallelism / recomputation."""
    from megatron.core import parallel_state

    from megatron_vlm.config import config_from_dict

    source = directory / "common.json"
    if not isinstance(common.get("config"), dict):
        raise ValueError(f"{source} has no 'config': cannot tell the model's shape")
    cfg = config_from_dict(common["config"], str(source), overrides)
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel state is not initialized: call "
                           "megatron_vlm.runtime.initialize(...) first")
    par = cfg.parallel
    par.tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
    par.pipeline_parallel = parallel_state.get_pipeline_model_parallel_world_size()
    par.data_parallel = None
    cfg.validate_parallel(par.tensor_parallel * par.pipeline_parallel)  # divisibility checks
    par.data_parallel = None
    cfg.train.fp8 = None
    perf = cfg.performance
    perf.sequence_parallel = False
    perf.recompute = "none"
    perf.overlap_grad_reduce = False
    perf.overlap_param_gather = False
    return cfg


def _longest_first(items: Sequence, length, batch_size: int) -> list[list[int]]:
    """Indices of ``items`` in batches of ``batch_size``, longest first (stable for ties), so
    a batch holds rows of similar length."""
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _token_ids(value) -> Optional[np.ndarray]:
    """``value`` as a 1-D int64 array, or None when it is not a flat sequence of integers."""
    try:
        ids = np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        return None
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        return None
    return ids.astype(np.int64)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
