"""Datasets over labelled files on disk: class sub-folders, CSV manifests or file-name patterns;
images, video clips, audio clips, and their captions; the square and ADM crops.

Imports `data.batching` (buckets) and `selfflow.io`.
"""
