"""Samples to tokens and back: image patches, video tubelets, log-mel and waveform audio, latents of
autoencoders loaded from a local path, and text features; each owns its position ids and `decode`.

May import data/ and io/.
"""
