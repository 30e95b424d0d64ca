"""Training callbacks: sample grids from the EMA weights."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from selfflow.sampling.generate import generate
from selfflow.sampling.writers import save_image_grid

log = logging.getLogger("selfflow")


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end), sample from the EMA model with an Euler ODE and
    save a PNG grid to `<run_dir>/samples/<modality>/step_XXXXXXX.png`: one row per class when the model is
    class-conditional. The noise is fixed, so grids of successive steps are comparable.
    """

    def __init__(self, every_n_steps: int = 500, samples_per_class: int = 8, max_classes: int = 10,
                 num_unconditional: int = 64, steps: int = 50, cfg_scale: float = 1.0, upscale: int = 4,
                 seed: int = 0, dirname: str = "samples"):
        self.every_n_steps, self.samples_per_class, self.max_classes = every_n_steps, samples_per_class, max_classes
        self.num_unconditional, self.steps, self.cfg_scale = num_unconditional, steps, cfg_scale
        self.upscale, self.seed, self.dirname = upscale, seed, dirname
        self.written: list[Path] = []
        self._last_step = -1

    def labels(self, module) -> torch.Tensor:
        model = module.ema_model
        if model.num_classes == 0:
            return torch.full((self.num_unconditional,), model.null_class, dtype=torch.long)
        classes = torch.arange(min(model.num_classes, self.max_classes))
        return classes.repeat_interleave(self.samples_per_class)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, module, name: str) -> list[Path]:
        paths = []
        for modality, tokenizer in module.tokenizers.items():
            if modality != "image":
                continue  # other modalities bring their own writers
            generator = torch.Generator(device=module.device).manual_seed(self.seed)
            labels = self.labels(module)
            images = generate(module.ema_model, tokenizer, labels, steps=self.steps, cfg_scale=self.cfg_scale,
                              generator=generator)
            nrow = self.samples_per_class if module.ema_model.num_classes else None
            path = Path(trainer.default_root_dir) / self.dirname / modality / f"{name}.png"
            paths.append(save_image_grid(images, path, nrow=nrow, upscale=self.upscale))
        self.written += paths
        return paths

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step
        if due and trainer.is_global_zero:
            self._last_step = step
            self.write(trainer, module, f"step_{step:07d}")

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            for path in self.write(trainer, module, "final"):
                log.info("samples: %s", path)
