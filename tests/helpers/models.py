"""Tiny models, their inputs, and what tests observe in them."""

from __future__ import annotations

import torch
from torch import nn

from selfflow.models.transformer import SelfFlowTransformer
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokens import Condition

# the tokenizer of `random_model`: 16x16 grey images, patch 4 (16 tokens of 16 channels)
TOKENIZER = ImagePatchTokenizer(patch_size=4, channels=1, image_size=16)


def count_calls(module: torch.nn.Module, calls: list) -> None:
    """Append to `calls` on every run of module's forward, recomputations included (checkpointing
    reruns forward methods without firing module hooks)."""
    forward = module.forward
    module.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)


def tiny_model(**kwargs) -> SelfFlowTransformer:
    torch.manual_seed(0)
    args = {"token_channels": {"image": 12}, "width": 32, "depth": 3, "heads": 2, "num_classes": 10}
    return SelfFlowTransformer(**{**args, **kwargs})


def randomize_zero_init(model: nn.Module) -> None:
    """adaLN-Zero starts the modulations and outputs at zero; give them values so comparisons
    mean something."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or "final_layers" in name:
            nn.init.normal_(p, std=0.2)


def inputs(batch=3, grid=4):
    """Image tokens of `tiny_model` (patch 2, 12 channels) for a grid x grid image, and labels (10:
    the null one)."""
    tokenizer = ImagePatchTokenizer(patch_size=2, channels=3, image_size=2 * grid)
    tokens = tokenizer.encode(torch.rand(batch, 3, 2 * grid, 2 * grid))
    labels = torch.tensor([1, 5, 10])[:batch]  # 10 is the null label
    return tokens, Condition(labels)


def random_model(num_classes=10, seed=0) -> SelfFlowTransformer:
    """A tiny model whose adaLN and output layers are non-zero (adaLN-Zero would make every
    velocity 0)."""
    torch.manual_seed(seed)
    model = SelfFlowTransformer({"image": 16}, width=32, depth=2, heads=2, num_classes=num_classes)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()
