"""Samples to tokens and back: image patches, video tubelets, log-mel and waveform audio, latents of
autoencoders loaded from a local path, and text features; each owns its position ids and `decode`.

`autoencoders.py` loads the published VAEs a latent tokenizer wraps (one table of classes) and
`pretrained.py` decides which pretrained file may load: the one the user names, fingerprints decide.

May import data/ and io/.
"""
