"""Shipped YAML recipes (tiny, 79m, 1b, 7b); load them with megatron_vlm.config.load_config."""
