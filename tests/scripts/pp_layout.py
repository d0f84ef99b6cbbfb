"""Under torchrun with 2 ranks at PP=2: reports what each pipeline stage built, as JSON."""

import json

import torch.distributed as dist

from megatron_vlm.config import load_config
from megatron_vlm.logs import configure_logging
from megatron_vlm.model.build import build_model
from megatron_vlm.runtime import initialize, shutdown

configure_logging()
cfg = load_config("tiny", ["parallel.pipeline_parallel=2", "model.decoder.num_layers=4"])
initialize(1, 2, seed=cfg.seed)
model = build_model(cfg)
report = {
    "rank": dist.get_rank(),
    "layers": len(model.language_model.decoder.layers),
    "layer_numbers": [layer.layer_number for layer in model.language_model.decoder.layers],
    "has_embedding": model.language_model.pre_process,
    "has_output_layer": model.language_model.post_process,
    "has_projector": model.projector is not None,
}
reports = [None, None]
dist.all_gather_object(reports, report)
if dist.get_rank() == 0:
    print(json.dumps(reports))
shutdown()
