"""Files to samples, samples to batches; plain PyTorch datasets and samplers (no Lightning).

Stages, lowest first (a stage imports only the ones before it, and `selfflow.io`/`selfflow.tokens`):
  batching/  collate, packing, aspect and length buckets, the modality mixture, a data order
             that resumes
  folders/   labelled files in folders or manifests: image, video, audio and captioned
             datasets, crops
  shards/    WebDataset tar shards on disk or in an object store, their index and writer, the
             latent cache
  builtin/   the built-in sets generated on first use (digits, moving digits, spoken digits)
"""
