"""Which throughput features a run uses: ``performance.*`` and ``checkpoint.async_save`` resolved
against what this runtime offers (CUDA or CPU mode, the Transformer Engine layer spec, the
parallel layout).

A field set to null means "on where the run can use it", true asks for the feature and is an
error where it cannot run, false turns it off. :func:`resolve_features` is the one place these
rules live; model building (TransformerConfig), the DDP wrapper and checkpointing read the
resolved :class:`Features`, and its :meth:`Features.describe` line is logged at start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Features:
    """The resolved throughput features of one run (see config.PerformanceConfig)."""

    sequence_parallel: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bias_swiglu_fusion: bool = False
    rope_fusion: bool = False
    gradient_accumulation_fusion: bool = False
    cross_entropy_fusion: bool = False
    cross_entropy_impl: str = "native"
    packed_documents: bool = False
    recompute: str = "none"
    recompute_num_layers: int = 1
    async_save: bool = False

    def describe(self) -> str:
        """One line: the features that are on, and the ones that are off."""
        flags = {k: v for k, v in asdict(self).items() if isinstance(v, bool)}
        on = [k + ("(te)" if k == "cross_entropy_fusion" and self.cross_entropy_impl == "te" else "")
              for k, v in flags.items() if v]
        off = [k for k, v in flags.items() if not v]
        recompute = self.recompute + (f"({self.recompute_num_layers} layers)"
                                      if self.recompute == "full" else "")
        return (f"throughput features: on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'};"
                f" recompute: {recompute}")


def _apex_grad_accumulation_available() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  (apex's extension)
    except ImportError:
        return False
    return True


def _te_cross_entropy_available() -> bool:
    """TE's fused loss, callable without host synchronisation (model/loss.py)."""
    from megatron_vlm.model.loss import te_cross_entropy_available

    return te_cross_entropy_available()


def resolve_features(cfg, *, cuda: bool, transformer_engine: bool,
                     data_parallel: Optional[int] = None) -> Features:
    """``cfg.performance`` and ``cfg.checkpoint.async_save`` for this runtime.

    ``cuda``: the run computes on CUDA (parallel.device=cuda); ``transformer_engine``: the model
    uses the TE layer spec; ``data_parallel``: the data-parallel size (None: from the config).
    """
    perf, par = cfg.performance, cfg.parallel
    tp = par.tensor_parallel
    dp = data_parallel if data_parallel is not None else (par.data_parallel or 1)

    def pick(name: str, auto: bool, requirement: Optional[str]) -> bool:
        """auto for null; for true, ``requirement`` (a reason) must be None."""
        asked = getattr(perf, name)
        if asked is None:
            return auto and requirement is None
        if asked and requirement is not None:
            raise ValueError(f"performance.{name}=true {requirement}")
        return bool(asked)

    sequence_parallel = pick(
        "sequence_parallel", cuda and tp > 1,
        "needs parallel.tensor_parallel > 1" if tp == 1 else None)
    if sequence_parallel and cfg.train.seq_length % tp:
        raise ValueError(f"performance.sequence_parallel: train.seq_length={cfg.train.seq_length} "
                         f"is not divisible by parallel.tensor_parallel={tp}")
    overlap_grad_reduce = pick("overlap_grad_reduce", cuda and dp > 1, None)
    overlap_param_gather = pick(
        "overlap_param_gather", cuda and dp > 1,
        None if par.use_distributed_optimizer
        else "needs the distributed optimizer (parallel.use_distributed_optimizer=true)")
    if overlap_param_gather and not overlap_grad_reduce:
        raise ValueError("performance.overlap_param_gather=true needs "
                         "performance.overlap_grad_reduce (megatron-core overlaps both or the "
                         "reduce only)")
    bias_swiglu_fusion = pick("bias_swiglu_fusion", cuda, None)
    rope_fusion = pick("rope_fusion", True,
                       None if transformer_engine else "needs the Transformer Engine layer spec")
    # Whatever the layer spec, GPTModel's output layer is megatron-core's own
    # ColumnParallelLinear, which refuses to be built with the fusion unless apex's extension
    # imports: TE's fused linear layers alone are not enough.
    if not cuda:
        grad_fusion_missing = "needs a CUDA run (parallel.device=cuda)"
    elif not _apex_grad_accumulation_available():
        grad_fusion_missing = ("needs apex's fused_weight_gradient_mlp_cuda extension, which "
                               "megatron-core's output layer uses whatever the layer spec; apex "
                               "is not installed here (the NGC PyTorch image has it)")
    else:
        grad_fusion_missing = None
    gradient_accumulation_fusion = pick("gradient_accumulation_fusion", True, grad_fusion_missing)
    cross_entropy_fusion = pick("cross_entropy_fusion", cuda, None)
    cross_entropy_impl = "te" if transformer_engine and _te_cross_entropy_available() else "native"
    packed_documents = transformer_engine if perf.packed_documents is None else perf.packed_documents
    if transformer_engine and not packed_documents:
        raise ValueError("performance.packed_documents=false: the Transformer Engine attention "
                         "cannot honour a dense document mask (leave it null)")
    async_save = cfg.checkpoint.async_save
    return Features(
        sequence_parallel=sequence_parallel,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        bias_swiglu_fusion=bias_swiglu_fusion,
        rope_fusion=rope_fusion,
        gradient_accumulation_fusion=gradient_accumulation_fusion,
        cross_entropy_fusion=cross_entropy_fusion,
        cross_entropy_impl=cross_entropy_impl,
        packed_documents=packed_documents,
        recompute=perf.recompute,
        recompute_num_layers=perf.recompute_num_layers,
        async_save=cuda if async_save is None else bool(async_save),
    )
