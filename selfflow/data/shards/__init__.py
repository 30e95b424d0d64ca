"""WebDataset tar shards as map-style datasets, read by byte ranges from a disk or any object
store fsspec reaches; their index, their writer (`selfflow-shards`), and the latent cache of a
VAE's posteriors.

Imports `data.folders` (decoding options), `data.batching` and `selfflow.io`.
"""
