"""DCLM/OpenLM checkpoints into this project's megatron-core checkpoints and back.

* :mod:`megatron_vlm.convert.openlm` -- the OpenLM layout: reading ``epoch_K.pt`` / state dicts /
  HF-layout safetensors, checking keys and shapes, and the key mapping (fused-QKV regrouping,
  SwiGLU halves, vocabulary padding) in both directions;
* :mod:`megatron_vlm.convert.metadata` -- schedule metadata of the converted step and the
  tokenizer check;
* :mod:`megatron_vlm.convert.megatron_io` -- writing a megatron-core distributed checkpoint of
  the VLM at a TP/PP layout, and exporting one back to OpenLM-layout safetensors.

Command-line tools: ``tools/convert_dclm_checkpoint.py`` and ``tools/export_dclm_checkpoint.py``
(docs/convert.md).
"""
