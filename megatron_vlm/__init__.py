"""megatron-vlm: a training stack for vision-language models on megatron-core."""
