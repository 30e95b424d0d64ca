"""Training callbacks: samples from the EMA weights (PNG grids, MP4 clips with frame strips, WAVs
with spectrograms)."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import lightning as L
import torch

from selfflow.io.safe_files import replace_atomically
from selfflow.sampling.generate import generate
from selfflow.sampling.modalities import modality_io
from selfflow.sampling.prompted import prompted_condition
from selfflow.tokens import TEXT, Condition
from selfflow.training.checkpoint_callback import save_end_of_run
from selfflow.training.distributed import callback_forward_context, sharded_over_ranks
from selfflow.training.logged_media import log_sample_files

log = logging.getLogger("selfflow")

MAX_STEM_BYTES = 120  # file names stay far below the usual 255-byte limit, with room for "_<k>.wav"


def file_stem(text: str, max_bytes: int = MAX_STEM_BYTES) -> str:
    """`text` as one file-name part: path separators and control characters become "-", and a name
    longer than `max_bytes` (UTF-8) is cut and given a digest of the whole name, so that two long
    names stay distinct."""
    stem = re.sub(r"[/\\\x00-\x1f\x7f]", "-", text) or "-"
    if len(stem.encode()) <= max_bytes:
        return stem
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    cut = stem.encode()[: max_bytes - len(digest) - 1].decode(errors="ignore")
    return f"{cut}-{digest}"


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end), sample from the EMA model with an
    Euler ODE and save them under `<run_dir>/samples/<modality>/`, named `step_XXXXXXX` (or `final`:
    a copy of the last step's when they were just made): image: a PNG grid, one row per class when
    the model is class-conditional; video: a PNG strip (one row of frames per clip) and one MP4 per
    clip in a folder of the same name; audio: a PNG of the spectrograms and one WAV per clip in a
    folder of the same name. The noise is fixed, so samples of successive steps are
    comparable. prompts: with a text tokenizer, one row of `samples_per_class` samples per prompt
    instead of per class. Each picture, and the first `logged_clips` clips or recordings, also go to
    the wandb and TensorBoard loggers at the step (`samples/<modality>`).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        samples_per_class: int = 8,
        max_classes: int = 10,
        num_unconditional: int = 64,
        steps: int = 50,
        cfg_scale: float = 1.0,
        upscale: int = 4,
        seed: int = 0,
        dirname: str = "samples",
        prompts: list[str] | None = None,
        logged_clips: int = 8,
    ):
        self.prompts, self.logged_clips = list(prompts or []), logged_clips
        self.every_n_steps, self.samples_per_class, self.max_classes = (
            every_n_steps,
            samples_per_class,
            max_classes,
        )
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
        """Sample every modality and save the files (rank 0)."""
        paths = []
        for modality, tokenizer in module.tokenizers.items():
            if modality == TEXT:  # text conditions the samples; it is not sampled
                continue
            generator = torch.Generator(device=module.device).manual_seed(self.seed)
            condition = self.condition(module)
            with callback_forward_context(trainer):
                samples = generate(
                    module.ema_model,
                    tokenizer,
                    condition,
                    steps=self.steps,
                    cfg_scale=self.cfg_scale,
                    generator=generator,
                )
            folder = Path(trainer.default_root_dir) / self.dirname / modality
            io, stems = modality_io(modality), self.file_stems(trainer, module, condition.labels)
            nrow = self.samples_per_class if module.ema_model.num_classes or self.prompts else None
            files = [
                io.preview(
                    samples,
                    folder / f"{name}.png",
                    tokenizer,
                    nrow=nrow,
                    upscale=self.upscale,
                    titles=stems,
                )
            ]
            if (
                io.playable
            ):  # a picture cannot show motion or sound: a file per clip, the preview shows the rest
                for written in io.write(
                    samples, folder / name, stems, tokenizer, self.upscale, pictures=False
                ).values():
                    files += written
            log_sample_files(
                trainer.loggers,
                f"{self.dirname}/{modality}",
                trainer.global_step,
                files,
                self.logged_clips,
            )
            paths += files
        self.written += paths
        return paths

    def condition(self, module) -> Condition:
        """What the samples are conditioned on: each prompt when prompts and a text tokenizer are
        given, else the classes (or nothing, for an unconditional model)."""
        if self.prompts and TEXT in module.tokenizers:
            return prompted_condition(module.tokenizers[TEXT], self.prompts, self.samples_per_class)
        return Condition(labels=self.labels(module))

    def file_stems(self, trainer: L.Trainer, module, labels: torch.Tensor) -> list[str]:
        """`<class name>_<k>` per sample (`uncond_<k>` for the null label; `<prompt words>_<k>` when
        sampling prompts), for file names and panel titles."""
        if self.prompts and TEXT in module.tokenizers:
            slugs: list[str] = []
            for prompt in (
                self.prompts
            ):  # file-name safe; a repeated slug ("Seven!", "seven") gets its position
                slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
                slugs.append(f"{slug}-{len(slugs)}" if slug in slugs else slug)
            return [f"{slug}_{k}" for slug in slugs for k in range(self.samples_per_class)]
        names = list(getattr(trainer.datamodule, "class_names", None) or [])
        seen: dict[int, int] = {}
        stems = []
        for label in labels.tolist():
            if label == module.ema_model.null_class:
                label_name = "uncond"
            else:
                label_name = names[label] if label < len(names) else f"class{label}"
            seen[label] = seen.get(label, -1) + 1
            stems.append(f"{file_stem(label_name)}_{seen[label]}")
        return stems

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = (
            self.every_n_steps > 0
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
        )
        if due and trainer.is_global_zero and not sharded_over_ranks(trainer, "sample grids"):
            self._last_step = step
            self.write(trainer, module, f"step_{step:07d}")

    def on_train_end(self, trainer, module) -> None:
        save_end_of_run(
            trainer
        )  # the final checkpoint first: a failure while sampling must not lose it
        if trainer.is_global_zero and not sharded_over_ranks(trainer, "sample grids"):
            if (
                self._last_step == trainer.global_step
            ):  # the same weights and noise: the same samples
                paths = self.copy_as(
                    self.written_at_last_step, f"step_{self._last_step:07d}", "final"
                )
            else:
                paths = self.write(trainer, module, "final")
            for path in paths:
                log.info("samples: %s", path)

    @property
    def written_at_last_step(self) -> list[Path]:
        name = f"step_{self._last_step:07d}"
        return [p for p in self.written if name in (p.stem, p.parent.name)]

    def copy_as(self, paths: list[Path], name: str, new_name: str) -> list[Path]:
        """Copies of the files `paths` named `name` (a picture `<name>.png`, or a file in the folder
        `<name>/`) under `new_name`."""
        copies = []
        for path in paths:
            copy = (
                path.with_stem(new_name)
                if path.stem == name
                else path.parent.with_name(new_name) / path.name
            )
            copy.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as source, replace_atomically(copy) as file:
                shutil.copyfileobj(source, file)
            copies.append(copy)
        self.written += copies
        return copies
