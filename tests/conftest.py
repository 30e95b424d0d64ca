"""Shared fixtures: tiny configs composed from the real conf/ tree, real shared data where present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# sizes that make any train config run in seconds on a CPU (one-number batch size: single-modality data)
TINY_SIZES = [
    "model.depth=2", "model.width=32", "model.heads=2",
    "data.batch_size=8", "data.num_workers=0",
    "trainer.max_steps=3", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "~callbacks.progress", "~callbacks.recognition", "callbacks.samples.steps=2", "callbacks.samples.samples_per_class=1",
    "callbacks.samples.every_n_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
    "objective.student_layer=1", "objective.teacher_layer=2",
]
# the tiny overrides of the tests: the built-in digit images, unless a later experiment=... or data=... says
TINY = ["experiment=digits", *TINY_SIZES]

# the joint default made small: tiny built-in video and audio sets (generated once into the cache)
SMALL_JOINT = ["experiment=multimodal_digits", "data.sources.video.dataset.clips_train=40",
               "data.sources.video.dataset.clips_test=20", "data.sources.audio.dataset.voices=[en+m1,en+f1]",
               "data.sources.audio.dataset.takes=3", "data.sources.audio.dataset.test_takes=1"]


def compose_train(overrides: list[str], run_dir: Path, tiny: list[str] = TINY):
    """The train config with `tiny` (the digit images at tiny sizes by default) and then `overrides`."""
    from hydra import compose, initialize_config_module

    import selfflow.training.build  # noqa: F401 - registers the config resolvers

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return compose("train", overrides=[*tiny, f"run_dir={run_dir}", *overrides])


@pytest.fixture
def tiny_train_cfg(tmp_path):
    def make(*overrides: str, run_dir: Path | None = None):
        return compose_train(list(overrides), run_dir or tmp_path / "run")

    return make


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent")
    return path


def write_tiny_vae(folder: Path, seed: int = 0, latent_channels: int = 4, **config) -> Path:
    """A randomly initialised diffusers AutoencoderKL with 8x downsampling (32x32 images -> 4x4 latents) and a few
    thousand weights, written with save_pretrained like a real VAE folder."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                      norm_num_groups=4, latent_channels=latent_channels, **config)
    with torch.no_grad():  # posterior std about 0.2, so that the two flips of an image stay apart in a sample
        vae.quant_conv.bias[latent_channels:] = -3.0
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def cifar_classes(tmp_path_factory) -> Path:
    """A small class-folder set (train/ and test/, 3 classes) of real CIFAR-10 photos from the shared data."""
    import shutil

    source = shared_dataset("cifar10-small")
    root = tmp_path_factory.mktemp("cifar") / "images"
    for split, count in (("train", 8), ("test", 3)):
        for name in ("airplane", "cat", "ship"):
            (root / split / name).mkdir(parents=True)
            for path in sorted((source / split / name).iterdir())[:count]:
                shutil.copy(path, root / split / name / path.name)
    return root
