"""Batch contract, shard formats, sample builders, blend index and loader."""
