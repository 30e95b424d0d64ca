"""The crafted files the safety tests use are really hostile: an unsafe load does run their code."""

import torch

from tests.helpers.hostile import CreatesAFile, hostile_checkpoint


def test_the_hostile_checkpoint_runs_code_when_loaded_unsafely(tmp_path):
    marker = tmp_path / "pwned"
    path = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)  # what selfflow never does
    assert marker.exists()


def test_the_hostile_object_runs_code_in_any_torch_file(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weights": CreatesAFile(marker)}, tmp_path / "weights.pth")
    torch.load(tmp_path / "weights.pth", weights_only=False)
    assert marker.exists()
