"""Print a recipe's parameter counts (decoder, projector, vision encoder) without building it.

    python -m megatron_vlm.describe --recipe 1b
    python -m megatron_vlm.describe --recipe tiny model.projector.type=linear --json
    python -m megatron_vlm.describe --help        # also lists every config key

``--json`` prints one JSON object with integer counts: decoder, projector, encoder, total,
trainable (plus the recipe and run name).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

from megatron_vlm.config import RunConfig, config_arg_parser, load_config
from megatron_vlm.model.param_count import model_parameters

PARTS = ("decoder", "projector", "encoder", "total", "trainable")


def describe(cfg: RunConfig) -> dict[str, Any]:
    """The run name and its parameter counts per part."""
    return {"name": cfg.name, **model_parameters(cfg.model)}


def _short(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def format_table(info: dict[str, Any], cfg: RunConfig) -> str:
    dec, enc = cfg.model.decoder, cfg.model.encoder
    lines = [
        f"{info['name']}: decoder {dec.num_layers} layers x d_model {dec.hidden_size}, "
        f"{dec.num_attention_heads} heads, vocab {dec.vocab_size}; projector "
        f"{cfg.model.projector.type}; encoder {enc.open_clip_model} "
        f"({'frozen' if enc.frozen else 'trainable'}, {enc.num_image_tokens} x {enc.embed_dim})",
    ]
    lines += [f"  {part:<10} {info[part]:>16,}  {_short(info[part]):>8}" for part in PARTS]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = config_arg_parser(__doc__.split("\n")[0], prog="python -m megatron_vlm.describe")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        # The checks training makes of the layout, at the smallest world it fits (one replica,
        # or parallel.data_parallel of them): TP=3 with 4 heads stops here as it would there.
        par = cfg.parallel
        cfg.validate_parallel(par.tensor_parallel * par.pipeline_parallel
                              * (par.data_parallel or 1))
        info = {"recipe": args.recipe, **describe(cfg)}
    except (ValueError, RuntimeError) as err:
        print(f"describe: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info) if args.json else format_table(info, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
