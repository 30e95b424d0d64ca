"""The built-in data sets, made on first use into a cache folder and read through the
folder datasets: handwritten digits (images), moving digits (video), spoken digits (audio), and
their captions.

Imports `data.folders`, `data.batching` and `selfflow.io`.
"""
