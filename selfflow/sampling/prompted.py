"""Text prompts (and size conditioning) for sampling, through the solvers' plain model interface.

`generate` / `sample_tokens` call `model.velocity(x, t, pos, labels, modality)` and, for classifier-free guidance,
repeat the batch with `model.null_class` as the label of the unconditional half. `ConditionedModel` fixes the
captions (and sizes) of the batch's rows and reports -1 as its null label, so the unconditional rows get the
null text together with the model's own null label.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from selfflow.tokenizers.text import TextTokenizer, TextTokens

NULL_CONDITION = -1


class ConditionedModel(nn.Module):
    """`model` with per-row text (`TextTokens` of B rows) and/or sizes ([B, 6]) attached.

    Called with k * B rows (guidance stacks the batch), the conditioning repeats k times; rows labelled
    NULL_CONDITION get the null text and the model's null label.
    """

    def __init__(self, model: nn.Module, text: TextTokens | None = None, sizes: Tensor | None = None):
        super().__init__()
        self.model, self.text, self.sizes = model, text, sizes

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def null_class(self) -> int:
        return NULL_CONDITION

    def velocity(self, x: Tensor, t: Tensor, pos: Tensor, labels: Tensor, modality: str) -> Tensor:
        null = labels == NULL_CONDITION  # [B']
        text, sizes = self.text, self.sizes
        if text is not None:
            text = text.repeat(x.shape[0] // text.batch_size).to(x.device).drop(null)
        if sizes is not None:
            sizes = sizes.repeat(x.shape[0] // sizes.shape[0], 1).to(x.device)
        labels = torch.where(null, torch.full_like(labels, self.model.null_class), labels)
        return self.model.velocity(x, t, pos, labels, modality, text=text, sizes=sizes)


def prompted_model(model: nn.Module, text_tokenizer: TextTokenizer, prompts: Sequence[str], per_prompt: int = 1,
                   labels: Tensor | None = None) -> tuple[ConditionedModel, Tensor]:
    """(model for the solvers, labels [P * per_prompt]): each prompt `per_prompt` times, rows in prompt order.

    labels: class labels per row (default: the null label, for text-only models).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompt given: pass at least one caption, e.g. prompt='a handwritten four'")
    captions = [p for p in prompts for _ in range(per_prompt)]
    if labels is None:
        labels = torch.full((len(captions),), model.null_class, dtype=torch.long)
    return ConditionedModel(model, text_tokenizer.encode(captions)), labels


def prompt_text(tokenizers: dict, prompt, num_samples: int) -> TextTokens | None:
    """Captions for `num_samples` rows: the prompt (a string, or a list cycled over the rows); the null text for a
    text model given no prompt (unconditional samples); None for a model without text conditioning."""
    from selfflow.tokenizers.text import TEXT

    prompts = [] if prompt is None else [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
    text_tokenizer = tokenizers.get(TEXT)
    if text_tokenizer is None:
        if prompts:
            raise ValueError("prompt=... needs a checkpoint trained with text conditioning (a tokenizer.text, e.g. "
                             "experiment=text_digits); this checkpoint has none")
        return None
    if not prompts:
        return text_tokenizer.encode([""] * num_samples).null()
    return text_tokenizer.encode([prompts[i % len(prompts)] for i in range(num_samples)])
