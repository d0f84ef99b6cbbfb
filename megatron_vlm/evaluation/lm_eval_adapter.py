"""lm-eval's model interface on this project's inference engine: text benchmarks (ARC, HellaSwag,
the ShapesWorld tasks ...) scored by a megatron-core checkpoint at any TP/PP/DP.

Importing this module registers :class:`MegatronVLMLM` with lm-eval as ``megatron_vlm``, so that
``lm_eval.simple_evaluate(model="megatron_vlm", model_args="checkpoint=DIR,...")`` and the CLI
(``python -m megatron_vlm.lm_eval``) find it. Two ways to make one:

* programmatic, around a model already loaded:
  ``MegatronVLMLM(EvalModel.from_checkpoint(DIR), tokenizer, batch_size=8)``, then
  ``lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=TaskManager(...))``;
* from lm-eval's argument string (``create_from_arg_string`` / ``create_from_arg_obj``):
  ``checkpoint=DIR,tokenizer=PATH,tensor_parallel=1,pipeline_parallel=1,batch_size=8,
  max_length=N,max_gen_toks=256,device=cpu|cuda``; only ``checkpoint`` is required. It
  initializes the runtime (``megatron_vlm.runtime.initialize`` at that TP/PP, on the device of the
  checkpoint config's ``parallel.device`` unless ``device`` is given) and loads the checkpoint.
  The tokenizer defaults to the checkpoint config's ``data.tokenizer``.

The three request types follow lm-eval's Hugging Face model:

* ``loglikelihood``: ``context + continuation`` is encoded whole and split where the encoded
  context ends (trailing spaces of the context move to the continuation; an empty context is
  the EOS token), left-truncated to ``max_length`` tokens, sorted longest first and batched with
  lm-eval's ``Collator``, and scored by :meth:`EvalModel.score_tokens`; the answer is the sum of
  the continuation tokens' log-probabilities and whether each of them is the argmax. A
  continuation that encodes to nothing, or to ``max_length`` tokens or more, is a ValueError.
  (lm-eval's HF model can score one-token continuations that share a context with one forward
  pass; ``score_tokens`` returns the log-probabilities of the given tokens only, so every
  request is scored on its own row.)
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows (EOS first) of at most
  ``max_length`` tokens, each scored as above and summed per document.
* ``generate_until``: greedy decoding of the text-only prompt (left-truncated to leave room for
  ``max_gen_toks`` new tokens) by :meth:`EvalModel.generate`, stopped by EOS or a stop string
  that is a single token, and cut at the first ``until`` string. Sampling is refused.

Rows never exceed ``max_length`` tokens, context included (``score_tokens`` takes no longer
rows), so a truncated request keeps one context token fewer than lm-eval's HF model keeps.

Parallelism: every process runs lm-eval on all the requests (the adapter reports rank 0 and
world size 1, so lm-eval neither shards nor gathers). Each data-parallel replica scores every
DP-th batch of the sorted requests, the TP x PP ranks of a replica together; the results are
all-gathered over the data-parallel group and restored to the original order, so every process
holds all of them. Processes that were given different requests stop with a RuntimeError
instead of mixing results.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_vlm.evaluation.data_parallel import (
    data_parallel_shard,
    gather_over_data_parallel,
    is_global_rank0,
)
from megatron_vlm.progress import Progress

logger = logging.getLogger("megatron_vlm")

MODEL_NAME = "megatron_vlm"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
# Arguments create_from_arg_string/_obj accept (max_batch_size, which lm-eval always passes, is
# ignored: batches have a fixed size).
ARG_NAMES = ("checkpoint", "tokenizer", "tensor_parallel", "pipeline_parallel", "batch_size",
             "max_length", "max_gen_toks", "device", "eos_token", "max_batch_size")
# lm-eval's CLI passes its --batch_size and --device to every model, with its own defaults (1 and
# "cuda:0") when they were not given; megatron_vlm.lm_eval names the ones the user did not give
# here, so that the defaults of this model (batch 8, the checkpoint's device) apply instead.
_UNGIVEN_LM_EVAL_ARGS: set[str] = set()


def ignore_lm_eval_args(names) -> None:
    """Makes :meth:`MegatronVLMLM.create_from_arg_obj` ignore these of lm-eval's own arguments
    (``"batch_size"``, ``"device"``): the CLI's defaults, not the user's choice."""
    _UNGIVEN_LM_EVAL_ARGS.clear()
    _UNGIVEN_LM_EVAL_ARGS.update(names)


@dataclass(frozen=True)
class ScoredRow:
    """One row for :meth:`EvalModel.score_tokens` and how much of its end is scored."""

    tokens: tuple[int, ...]
    """Context + continuation ids, at most ``max_length`` of them."""
    n_scored: int
    """The continuation's length: the last ``n_scored`` tokens are summed."""


