"""Test-only callback: each rank writes its weights and a fingerprint of its first noise draw at the end."""
from pathlib import Path

import lightning as L
import torch


class DumpRankState(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0 and not hasattr(self, "first_draw"):
            state = torch.get_rng_state()
            self.first_draw = torch.rand(8)  # what the objective's next draw would be based on
            torch.set_rng_state(state)

    def on_train_end(self, trainer, module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": module.model.state_dict(), "ema": module.ema_model.state_dict(),
                    "first_draw": self.first_draw, "step": trainer.global_step, "world_size": trainer.world_size},
                   self.out_dir / f"rank{trainer.global_rank}.pt")
