"""Multi-process training on CPU (gloo), through the real CLI in a subprocess as Lightning launches it."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import TINY, compose_train

ROOT = Path(__file__).resolve().parents[1]


def train_cli(tmp_path: Path, name: str, *overrides: str) -> Path:
    run_dir = tmp_path / name
    exe = shutil.which("selfflow-train") or "selfflow-train"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = [*TINY, "trainer.max_steps=4", "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=4",
            f"hydra.run.dir={run_dir}", f"+callbacks.dump._target_=tests.ddp_helpers.DumpRankState",
            f"+callbacks.dump.out_dir={run_dir / 'dump'}", *overrides]
    result = subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def first_losses(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_flow")]
    return {k: float(rows[0][k]) for k in ("train/loss_flow",)}


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_with_their_own_noise(tmp_path):
    ddp = train_cli(tmp_path, "ddp", "trainer=ddp", "trainer.devices=2", "data.batch_size=8")
    single = train_cli(tmp_path, "single", "data.batch_size=16")
    rank0 = torch.load(ddp / "dump" / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp / "dump" / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == 2 and rank0["step"] == rank1["step"] == 4
    for part in ("model", "ema"):
        for key, value in rank0[part].items():
            torch.testing.assert_close(value, rank1[part][key], rtol=0, atol=0, msg=f"{part}.{key}")
    # the weights moved, and each rank drew its own masks and noise
    assert not torch.equal(rank0["first_draw"], rank1["first_draw"])
    # at initialisation the output is zero, so the flow loss is E|x1 - x0|^2 over the batch: a rank's half of the
    # global batch must give the same value as the one-process run's full batch, up to sampling noise
    assert first_losses(ddp)["train/loss_flow"] == pytest.approx(first_losses(single)["train/loss_flow"], rel=0.1)


def test_ddp_and_fsdp_trainer_configs_build(tmp_path):
    ddp = compose_train(["trainer=ddp"], tmp_path)
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.gradient_clip_val == 1.0
    fsdp = compose_train(["trainer=fsdp"], tmp_path)
    strategy = instantiate(fsdp.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    from selfflow.models.transformer import TransformerBlock

    assert strategy.kwargs["use_orig_params"] is True
    assert TransformerBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy.sharding_strategy.name == "FULL_SHARD"


def test_callbacks_stand_down_when_the_model_is_sharded_over_ranks(caplog):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from selfflow.training.distributed import callback_forward_context, fsdp_strategy, sharded_over_ranks

    fsdp, single = fsdp_strategy(), SingleDeviceStrategy("cpu")
    many = SimpleNamespace(strategy=fsdp, world_size=2, is_global_zero=True)
    with caplog.at_level("WARNING", logger="selfflow.training"):
        assert sharded_over_ranks(many, "sample grids")
        assert sharded_over_ranks(many, "sample grids")  # warned once
    assert [r.getMessage() for r in caplog.records].count(
        "sample grids are off under FSDP on 2 ranks; run selfflow-sample / selfflow-probe on a checkpoint") == 1
    assert not sharded_over_ranks(SimpleNamespace(strategy=fsdp, world_size=1, is_global_zero=True), "probes")
    assert not sharded_over_ranks(SimpleNamespace(strategy=single, world_size=2, is_global_zero=True), "probes")
    with callback_forward_context(SimpleNamespace(strategy=single)):  # no autocast outside FSDP
        assert not torch.is_autocast_enabled("cpu")
