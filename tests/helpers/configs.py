"""Configs composed from the real conf/ tree, made small enough to run in seconds on a CPU."""
from __future__ import annotations

from pathlib import Path

# overrides that make any train config run in seconds on a CPU; images only unless a later experiment=... says
TINY = [
    "experiment=digits",
    "model.depth=2", "model.width=32", "model.heads=2",
    "data.batch_size=8", "data.num_workers=0",
    "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "~callbacks.progress", "callbacks.samples.steps=2", "callbacks.samples.samples_per_class=1",
    "callbacks.samples.every_n_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
    "objective.student_layer=1", "objective.teacher_layer=2",
]

# the joint default made small: tiny built-in video and audio sets (generated once into the cache)
SMALL_JOINT = ["experiment=multimodal_digits", "data.sources.video.dataset.clips_train=40",
               "data.sources.video.dataset.clips_test=20", "data.sources.audio.dataset.voices=[en+m1,en+f1]",
               "data.sources.audio.dataset.takes=3", "data.sources.audio.dataset.test_takes=1"]


def compose_train(overrides: list[str], run_dir: Path):
    from hydra import compose, initialize_config_module

    import selfflow.training.build  # noqa: F401 - registers the config resolvers

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return compose("train", overrides=[*TINY, f"run_dir={run_dir}", *overrides])


def compose_sample(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return compose("sample", overrides=["progress=false", *overrides])
