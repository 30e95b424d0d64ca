"""Generation jobs: noise tokens through a solver to samples, decoded and written as PNG, MP4, WAV
and NPZ, split over ranks and resumable by chunks.

May import interop/, flow/, tokenizers/, data/, io/.
"""
