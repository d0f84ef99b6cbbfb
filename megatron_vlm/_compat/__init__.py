"""Compatibility helpers that let megatron-vlm run on the package combinations it supports."""
