"""Process groups, device selection and the CPU fallback for megatron-core."""

from megatron_vlm.runtime.distributed import (  # noqa: F401
    RuntimeInfo,
    current_device,
    has_transformer_engine,
    initialize,
    set_seed,
    shutdown,
)
