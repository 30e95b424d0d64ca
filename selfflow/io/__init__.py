"""File formats and safe file operations: images, audio, video and npz arrays read and
written, digests, bounded sizes, bad-file reports, cache folders, and writes that never follow
a planted link.

Imports nothing of selfflow.
"""
