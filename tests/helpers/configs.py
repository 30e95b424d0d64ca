"""Configs composed from the real conf/ tree: the tests' tiny sizes, the train/sample/probe configs,
the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

# sizes that make any train config run in seconds on a CPU (one-number batch size:
# single-modality data)
TINY_SIZES = [
    "model.depth=2",
    "model.width=32",
    "model.heads=2",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress",
    "~callbacks.recognition",
    "callbacks.samples.steps=2",
    "callbacks.samples.samples_per_class=1",
    "callbacks.samples.every_n_steps=2",
    "callbacks.checkpoint.every_n_train_steps=2",
    "objective.student_layer=1",
    "objective.teacher_layer=2",
]
# the tiny overrides of the tests: the built-in digit images, unless a later experiment=... or
# data=... says
TINY = ["experiment=digits", *TINY_SIZES]

# the joint default made small: tiny built-in video and audio sets (generated once into the cache)
SMALL_JOINT = [
    "experiment=multimodal_digits",
    "data.sources.video.dataset.clips_train=40",
    "data.sources.video.dataset.clips_test=20",
    "data.sources.audio.dataset.voices=[en+m1,en+f1]",
    "data.sources.audio.dataset.takes=3",
    "data.sources.audio.dataset.test_takes=1",
]


def compose(config: str, overrides: list[str]):
    """The config `config` (train, sample, probe) of the package's conf/ tree with `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return hydra_compose(config, overrides=overrides)


def compose_train(overrides: list[str], run_dir: Path, tiny: list[str] = TINY):
    """The train config with `tiny` (the digit images at tiny sizes by default) and
    then `overrides`."""
    import selfflow.training.build  # noqa: F401 - registers the config resolvers

    return compose("train", [*tiny, f"run_dir={run_dir}", *overrides])


def compose_plain(overrides: list[str], run_dir: Path):
    """The config as a user gets it, without the test's tiny sizes."""
    return compose("train", [*overrides, f"run_dir={run_dir}"])


def compose_sample(*overrides: str):
    return compose("sample", ["progress=false", *overrides])


def compose_probe(*overrides: str):
    return compose("probe", list(overrides))


def shared_dataset(name: str) -> Path:
    """The shared data set `name`; the test is skipped where it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent")
    return path
