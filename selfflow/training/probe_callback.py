"""A cheap linear probe during training: the EMA model's student layer on fixed subsets of the
train and test splits, logged as `probe/top1`, so that the representation can be watched improving
step by step.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import Subset

from selfflow.evaluation.features import extract_features, probe_loader
from selfflow.evaluation.linear_probe import fit_linear_probe
from selfflow.evaluation.probe import modality_sources
from selfflow.training.distributed import callback_forward_context, sharded_over_ranks

log = logging.getLogger("selfflow")


def fixed_subset(dataset, size: int, seed: int):
    """At most `size` samples, the same ones at every call (seeded), so successive probes
    are comparable."""
    if size <= 0 or size >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].sort().values.tolist())


class LinearProbe(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end), probe block `objective.student_layer`
    of the EMA model at `noise_level`: heads fit on `train_samples` train samples, top-1 on
    `test_samples` test samples. Multi-modal data is probed per modality (`probe/top1_<modality>`),
    `probe/top1` being their mean.

    Runs inside its own RNG scope, so training draws the same random numbers with or without it.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        train_samples: int = 1024,
        test_samples: int = 512,
        noise_level: float = 0.0,
        epochs: int = 30,
        learning_rates=(0.03, 0.1, 0.3, 1.0),
        weight_decays=(0.0, 1e-3),
        batch_size: int = 256,
        seed: int = 0,
        at_end: bool = True,
    ):
        self.every_n_steps, self.train_samples, self.test_samples = (
            every_n_steps,
            train_samples,
            test_samples,
        )
        self.noise_level, self.epochs, self.batch_size, self.seed = (
            noise_level,
            epochs,
            batch_size,
            seed,
        )
        self.learning_rates, self.weight_decays, self.at_end = (
            tuple(learning_rates),
            tuple(weight_decays),
            at_end,
        )
        self.history: list[tuple[int, float]] = []  # (step, top1) of every probe run
        self._last_step = -1
        self._disabled = False

    def _usable(self, trainer) -> bool:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or int(getattr(datamodule, "num_classes", 0)) < 2:
            if not self._disabled:
                log.warning(
                    "probe callback: the data has no class labels (or no "
                    "datamodule); probe/top1 is off"
                )
            self._disabled = True
        return not self._disabled

    def probe(self, trainer: L.Trainer, module) -> dict[str, float]:
        """Run one probe now: top-1 in [0, 1] per modality of the data (one entry unless it is
        a mixture)."""
        layer, level, device = (
            module.objective.student_layer,
            float(self.noise_level),
            module.device,
        )
        top1 = {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for modality, datamodule in modality_sources(trainer.datamodule).items():
                features = {}
                for split, dataset, size in (
                    ("train", datamodule.train_set, self.train_samples),
                    ("test", datamodule.test_set, self.test_samples),
                ):
                    loader = probe_loader(
                        fixed_subset(dataset, size, self.seed), modality, self.batch_size
                    )
                    with callback_forward_context(trainer):
                        features[split] = extract_features(
                            module.ema_model,
                            module.tokenizers[modality],
                            loader,
                            [layer],
                            [level],
                            seed=self.seed,
                        )[(layer, level)]
                with torch.enable_grad(), torch.inference_mode(False):
                    top1[modality] = fit_linear_probe(
                        features["train"],
                        features["test"],
                        datamodule.num_classes,
                        self.learning_rates,
                        self.weight_decays,
                        self.epochs,
                        self.batch_size,
                        seed=self.seed,
                    ).top1
        return top1

    def _run(self, trainer, module) -> None:
        """Probe once per step at most and log `probe/top1` at the step; nothing when the data has
        no labels."""
        step = trainer.global_step
        if (
            step == self._last_step
            or not self._usable(trainer)
            or sharded_over_ranks(trainer, "probe callbacks")
        ):
            return
        self._last_step = step
        per_modality = self.probe(trainer, module)
        top1 = sum(per_modality.values()) / len(per_modality)
        self.history.append((step, top1))
        metrics = {"probe/top1": top1}
        if len(per_modality) > 1:
            metrics.update({f"probe/top1_{m}": v for m, v in per_modality.items()})
        for logger in (
            trainer.loggers
        ):  # straight to the loggers: one row at this step, also from on_train_end
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update(
            {k: torch.tensor(v) for k, v in metrics.items()}
        )  # the latest, for hparams
        log.info(
            "probe: student layer %d top-1 %s at step %d",
            module.objective.student_layer,
            ", ".join(f"{m} {100 * v:.1f}%" for m, v in per_modality.items()),
            step,
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._run(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if self.at_end:
            self._run(trainer, module)
