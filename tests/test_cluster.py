"""SLURM launch through Hydra's submitit launcher: the train and sample launcher configs compose,
and the sbatch file submitit would submit asks for one task per GPU on the nodes named (no SLURM
here: nothing is submitted)."""

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers.configs import compose

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
submitit = pytest.importorskip("submitit")
LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def launcher_config(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return hydra_compose(config, overrides=overrides, return_hydra_config=True).hydra.launcher


def sbatch_text(launcher, folder: Path) -> str:
    """The sbatch file submitit writes for these launcher settings (mapped as the Hydra plugin maps
    them)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_")
    params.pop("submitit_folder")
    timeouts = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=timeouts)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "selfflow"
    named = {key if key in shared else f"slurm_{key}": value for key, value in params.items()}
    executor.update_parameters(**named)
    return executor._executor._make_submission_file_text("python -m submitit.core._submit", "job0")


@pytest.mark.parametrize(
    "config, launcher, extra",
    [
        ("train", "slurm_train", ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]),
        ("sample", "slurm_sample", ["ckpt=runs/x/checkpoints/last.ckpt", "num_samples=50000"]),
    ],
)
def test_slurm_launcher_configs_compose_with_one_task_per_gpu(
    config,
    launcher,
    extra,
    tmp_path,
    monkeypatch,
):
    # submitit looks for srun before it writes anything; it never runs here
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    overrides = [
        f"hydra/launcher={launcher}",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=90",
        *extra,
    ]
    settings = launcher_config(config, overrides)
    assert settings._target_ == LAUNCHER
    assert (settings.nodes, settings.gpus_per_node, settings.tasks_per_node) == (2, 4, 4)
    text = sbatch_text(settings, tmp_path)
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=90",
    ):
        assert f"#SBATCH {line}" in text, text
    assert "srun" in text
    plain = compose(config, extra)  # the launcher changes nothing of the run's own config
    assert "launcher" not in OmegaConf.to_container(plain)


def test_the_launcher_defaults_ask_one_task_per_gpu():
    for launcher in ("slurm_train", "slurm_sample"):
        settings = launcher_config("train", [f"hydra/launcher={launcher}"])
        assert settings.tasks_per_node == settings.gpus_per_node == 8 and settings.nodes == 1
