"""FID during training: every `every_n_steps` optimizer steps, the FID of `num_samples` images from
the EMA model against a reference's statistics, logged as `val/fid`, so that sample quality can be
watched step by step.

The samples are the same at every evaluation (sample i's noise depends on (seed, i) only) and are
shared out over the ranks of a DDP run in contiguous blocks; their Inception features are gathered
and rank 0 computes the FID. The standard Inception network (a local weights file) is loaded once,
the reference statistics computed once.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from pathlib import Path

import lightning as L
import torch

from selfflow.evaluation.inception import POOL_DIM
from selfflow.sampling import writers
from selfflow.sampling.job import SamplingPlan, batches, generate_batches, sampling_condition
from selfflow.training.distributed import callback_forward_context, sharded_over_ranks

log = logging.getLogger("selfflow")
MODALITY = "image"


def own_random_state(device: torch.device) -> AbstractContextManager:
    """The global RNGs (CPU, and `device`'s if a GPU) put back after the block as they were
    before it: whatever the callback draws leaves training's random stream untouched."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class FIDCallback(L.Callback):
    """`val/fid` every `every_n_steps` optimizer steps (0: off): `num_samples` EMA samples
    (`sampler`, `steps`, `cfg_scale`; classes round-robin) against `ref` (an .npz with
    ADM-layout statistics or images, or an image folder), features from the FID Inception
    weights in `inception`."""

    def __init__(
        self,
        every_n_steps: int = 0,
        ref: str | None = None,
        inception: str | None = None,
        num_samples: int = 5000,
        batch_size: int = 50,
        sampler: str = "euler",
        steps: int = 50,
        cfg_scale: float = 1.0,
        seed: int = 0,
        inception_batch_size: int = 64,
    ):
        if every_n_steps < 0 or num_samples < 2 or batch_size < 1:
            raise ValueError(
                f"callbacks.fid: every_n_steps={every_n_steps} must be >= 0 (0: off), num_samples="
                f"{num_samples} >= 2, batch_size={batch_size} >= 1"
            )
        if every_n_steps > 0:
            try:
                import torch_fidelity  # noqa: F401
            except ImportError as error:
                raise ModuleNotFoundError(
                    f"callbacks.fid needs torch-fidelity: pip install -e '.[eval]' ({error})"
                ) from None
            for key, path in (("ref", ref), ("inception", inception)):
                if path is None or not Path(path).expanduser().exists():
                    raise ValueError(
                        f"callbacks.fid.{key}={path}: no such file or folder; val/fid needs "
                        f"callbacks.fid.ref=REF.npz|FOLDER and callbacks.fid.inception=WEIGHTS.pth "
                        f"(docs/evaluation.md)"
                    )
        self.every_n_steps, self.ref, self.inception = every_n_steps, ref, inception
        self.num_samples, self.batch_size, self.sampler, self.steps = (
            num_samples,
            batch_size,
            sampler,
            steps,
        )
        self.cfg_scale, self.seed, self.inception_batch_size = cfg_scale, seed, inception_batch_size
        self.history: list[tuple[int, float]] = []  # (step, fid) of every evaluation
        self._extractor = self._ref_stats = None
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, module) -> None:
        if self.every_n_steps == 0:
            return
        if MODALITY not in module.tokenizers:
            raise ValueError(
                f"callbacks.fid measures images; this run trains {sorted(module.tokenizers)}: "
                f"leave callbacks.fid.every_n_steps=0"
            )
        from selfflow.evaluation.eval_sets import reference_pool_stats
        from selfflow.evaluation.inception import load_inception

        with own_random_state(
            module.device
        ):  # building the network draws its (replaced) initial weights
            self._extractor = load_inception(self.inception, module.device)
            if trainer.is_global_zero:
                self._ref_stats = reference_pool_stats(
                    self.ref, self._extractor, self.inception_batch_size
                )

    @torch.no_grad()
    def pool_features(self, trainer: L.Trainer, module) -> torch.Tensor:
        """pool_3 features [n, 2048] of this rank's block of the samples."""
        model, tokenizer = module.ema_model, module.tokenizers[MODALITY]
        start = self.num_samples * trainer.global_rank // trainer.world_size
        stop = self.num_samples * (trainer.global_rank + 1) // trainer.world_size
        condition = sampling_condition(
            model, tokenizer, dict(module.tokenizers), None, self.num_samples
        )
        plan = SamplingPlan(
            tokenizer=tokenizer,
            condition=condition,
            solver=self.sampler,
            steps=self.steps,
            cfg_scale=self.cfg_scale,
            precision="auto",
            seed=self.seed,
            batch_size=self.batch_size,
        )
        parts = [
            range(start + b.start, start + b.stop) for b in batches(stop - start, self.batch_size)
        ]
        features = [torch.zeros(0, POOL_DIM)]
        with callback_forward_context(trainer):
            for _, images, _ in generate_batches(model, plan, parts=parts):
                features.append(self._extractor(writers.to_uint8(images)).pool)
        return torch.cat(features)

    def gathered(
        self, trainer: L.Trainer, features: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """Every rank's features in sample order [num_samples, POOL_DIM] (blocks padded to one size
        for the gather)."""
        if trainer.world_size == 1:
            return features
        rows = -(-self.num_samples // trainer.world_size)
        padded = torch.zeros(rows, features.shape[1], device=device)
        padded[: len(features)] = features.to(device)
        every = trainer.strategy.all_gather(padded).cpu()  # [world, rows, 2048]
        sizes = [
            self.num_samples * (r + 1) // trainer.world_size
            - self.num_samples * r // trainer.world_size
            for r in range(trainer.world_size)
        ]
        return torch.cat([block[:size] for block, size in zip(every, sizes)])

    def fid(self, trainer: L.Trainer, module) -> float | None:
        """FID of the samples now (on rank 0; None on the others)."""
        from selfflow.evaluation.standard_metrics import GaussianStats, frechet_distance

        with own_random_state(module.device):
            features = self.gathered(trainer, self.pool_features(trainer, module), module.device)
        if not trainer.is_global_zero:
            return None
        return frechet_distance(GaussianStats.of(features), self._ref_stats)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = (
            self.every_n_steps > 0
            and step > 0
            and step % self.every_n_steps == 0
            and step != self._last_step
        )
        if not due or sharded_over_ranks(trainer, "FID callbacks"):
            return
        self._last_step = step
        fid = self.fid(trainer, module)
        if fid is None:
            return
        self.history.append((step, fid))
        for logger in trainer.loggers:  # straight to the loggers: one row at this step
            logger.log_metrics({"val/fid": fid}, step=step)
        log.info(
            "FID of %d EMA samples (%s, %d steps): %.3f at step %d",
            self.num_samples,
            self.sampler,
            self.steps,
            fid,
            step,
        )
