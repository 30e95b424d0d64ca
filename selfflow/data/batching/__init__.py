"""Samples to batches: collate, sequence packing, aspect-ratio and length buckets, the modality
mixture of a joint run and a data order that is a pure function of (seed, epoch, position).

Imports `selfflow.tokens` only.
"""
