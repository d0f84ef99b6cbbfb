"""Decoder spec (DCLM/OpenLM block), projector, vision encoder and the VLM module."""
