"""One training step, top to bottom, on megatron-core's DDP, optimizer and schedules.

``setup_training`` wraps the model in Megatron DDP and builds the (optionally distributed)
optimizer; ``train_step`` runs megatron's forward/backward schedule (no pipelining or 1F1B,
chosen by megatron from the pipeline size) over the micro-batches of one global batch, then the
optimizer step. The loss is a per-token mean over the whole global batch: megatron sums token
losses and counts, and normalizes gradients by the global token count.

Micro-batches reach the device through :class:`~megatron_vlm.training.device_batches.DeviceMicroBatches`
(the one place batches are copied); every tensor the step creates is made on the device of its
inputs, and the loss stays on the device unless the caller asks for it (:func:`summarize_losses`),
so steps that do not log never wait for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamGroupOverride,
    ParamKey,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vlm.config import DATA_SOURCES as SOURCE_ORDER
from megatron_vlm.runtime.distributed import current_device
from megatron_vlm.training.checkpointing import unwrap
from megatron_vlm.training.device_batches import DeviceMicroBatches
from megatron_vlm.training.grad_finalize import finalize_grads, optimizer_step

@dataclass
class TrainState:
    """The wrapped model, its optimizer and the step count."""

    model: DistributedDataParallel
    optimizer: object
    step: int = 0


def optimizer_config(cfg) -> OptimizerConfig:
    t = cfg.train
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.params_dtype == "bf16",
        params_dtype=torch.bfloat16 if t.params_dtype == "bf16" else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


def setup_training(model, cfg) -> TrainState:
    """Megatron DDP + optimizer around ``model``; wires megatron's grad hooks into its config.

    Gradient-reduce and parameter-gather overlap follow the features the model was built with
    (``model.features``, resolved from ``performance.*``).
    """
    features = model.features
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=features.overlap_grad_reduce,
        overlap_param_gather=features.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    opt_config = optimizer_config(cfg)
    overrides = get_standard_config_overrides(opt_config)  # no decay for biases and gains
    # The projector idles through text-only stages (no image, no gradient); decoupled weight
    # decay alone would shrink it to zero there over a long run. Without decay an idle
    # parameter gets no Adam update at all, and the parameter groups stay the same in every
    # stage, so optimizer state carries over from a text run to image-text training.
    overrides[ParamKey(name="*projector.*")] = ParamGroupOverride(wd_mult=0.0)
    optimizer = get_megatron_optimizer(opt_config, [ddp_model], config_overrides=overrides)
    # megatron's own LR scheduler is what turns wd_mult into each group's decay; this project
    # sets LRs itself (training/schedule.py), so apply the multipliers here, once.
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.train.weight_decay * group.get("wd_mult", 1.0)
    config = model.config
    config.finalize_model_grads_func = finalize_grads  # megatron's, minus its host read
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp_model.no_sync
    return TrainState(model=ddp_model, optimizer=optimizer)


def loss_func(loss_mask: torch.Tensor, source_ids: torch.Tensor | None,
              per_token_loss: torch.Tensor):
    """Summed masked loss and its token count, as megatron's per-token-loss mode expects,
    plus [loss sum, tokens] per data source (row ``i`` = ``SOURCE_ORDER[i]``; all rows of
    batches without ``source_ids`` count as the first) for the per-source log."""
    mask = loss_mask.float()
    token_loss = per_token_loss.float() * mask
    loss_sum = token_loss.sum()
    num_tokens = mask.sum().to(torch.int)
    if source_ids is None:
        source_ids = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    per_source = torch.zeros(len(SOURCE_ORDER), 2, device=mask.device)
    per_source.index_add_(0, source_ids.long(),
                          torch.stack([token_loss.sum(1), mask.sum(1)], dim=1).detach())
    return loss_sum, num_tokens, {"loss by source": per_source}


def forward_step(data_iterator: Iterator[dict], model):
    """megatron forward-step function: one micro-batch (already on the device) through the VLM."""
    batch = next(data_iterator)
    output = model(
        tokens=batch["tokens"],
        labels=batch["labels"],
        attention_mask=batch.get("attention_mask"),
        image_mask=batch.get("image_mask"),
        image_embeddings=batch.get("image_embeddings"),
        images=batch.get("images"),
        segment_ids=batch.get("segment_ids"),
        cu_seqlens=batch.get("cu_seqlens"),
        max_seqlen=batch.get("max_seqlen"),
    )
    return output, partial(loss_func, batch["loss_mask"], batch.get("source_ids"))


def reduce_losses(losses_reduced: list) -> torch.Tensor:
    """[loss sum, tokens] per source of the global batch ([len(SOURCE_ORDER), 2]), on every rank
    and on the device (no host synchronisation).

    Only the last pipeline stage computes losses: it sums them over data-parallel ranks and
    broadcasts them to the other stages.
    """
    total = torch.zeros(len(SOURCE_ORDER), 2, device=current_device())
    if parallel_state.is_pipeline_last_stage():
        total = torch.stack([d["loss by source"] for d in losses_reduced]).sum(0)
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return total


def summarize_losses(loss_sums: torch.Tensor) -> dict:
    """``loss`` (per-token mean) and ``loss/<source>`` for the sources that had tokens, from
    summed [loss, tokens] rows (one step's, or several steps' added up). Reads the device."""
    rows = loss_sums.double().cpu().tolist()
    loss, tokens = (sum(col) for col in zip(*rows))
    out = {"loss": loss / max(tokens, 1.0)}
    for name, (source_loss, source_tokens) in zip(SOURCE_ORDER, rows):
        if source_tokens > 0:
            out[f"loss/{name}"] = source_loss / source_tokens
    return out


def pipeline_shape(cfg, model) -> tuple[int, int]:
    """(seq_length, micro_batch_size) of the activations megatron's pipeline schedule passes
    between stages: [b * s, 1] when documents go to the attention as packed sequences."""
    t = cfg.train
    packed = unwrap(model).packed_documents and cfg.data.caption_fill == "text"
    return (t.seq_length * t.micro_batch_size, 1) if packed else (t.seq_length, t.micro_batch_size)


def train_step(state: TrainState, microbatches: list[dict], num_microbatches: int, cfg,
               summarize: bool = True) -> dict:
    """Forward/backward over ``num_microbatches`` host micro-batches (copied to the device here,
    the next one while the current one computes), then one optimizer step.

    Returns ``loss_sums`` (a device tensor, see :func:`reduce_losses`) and ``grad_norm`` (the
    global gradient norm before clipping, a device tensor); with ``summarize`` the losses and
    the norm as floats (:func:`summarize_losses`; reading them waits for the device). Without
    ``summarize`` nothing in the step waits for the device (tests/test_host_sync.py).
    """
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    seq_length, micro_batch_size = pipeline_shape(cfg, state.model)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=DeviceMicroBatches(microbatches, current_device()),
        model=[state.model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    # The optimizer's phases with megatron's clipping replaced by one that keeps the norm on
    # the device (training/grad_finalize.py).
    update_successful, grad_norm = optimizer_step(state.optimizer, cfg.train.clip_grad)
    if not update_successful:
        raise RuntimeError(f"optimizer step {state.step} failed (non-finite gradients?)")
    state.step += 1
    out = {"loss_sums": reduce_losses(losses), "grad_norm": grad_norm}
    if summarize:
        out.update(summarize_losses(out["loss_sums"]), grad_norm=float(grad_norm))
    return out
