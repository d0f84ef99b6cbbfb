"""Model checkpoints as megatron-core distributed checkpoints (reshardable across TP/PP)."""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing


def save_model(model, directory: str | Path) -> None:
    """Saves the model's sharded state dict; every rank of the job must call this."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(directory))


def load_model(model, directory: str | Path) -> None:
    """Loads a checkpoint saved at any TP/PP layout into ``model`` (strict)."""
    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"no distributed checkpoint at {directory} (metadata.json missing)")
    inner = unwrap(model)
    state = dist_checkpointing.load(inner.sharded_state_dict(), str(directory))
    inner.load_state_dict(state, strict=True)


def unwrap(model):
    """The VLM module inside DDP / Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
