"""The data path: shard formats, the preprocessing and image-precompute drivers the tools call,
sample builders, the batch contract, the blend index and the loader (module map: docs/data.md)."""
