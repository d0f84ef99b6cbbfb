"""ShapesWorld: a small, exactly-labelled synthetic world for tests and the quickstart.

Procedurally drawn images of coloured shapes with captions, LLaVA-format conversations,
VQAv2/POPE/RefCOCO-format evaluation sets, a text corpus with multiple-choice tasks for
lm-eval, and tokenizers trained on all of it, written as raw files in the real formats so
that the project's data tools and evaluation run on them unchanged. Deterministic for a seed.

    from megatron_vlm.synthetic import ShapesWorldConfig, generate
    summary = generate("data/shapesworld", ShapesWorldConfig(seed=0, images=256))

Command line: ``python tools/make_synthetic_data.py --out DIR``; layout in docs/synthetic.md.
"""

from megatron_vlm.synthetic.generate import ShapesWorldConfig, generate, verify
from megatron_vlm.synthetic.scenes import BACKGROUNDS, COLORS, COMBOS, SHAPES, Obj, Scene, World

__all__ = ["ShapesWorldConfig", "generate", "verify", "Scene", "Obj", "World", "SHAPES", "COLORS",
           "BACKGROUNDS", "COMBOS"]