def describe_request(kind: str, index: int, request: Any) -> str:
    """``"loglikelihood request 3 (task arc_easy, doc 1)"``: how errors name a request."""
    task = getattr(request, "task_name", None)
    doc = getattr(request, "doc_id", None)
    where = f" (task {task}, doc {doc})" if task is not None else ""
    return f"{kind} request {index}{where}"


@register_model(MODEL_NAME)
class MegatronVLMLM(LM):
    """An lm-eval LM backed by an :class:`~megatron_vlm.evaluation.engine.EvalModel`."""

    def __init__(self, eval_model, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: Optional[int] = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        """``eval_model``: an EvalModel (or anything with its ``score_tokens``, ``generate``
        and ``max_length``); ``tokenizer``: a :class:`megatron_vlm.data.tokenizer.Tokenizer` or
        the path of one; ``batch_size``: rows per scoring / generation batch on each
        data-parallel replica; ``max_length``: the longest row (default and upper bound: the
        model's ``max_length``); ``max_gen_toks``: default new-token limit of generation."""
        super().__init__()
        if isinstance(tokenizer, (str, Path)):
            from megatron_vlm.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.eval_model = eval_model
        self.tokenizer = tokenizer
        self._batch_size = _positive_int("batch_size", batch_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        model_max = int(eval_model.max_length)
        self._max_length = model_max if max_length is None else _positive_int("max_length",
                                                                              max_length)
        if self._max_length > model_max:
            raise ValueError(f"max_length={self._max_length} exceeds the model's longest "
                             f"sequence ({model_max}, model.decoder.max_seq_length)")
        if self._max_length < 2:
            raise ValueError(f"max_length={self._max_length}: a scored row needs at least 2 "
                             "tokens (one of context, one scored)")
        cfg = getattr(eval_model, "cfg", None)
        vocab_size = cfg.model.decoder.vocab_size if cfg is not None else None
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but "
                             f"the model's vocabulary has {vocab_size} "
                             "(model.decoder.vocab_size): wrong tokenizer for this checkpoint")

    # ------------------------------------------------------------------ construction from args

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """``checkpoint=DIR,tokenizer=PATH,...`` (see the module docstring)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        """The arguments of :meth:`create_from_arg_string` as a dict. lm-eval adds its own
        ``batch_size`` / ``device`` (from ``--batch_size`` / ``--device``); a value given in
        the model arguments wins over them."""
        args = {k: v for k, v in (additional_config or {}).items()
                if v is not None and k not in _UNGIVEN_LM_EVAL_ARGS}
        args.update(arg_dict)
        unknown = sorted(set(args) - set(ARG_NAMES))
        if unknown:
            raise ValueError(f"{MODEL_NAME} model_args: unknown argument(s) {', '.join(unknown)} "
                             f"(known: {', '.join(ARG_NAMES[:-1])})")
        if "checkpoint" not in args:
            raise ValueError(f"{MODEL_NAME} model_args: checkpoint=DIR is required")
        return cls.from_checkpoint(
            args["checkpoint"], tokenizer=args.get("tokenizer"),
            tensor_parallel=args.get("tensor_parallel", 1),
            pipeline_parallel=args.get("pipeline_parallel", 1),
            batch_size=args.get("batch_size", DEFAULT_BATCH_SIZE),
            max_length=args.get("max_length"), max_gen_toks=args.get("max_gen_toks",
                                                                     DEFAULT_MAX_GEN_TOKS),
            device=args.get("device"), eos_token=args.get("eos_token"))

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, tokenizer: Optional[str] = None,
                        tensor_parallel: int = 1, pipeline_parallel: int = 1,
                        batch_size: int = DEFAULT_BATCH_SIZE, max_length: Optional[int] = None,
                        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, device: Optional[str] = None,
                        eos_token: Optional[str] = None) -> "MegatronVLMLM":
        """Initializes the runtime at ``tensor_parallel`` x ``pipeline_parallel`` (unless it
        already is at that layout) and loads ``checkpoint``; every process must call it."""
        from megatron_vlm.data.tokenizer import load_tokenizer
        from megatron_vlm.evaluation.engine import EvalModel
        from megatron_vlm.training.checkpointing import read_common, resolve_checkpoint

        checkpoint = resolve_checkpoint(str(checkpoint))
        saved = read_common(checkpoint).get("config") or {}
        if device is None:
            device = (saved.get("parallel") or {}).get("device")
        elif str(device).startswith("cuda"):  # lm-eval's --device cuda:0 means this host's GPUs
            device = "cuda"
        if tokenizer is None:
            tokenizer = (saved.get("data") or {}).get("tokenizer")
            if tokenizer is None:
                raise ValueError(f"checkpoint {checkpoint}: its config has no data.tokenizer; "
                                 "give tokenizer=PATH in the model arguments")
        tokenizer = load_tokenizer(tokenizer, eos_token=eos_token)
        _ensure_runtime(_positive_int("tensor_parallel", tensor_parallel),
                        _positive_int("pipeline_parallel", pipeline_parallel), device)
        model = EvalModel.from_checkpoint(checkpoint)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length,
                   max_gen_toks=max_gen_toks)

    # ------------------------------------------------------------------ lm-eval's properties

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path).replace("/", "__")

    def get_model_info(self) -> dict:
        """What lm-eval records under ``config`` in its results."""
        checkpoint = getattr(self.eval_model, "checkpoint", None)
        return {"checkpoint": None if checkpoint is None else str(checkpoint),
                "tokenizer": str(self.tokenizer.path), "max_length": self.max_length}

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    # ------------------------------------------------------------------ loglikelihood

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's causal HF model splits them: the whole
        string is encoded and cut where the encoded context ends, so the continuation gets the
        ids it has in running text (" Paris" after "Answer:"), not those of its text alone."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # "Answer: " + "x" scores " x": the space belongs to the continuation
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.eot_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for i, request in enumerate(requests):
            context, continuation = _string_args(request, i, "loglikelihood", 2)
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            rows.append(self._row(context_ids, continuation_ids, "loglikelihood", i, request))
        _check_same_requests("loglikelihood", [r.args for r in requests])
        answers = self._score_rows(rows, disable_tqdm, "loglikelihood")
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        return answers

    def _row(self, context_ids: Sequence[int], continuation_ids: Sequence[int], kind: str,
             index: int, request: Any) -> ScoredRow:
        """The row scored for one request: left-truncated to ``max_length`` tokens; the
        continuation must leave room for at least one context token."""
        if not continuation_ids:
            raise ValueError(f"{describe_request(kind, index, request)}: the continuation "
                             "encodes to no tokens (an empty answer choice?)")
        if len(continuation_ids) >= self.max_length:
            raise ValueError(f"{describe_request(kind, index, request)}: the continuation has "
                             f"{len(continuation_ids)} tokens; "
                             f"at most {self.max_length - 1} fit with max_length="
                             f"{self.max_length}")
        tokens = (list(context_ids) + list(continuation_ids))[-self.max_length:]
        return ScoredRow(tuple(int(t) for t in tokens), len(continuation_ids))

    def _score_rows(self, rows: Sequence[ScoredRow], disable_tqdm: bool,
                    desc: str) -> list[tuple[float, bool]]:
        """(sum of the scored tokens' log-probabilities, all of them greedy) per row, in the
        order of ``rows``."""
        def score(batch: list[ScoredRow]) -> list[tuple[float, bool]]:
            scored = self.eval_model.score_tokens([r.tokens for r in batch],
                                                  batch_size=self.batch_size)
            out = []
            for row, (logprobs, greedy) in zip(batch, scored):
                n = row.n_scored
                out.append((float(logprobs[-n:].sum()), bool(greedy[-n:].all())))
            return out

        # Longest first: the first batch shows at once whether the longest rows fit in memory.
        collator = Collator(list(rows), sort_fn=lambda r: (-len(r.tokens), r.tokens))
        return self._run_batches(collator, score, len(rows), disable_tqdm, desc)

    # ------------------------------------------------------------------ loglikelihood_rolling

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        rows: list[ScoredRow] = []
        owner: list[int] = []  # request index of each window
        for i, request in enumerate(requests):
            (text,) = _string_args(request, i, "loglikelihood_rolling", 1)
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                # a window is its context + max_seq_len tokens; rows hold max_length in all
                max_seq_len=self.max_length - 1, context_len=1)
            for context_ids, continuation_ids in map(make_disjoint_window, windows):
                rows.append(self._row(context_ids, continuation_ids, "loglikelihood_rolling",
                                      i, request))
                owner.append(i)
        _check_same_requests("loglikelihood_rolling", [r.args for r in requests])
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score_rows(rows, disable_tqdm,
                                                            "loglikelihood_rolling")):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generate_until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from megatron_vlm.evaluation.engine import Prompt

        eos_text = self.tokenizer.decode([self.eot_token_id])
        items = []
        # Every request is checked before any is generated: a data-parallel replica must not
        # fail alone while the others wait for its results.
        for i, request in enumerate(requests):
            args = getattr(request, "args", None)
            name = describe_request("generate_until", i, request)
            if not (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str)
                    and isinstance(args[1], dict)):
                raise ValueError(f"{name}: args must be (context: str, gen_kwargs: dict), got "
                                 f"{args!r}")
            context, gen_kwargs = args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"{name}: sampling (do_sample, temperature > 0) is not "
                                 "supported; this model decodes greedily")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            max_new = int(kwargs["max_gen_toks"])
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"{name}: max_gen_toks={max_new} leaves no room for the prompt "
                                 f"with max_length={self.max_length}")
            # The prompt keeps its last tokens, leaving room for max_gen_toks new ones.
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-room:]
            items.append((context, gen_kwargs, prompt, until, max_new))
        _check_same_requests("generate_until", [(c, sorted(g.items(), key=str))
                                                for c, g, _, _, _ in items])

        def generate(batch: list) -> list[str]:
            # The Collator groups by gen_kwargs: the rows of one batch share them.
            _, _, _, until, max_new = batch[0]
            generations = self.eval_model.generate(
                [Prompt(tokens=list(prompt)) for _, _, prompt, _, _ in batch],
                max_new_tokens=max_new, stop_ids=self._stop_ids(until),
                batch_size=self.batch_size)
            return [postprocess_generated_text(self.tokenizer.decode(g.tokens), until, None)
                    for g in generations]

        collator = Collator(items, sort_fn=lambda x: (-len(x[2]), x[0]), group_by="gen_kwargs",
                            group_fn=lambda x: x[1])
        texts = self._run_batches(collator, generate, len(items), disable_tqdm,
                                  "generate_until")
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _stop_ids(self, until: Sequence[str]) -> list[int]:
        """EOS, and every stop string that is one token by itself: generation can end there
        (the text is cut at the first stop string anyway, wherever the tokens split it)."""
        ids = [self.eot_token_id]
        for text in until:
            encoded = self.tok_encode(text) if text else []
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids

    # ------------------------------------------------------------------ batches over DP ranks

    def _run_batches(self, collator: Collator, work: Callable[[list], list], total: int,
                     disable_tqdm: bool, desc: str) -> list:
        """Runs ``work`` on the collator's batches (``batch_size`` each), this data-parallel
        replica taking every DP-th batch; returns all results in the original order."""
        batches = list(collator.get_batched(n=self.batch_size))
        dp_rank, dp_size = data_parallel_shard()
        mine = range(dp_rank, len(batches), dp_size)
        share = desc if dp_size == 1 else f"{desc} (1/{dp_size} per replica)"
        bar = Progress(sum(len(batches[b]) for b in mine), share, "requests",
                       enabled=not disable_tqdm and is_global_rank0())
        done = {}
        for b in mine:
            done[b] = work(batches[b])
            if len(done[b]) != len(batches[b]):
                raise RuntimeError(f"{desc}: {len(done[b])} results for a batch of "
                                   f"{len(batches[b])}")
            bar.update(len(batches[b]))
        bar.close()
        done = dict(gather_over_data_parallel(list(done.items())))
        flat = [result for b in range(len(batches)) for result in done[b]]
        if len(flat) != total:
            raise RuntimeError(f"{desc}: {len(flat)} results for {total} requests")
        return collator.get_original(flat)


# ---------------------------------------------------------------------- helpers


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{MODEL_NAME} model_args: {name}={value!r} must be a positive "
                         "integer") from None
    if number < 1 or (isinstance(value, float) and value != number):
        raise ValueError(f"{MODEL_NAME} model_args: {name}={value!r} must be a positive integer")
    return number


def _string_args(request: Any, index: int, kind: str, count: int) -> tuple[str, ...]:
    args = getattr(request, "args", None)
    if not (isinstance(args, tuple) and len(args) == count
            and all(isinstance(a, str) for a in args)):
        raise ValueError(f"{describe_request(kind, index, request)}: args must be {count} "
                         f"string(s), got {args!r}")
    return args


def _check_same_requests(kind: str, args: Sequence[Any]) -> None:
    """Stops when the processes were given different requests: each replica would score its
    share of a different list, and the gathered results would belong to no request."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    digest = hashlib.sha256(repr(list(args)).encode("utf-8")).hexdigest()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"{kind}: the processes were given different requests (ranks "
                           f"{differing} differ from rank 0); every process must run lm-eval on "
                           "the same tasks, limit and seeds")


def _ensure_runtime(tensor_parallel: int, pipeline_parallel: int, device: Optional[str]) -> None:
    """megatron parallel state at this TP/PP: initialized here unless it already is, at that
    layout (a programmatic caller may have set it up)."""
    from megatron.core import parallel_state

    from megatron_vlm.runtime import initialize

    if parallel_state.model_parallel_is_initialized():
        here = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if here != (tensor_parallel, pipeline_parallel):
            raise ValueError(f"the runtime is already initialized at TP={here[0]} PP={here[1]}; "
                             f"model_args ask for TP={tensor_parallel} PP={pipeline_parallel}")
        return
    initialize(tensor_parallel, pipeline_parallel, device=device)
