"""At the end of a run on built-in digit data: the share of class-conditional samples (EMA weights, the sample
grids' sampler) that a local reference classifier recognises as their class, printed and written to
`<run_dir>/recognition.json`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from selfflow.evaluation.recognition import JUDGED_LABELS, cached_reference, format_recognition, judge, \
    reference_key, train_reference
from selfflow.sampling.generate import generate
from selfflow.tokens import TEXT, Condition
from selfflow.training.distributed import callback_forward_context, sharded_over_ranks

log = logging.getLogger("selfflow")
REPORT_FILE = "recognition.json"


def dataset_configs(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{modality: dataset config} of a run's (resolved) data config: each source of a mixture, or the one dataset."""
    if "sources" in data:
        return {modality: source["dataset"] for modality, source in data["sources"].items() if "dataset" in source}
    return {data["modality"]: data["dataset"]} if "dataset" in data and "modality" in data else {}


class Recognition(L.Callback):
    """After training, `samples_per_class` samples of every class per judged modality (the built-in digit sets,
    `JUDGED_LABELS`), judged by reference classifiers trained once per data setting into `cache_dir` (seconds on a
    CPU; later runs reuse them). Runs with other data, text conditioning or no classes are left alone."""

    def __init__(self, samples_per_class: int = 10, steps: int = 50, cfg_scale: float = 1.0, batch_size: int = 100,
                 seed: int = 1, cache_dir: str | None = None):
        if samples_per_class < 1 or steps < 1 or batch_size < 1:
            raise ValueError(f"callbacks.recognition: samples_per_class={samples_per_class}, steps={steps} and "
                             f"batch_size={batch_size} must be >= 1")
        self.samples_per_class, self.steps, self.cfg_scale = samples_per_class, steps, cfg_scale
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, cache_dir
        self.report: dict[str, dict[str, Any]] = {}

    def judged_sets(self, module) -> dict[str, dict[str, Any]]:
        """{modality: dataset config} of the modalities this run can be judged on."""
        if module.ema_model.num_classes == 0 or TEXT in module.tokenizers:
            return {}
        configs = dataset_configs(module.config.get("data") or {})
        return {m: c for m, c in configs.items() if m in module.tokenizers and c.get("_target_") in JUDGED_LABELS}

    def classifiers(self, modality: str, dataset_config: dict[str, Any], device) -> tuple[dict, dict]:
        """({label: reference classifier}, {label: its test accuracy}) for one modality's data set."""
        make = instantiate(dataset_config)  # a partial: split= (and label=) complete it
        classifiers, accuracies = {}, {}
        for label in JUDGED_LABELS[dataset_config["_target_"]]:
            chosen = {"label": label} if "label" in dataset_config else {}

            def train(chosen=chosen):
                log.info("recognition: training the %s reference classifier for %s (once; cached)", modality, label)
                return train_reference(make(split="train", **chosen), make(split="test", **chosen), modality)

            classifiers[label], accuracies[label] = cached_reference(reference_key(dataset_config, label), train,
                                                                     self.cache_dir, device)
        return classifiers, accuracies

    @torch.no_grad()
    def samples(self, module, tokenizer, labels: torch.Tensor) -> torch.Tensor:
        """Decoded samples of `labels` [B] from the EMA weights, `batch_size` at a time, noise fixed by `seed`."""
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        parts = [generate(module.ema_model, tokenizer, Condition(labels=part), steps=self.steps,
                          cfg_scale=self.cfg_scale, generator=generator) for part in labels.split(self.batch_size)]
        return torch.cat([part.float().cpu() for part in parts])

    def measure(self, trainer: L.Trainer, module) -> dict[str, dict[str, Any]]:
        report = {}
        for modality, dataset_config in self.judged_sets(module).items():
            with torch.random.fork_rng(devices=[]):
                classifiers, accuracies = self.classifiers(modality, dataset_config, "cpu")
            labels = torch.arange(module.ema_model.num_classes).repeat_interleave(self.samples_per_class)
            with callback_forward_context(trainer):
                samples = self.samples(module, module.tokenizers[modality], labels)
            entry = judge(classifiers, dataset_config.get("label", "digit"), samples, labels)
            report[modality] = {**entry, "reference_test_accuracy": accuracies, "steps": self.steps,
                                "cfg_scale": self.cfg_scale}
        return report

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if not trainer.is_global_zero or sharded_over_ranks(trainer, "recognition shares"):
            return
        self.report = self.measure(trainer, module)
        if not self.report:
            return
        path = Path(trainer.default_root_dir) / REPORT_FILE
        path.write_text(json.dumps(self.report, indent=2))
        print(f"selfflow: samples recognised by the reference classifiers ({path}):\n"
              f"{format_recognition(self.report)}")
