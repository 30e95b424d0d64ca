"""Hub-style models: `selfflow-export` writes a folder a model hub accepts (model.safetensors,
config.json without machine paths, a README.md model card); `selfflow.from_pretrained` loads it by
path and, offline, by repo id from huggingface_hub's local cache; `init=pretrained:` fine-tunes from
it."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import selfflow
from selfflow.interop.checkpoint import load_checkpoint
from selfflow.interop.export import EXPORT_CONFIG, EXPORT_WEIGHTS, export_weights
from selfflow.interop.hub import MACHINE_PATH, MODEL_CARD

REPO_ID = "someone/selfflow-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def strings(value):
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


@pytest.fixture(scope="module")
def export(tiny_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "export"
    return export_weights(tiny_checkpoint, folder, metrics={"fid50k": 12.5})


def test_the_export_has_no_machine_paths_and_a_model_card(export, tiny_checkpoint):
    assert sorted(p.name for p in export.iterdir()) == [MODEL_CARD, EXPORT_CONFIG, EXPORT_WEIGHTS]
    text = (export / EXPORT_CONFIG).read_text()
    stored = json.loads(text)["config"]
    assert str(tiny_checkpoint.parents[2]) not in text and os.path.expanduser("~") not in text
    assert not [s for s in strings(stored) if MACHINE_PATH.search(s)]
    assert stored["model"]["depth"] == 2  # the config itself is kept
    card = (export / MODEL_CARD).read_text()
    assert card.startswith("---\nlibrary_name: selfflow\n")
    assert "arXiv:2603.06507" in card and "Chefer" in card
    assert "| fid50k | 12.5 |" in card and "| steps | 2 |" in card and "depth" in card
    assert str(tiny_checkpoint.parents[2]) not in card


def put_in_hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub's cache gives a downloaded model repo (refs/main ->
    snapshots/<commit>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)


def same_weights(a, b) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_from_pretrained_loads_by_path_and_by_repo_id_from_the_local_cache_offline(
    export, tiny_checkpoint, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    put_in_hub_cache(export, tmp_path / "cache", REPO_ID)
    reference = load_checkpoint(tiny_checkpoint).model
    by_path = selfflow.from_pretrained(export)
    by_id = selfflow.from_pretrained(REPO_ID)
    repo = tmp_path / "cache" / f"models--{REPO_ID.replace('/', '--')}"
    assert by_id.path == repo / "snapshots" / COMMIT
    for loaded in (
        by_path,
        by_id,
        selfflow.from_pretrained(f"hf://{REPO_ID}"),
        load_checkpoint(f"hf://{REPO_ID}"),
    ):
        assert same_weights(loaded.model, reference) and loaded.step == 2
    missing = r"not in the local hub cache .*hf download someone/missing"
    with pytest.raises(FileNotFoundError, match=missing):
        selfflow.from_pretrained("someone/missing")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub repo id"):
        selfflow.from_pretrained(str(tmp_path / "nowhere" / "x"))


def test_init_pretrained_fine_tunes_from_the_export(export, tiny_train_cfg, tmp_path):
    from selfflow.training.build import build_run

    cfg = tiny_train_cfg(
        "trainer.max_steps=2", "tokenizer.image.patch_size=4",
        "~callbacks.samples", "~callbacks.probe", f"init=pretrained:{export}",
    )  # fmt: skip
    run = build_run(cfg)
    exported = selfflow.from_pretrained(export).model
    objective = run.module.objective
    assert same_weights(objective.model, exported)
    assert same_weights(objective.teacher.module, exported)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2 and not same_weights(objective.model, exported)
