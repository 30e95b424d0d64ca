"""At the end of a run on built-in digit data: the share of class-conditional samples (EMA weights,
the sample grids' sampler) that local reference classifiers recognise as their class, printed and
written to `<run_dir>/recognition.json` (`selfflow.evaluation.recognition`)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from selfflow.evaluation.recognition import format_recognition, measure_recognition
from selfflow.io.safe_files import write_json_atomically
from selfflow.training.distributed import callback_forward_context, sharded_over_ranks

log = logging.getLogger("selfflow")
REPORT_FILE = "recognition.json"


class Recognition(L.Callback):
    """After training, `samples_per_class` samples of every class per built-in digit modality,
    judged by reference classifiers trained once per data setting into `cache_dir` (later runs reuse
    them). Runs on other data, text-conditioned or unconditional runs are left alone."""

    def __init__(
        self,
        samples_per_class: int = 10,
        steps: int = 50,
        cfg_scale: float = 1.0,
        batch_size: int = 100,
        seed: int = 1,
        cache_dir: str | None = None,
    ):
        if samples_per_class < 1 or steps < 1 or batch_size < 1:
            raise ValueError(
                f"callbacks.recognition: samples_per_class={samples_per_class}, steps={steps} and "
                f"batch_size={batch_size} must be >= 1"
            )
        self.settings = {
            "samples_per_class": samples_per_class,
            "steps": steps,
            "cfg_scale": cfg_scale,
            "batch_size": batch_size,
            "seed": seed,
            "cache_dir": cache_dir,
        }
        self.report: dict = {}

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if not trainer.is_global_zero or sharded_over_ranks(trainer, "recognition shares"):
            return
        with callback_forward_context(trainer):
            self.report = measure_recognition(
                module.ema_model,
                dict(module.tokenizers),
                module.config.get("data") or {},
                log=log.info,
                **self.settings,
            )
        if not self.report:
            return
        path = Path(trainer.default_root_dir) / REPORT_FILE
        write_json_atomically(path, self.report)
        print(
            f"selfflow: samples recognised by the reference classifiers ({path}):\n"
            f"{format_recognition(self.report)}"
        )
