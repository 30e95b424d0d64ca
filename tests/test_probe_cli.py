"""selfflow-probe end to end on a checkpoint of a tiny run: probe.json, the cache across runs, and
the errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.cli.probe import probe
from selfflow.models.transformer import SelfFlowTransformer
from tests.helpers.configs import SMALL_JOINT, compose_probe, compose_train

ROW_TYPES = {
    "layer": int,
    "noise_level": float,
    "pool": str,
    "top1": float,
    "baseline_random_init_top1": float,
    "baseline_input_top1": float,
}


def probe_document(cfg) -> dict:
    """The probe.json document of a single-modality probe."""
    ((_, document),) = probe(cfg).values()
    return document


def fast(checkpoint: Path, tmp_path: Path, *overrides: str):
    return compose_probe(
        f"ckpt={checkpoint}",
        f"out_dir={tmp_path / 'out'}",
        f"cache_dir={tmp_path / 'cache'}",
        "head.epochs=5",
        "head.learning_rates=[0.1]",
        "head.weight_decays=[0.0,0.001]",
        "progress=false",
        *overrides,
    )


@pytest.fixture
def forwards(monkeypatch):
    """Counts backbone forwards (trained and random-init models alike)."""
    calls = []
    original = SelfFlowTransformer.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SelfFlowTransformer, "forward", counted)
    return calls


def test_probe_writes_the_report_and_a_second_run_does_no_forward(
    tiny_checkpoint, tmp_path, forwards
):
    document = probe_document(fast(tiny_checkpoint, tmp_path, "noise_levels=[0.0,0.5]"))
    written = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert written == document
    assert set(written) == {"checkpoint", "dataset", "results", "best"}
    assert (
        written["checkpoint"] == str(tiny_checkpoint.resolve())
        and written["dataset"] == "DigitImages"
    )
    # depth 2: quarters {1, 2} plus the student layer 1; two levels
    assert [(r["layer"], r["noise_level"]) for r in written["results"]] == [
        (1, 0.0),
        (2, 0.0),
        (1, 0.5),
        (2, 0.5),
    ]
    for row in [*written["results"], written["best"]]:
        assert set(row) == set(ROW_TYPES)
        assert all(isinstance(row[k], t) for k, t in ROW_TYPES.items()), row
        assert row["pool"] == "mean"
        assert all(
            0.0 <= row[k] <= 1.0
            for k in ("top1", "baseline_random_init_top1", "baseline_input_top1")
        )
    assert written["best"]["top1"] == max(r["top1"] for r in written["results"])
    assert (
        written["results"][0]["baseline_input_top1"] == written["results"][1]["baseline_input_top1"]
    )
    first = len(forwards)
    assert first > 0

    again = probe_document(
        fast(tiny_checkpoint, tmp_path, "noise_levels=[0.0,0.5]", f"out_dir={tmp_path / 'again'}")
    )
    assert len(forwards) == first  # every feature came from the cache
    assert again == document  # and the numbers are the same: seeded all the way

    probe(
        fast(
            tiny_checkpoint,
            tmp_path,
            "noise_levels=[0.0]",
            "weights=online",
            f"out_dir={tmp_path / 'online'}",
        )
    )
    assert (
        len(forwards) > first
    )  # other weights, other features; the random-init baseline stays cached


def test_probe_attentive_pooling_and_chosen_layers(tiny_checkpoint, tmp_path):
    document = probe_document(
        fast(tiny_checkpoint, tmp_path, "pool=attentive", "layers=[2]", "cache_dir=null")
    )
    assert [(r["layer"], r["pool"]) for r in document["results"]] == [(2, "attentive")]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("layers=[3]", r"layers=\[3\] out of range: this model has blocks 1..2"),
        ("pool=max", "pool='max' is unknown"),
        ("noise_levels=[1.5]", r"noise_levels=\[1.5\] must be"),
        ("weights=student", "weights='student' is unknown"),
    ],
)
def test_probe_option_errors_name_the_key(tiny_checkpoint, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        probe(fast(tiny_checkpoint, tmp_path, override))


def test_probe_refuses_a_dataset_without_labels(tiny_checkpoint, tmp_path):
    root = tmp_path / "unlabelled"
    root.mkdir()
    for i in range(6):  # images directly in the folder: no class sub-folders, no labels
        Image.fromarray(np.full((16, 16), 20 * i, dtype=np.uint8)).save(root / f"{i}.png")
    cfg = fast(
        tiny_checkpoint,
        tmp_path,
        "data=image_folder",
        f"data.root={root}",
        "data.num_workers=0",
        "data.dataset.image_size=16",
        "data.dataset.channels=1",
    )
    with pytest.raises(ValueError, match="needs labelled data"):
        probe(cfg)


def test_probe_refuses_a_checkpoint_that_does_not_fit_its_configured_model(
    tiny_checkpoint, tmp_path
):
    state = torch.load(tiny_checkpoint, weights_only=False)
    state["selfflow_config"]["model"]["width"] = 64
    bad = tmp_path / "bad.ckpt"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="does not fit this model"):
        probe(fast(bad, tmp_path))


def run_cli(args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "selfflow.cli.probe", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_probe_cli_prints_a_table_and_writes_probe_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        [
            f"ckpt={tiny_checkpoint}",
            f"out_dir={out}",
            f"cache_dir={tmp_path / 'cache'}",
            "head.epochs=5",
            "layers=[2]",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random-init" in result.stdout and "input" in result.stdout
    assert f"wrote {out.resolve() / 'probe.json'}" in result.stdout
    document = json.loads((out / "probe.json").read_text())
    assert document["best"]["layer"] == 2
    assert (out / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_probe_cli_errors_are_one_line(tiny_checkpoint, tmp_path):
    result = run_cli(
        [f"ckpt={tiny_checkpoint}", f"out_dir={tmp_path / 'out'}", "layers=[0]"], cwd=tmp_path
    )
    assert result.returncode == 2
    assert "selfflow-probe: error: layers=[0] out of range" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(
        [f"ckpt={tmp_path / 'missing.ckpt'}", f"out_dir={tmp_path / 'out'}"], cwd=tmp_path
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_modality_choice_in_multimodal_data():
    from types import SimpleNamespace

    from selfflow.evaluation.probe_checkpoint import pick_modalities

    image, audio = SimpleNamespace(modality="image"), SimpleNamespace(modality="audio")
    assert pick_modalities({"image": image}, None) == {"image": image}
    assert pick_modalities({"image": image, "audio": audio}, "audio") == {"audio": audio}
    assert pick_modalities({"image": image, "audio": audio}, None) == {
        "image": image,
        "audio": audio,
    }
    with pytest.raises(ValueError, match="modality='video' is not in the data"):
        pick_modalities({"image": image}, "video")


@pytest.mark.slow
def test_a_joint_checkpoint_is_probed_on_every_modality_or_the_one_named(tmp_path):
    from selfflow.training.build import build_run

    run = build_run(
        compose_train(
            [
                *SMALL_JOINT,
                "trainer.max_steps=2",
                "~callbacks.samples",
                "~callbacks.probe",
                "data.batch_size=8",
            ],
            tmp_path / "run",
        )
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    every = probe(fast(ckpt, tmp_path, "layers=[1]"))
    assert sorted(every) == ["audio", "image", "video"]
    for modality, (path, document) in every.items():
        assert path == tmp_path / "out" / modality / "probe.json"
        assert json.loads(path.read_text()) == document and [
            r["layer"] for r in document["results"]
        ] == [1]
    assert (
        every["video"][1]["dataset"] == "MovingDigits"
        and every["audio"][1]["dataset"] == "SpokenDigits"
    )
    one = probe(
        fast(ckpt, tmp_path, "layers=[1]", "modality=audio", f"out_dir={tmp_path / 'audio'}")
    )
    assert one == {
        "audio": (tmp_path / "audio" / "probe.json", every["audio"][1])
    }  # same seed, same numbers
