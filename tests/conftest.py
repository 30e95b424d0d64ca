"""Shared fixtures: tiny configs composed from the real conf/ tree, real shared data where present,
one tiny trained checkpoint. What the fixtures are built from lives in tests/helpers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import compose_train, shared_dataset
from tests.helpers.files import write_tiny_vae

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_train_cfg(tmp_path):
    def make(*overrides: str, run_dir: Path | None = None):
        return compose_train(list(overrides), run_dir or tmp_path / "run")

    return make


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256 of its bytes)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The last checkpoint of a 2-step tiny digits run, shared by the whole session: a test
    that changes a checkpoint copies it first. Its run folder is checked unchanged at the end
    of the session."""
    from tests.helpers.runs import (
        train_tiny_checkpoint,
    )  # after the environment above: it imports huggingface_hub

    run_dir = tmp_path_factory.mktemp("tiny-run")
    checkpoint = train_tiny_checkpoint(run_dir)
    before = folder_digest(run_dir)
    yield checkpoint
    assert folder_digest(run_dir) == before, (
        f"a test changed the shared tiny run {run_dir}; copy it first"
    )


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """REPA's encoder in the tests: a tiny randomly initialised DINOv2
    (tests.helpers.files.write_tiny_dinov2)."""
    from tests.helpers.files import write_tiny_dinov2

    return write_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2")


@pytest.fixture(scope="session")
def cifar_classes(tmp_path_factory) -> Path:
    """A small class-folder set (train/ and test/, 3 classes) of real CIFAR-10 photos from the
    shared data."""
    import shutil

    source = shared_dataset("cifar10-small")
    root = tmp_path_factory.mktemp("cifar") / "images"
    for split, count in (("train", 8), ("test", 3)):
        for name in ("airplane", "cat", "ship"):
            (root / split / name).mkdir(parents=True)
            for path in sorted((source / split / name).iterdir())[:count]:
                shutil.copy(path, root / split / name / path.name)
    return root


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """A stand-in for the FID Inception weights file
    (tests.helpers.eval_files.write_inception_file)."""
    pytest.importorskip("torch_fidelity")
    from tests.helpers.eval_files import write_inception_file

    return write_inception_file(tmp_path_factory.mktemp("weights"))
