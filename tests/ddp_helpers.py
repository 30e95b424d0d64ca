"""Test-only callback: each rank writes its weights, a fingerprint of its first noise draw and, step
by step, what it trained on and a digest of its weights after the step."""

import hashlib
from pathlib import Path

import lightning as L
import torch


def digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order: equal digests mean bit-identical weights."""
    sha = hashlib.sha256()
    for p in module.parameters():
        sha.update(p.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def batch_contents(batch: dict) -> dict[str, tuple[int, float]]:
    """{modality: (samples, sum of their data)} of a single-modality or a mixed batch."""
    groups = batch["groups"] if "groups" in batch else {batch["modality"]: batch}
    return {
        m: (len(g["label"]), float(g["data"].double().sum())) for m, g in sorted(groups.items())
    }


def optimizer_steps(trainer, module) -> dict[str, int]:
    """{modality: the steps the optimizer took on its input projection} (absent from a step:
    not stepped)."""
    state = trainer.optimizers[0].state
    return {
        m: int(state[proj.weight]["step"]) if proj.weight in state else 0
        for m, proj in module.model.input_proj.items()
    }


class DumpRankState(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0 and not hasattr(self, "first_draw"):
            state = torch.get_rng_state()
            self.first_draw = torch.rand(8)  # what the objective's next draw would be based on
            torch.set_rng_state(state)
        self.contents = batch_contents(batch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(
            {
                "contents": self.contents,
                "model": digest(module.model),
                "ema": digest(module.ema_model),
            }
        )

    def on_train_end(self, trainer, module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": module.model.state_dict(),
                "ema": module.ema_model.state_dict(),
                "first_draw": self.first_draw,
                "step": trainer.global_step,
                "world_size": trainer.world_size,
                "steps": self.steps,
                "optimizer_steps": optimizer_steps(trainer, module),
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )
