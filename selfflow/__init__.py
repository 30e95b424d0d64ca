"""selfflow: training Self-Flow models (flow matching with dual-timestep scheduling and EMA
self-distillation).

The public API, importable from the package root without Lightning or Hydra:

    from selfflow import SelfFlowTransformer, SelfFlowObjective, ImagePatchTokenizer, Condition
    from selfflow import load_checkpoint, sample_tokens, from_pretrained

Names are imported on first use, so that `import selfflow` (and the command-line help) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    # core types
    "Tokens": "selfflow.tokens",
    "PackedTokens": "selfflow.tokens",
    "TextTokens": "selfflow.tokens",
    "Condition": "selfflow.tokens",
    # the model and the objective
    "SelfFlowTransformer": "selfflow.models.transformer",
    "SelfFlowObjective": "selfflow.objectives.selfflow",
    # tokenizers
    "ImagePatchTokenizer": "selfflow.tokenizers.image",
    "VideoTubeletTokenizer": "selfflow.tokenizers.video",
    "AudioMelTokenizer": "selfflow.tokenizers.audio",
    "TextTokenizer": "selfflow.tokenizers.text",
    # sampling
    "sample_tokens": "selfflow.sampling.generate",
    "generate": "selfflow.sampling.generate",
    "NoiseSource": "selfflow.sampling.generate",
    # checkpoints: selfflow's own, its exports, and the released Self-Flow model
    "load_checkpoint": "selfflow.interop.checkpoint",
    "load_official": "selfflow.interop.official",
    # hub-style models: an export folder or a hub repo id in the local cache
    "from_pretrained": "selfflow.interop.hub",
    "push_to_hub": "selfflow.interop.hub",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'selfflow' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
