"""Text prompts as sampling conditions: captions encoded once and carried by a `Condition`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from selfflow.tokenizers.text import TextTokenizer
from selfflow.tokens import NO_LABEL, TEXT, Condition, TextTokens


def prompted_condition(
    text_tokenizer: TextTokenizer,
    prompts: Sequence[str],
    per_prompt: int = 1,
    labels: Tensor | None = None,
) -> Condition:
    """Each prompt `per_prompt` times, rows in prompt order; labels: class labels per row (default:
    none, for text-only models)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError(
            "no prompt given: pass at least one caption, e.g. prompt='a handwritten four'"
        )
    captions = [p for p in prompts for _ in range(per_prompt)]
    if labels is None:
        labels = torch.full((len(captions),), NO_LABEL, dtype=torch.long)
    return Condition(labels=labels, text=text_tokenizer.encode(captions))


def prompt_text(tokenizers: dict, prompt, num_samples: int) -> TextTokens | None:
    """Captions for `num_samples` rows: the prompt (a string, or a list cycled over the rows); the
    null text for a text model given no prompt (unconditional samples); None for a model without
    text conditioning."""
    prompts = (
        [] if prompt is None else [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
    )
    text_tokenizer = tokenizers.get(TEXT)
    if text_tokenizer is None:
        if prompts:
            raise ValueError(
                "prompt=... needs a checkpoint trained with text conditioning (a tokenizer.text, "
                "e.g. experiment=text_digits); this checkpoint has none"
            )
        return None
    if not prompts:
        return text_tokenizer.encode([""] * num_samples).null()
    return text_tokenizer.encode([prompts[i % len(prompts)] for i in range(num_samples)])
