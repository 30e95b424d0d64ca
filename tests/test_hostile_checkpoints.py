"""Checkpoints, exports and run folders from strangers: each hostile file is built here, and every
test asserts that nothing happened besides a one-line refusal (no marker file created, no file
outside the run touched)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from selfflow.interop.checkpoint import load_checkpoint
from selfflow.interop.export import EXPORT_CONFIG, EXPORT_WEIGHTS, export_weights
from selfflow.safe_config import (
    MOVED_TARGETS,
    NEVER_REBUILT,
    STORED_TARGETS,
    StoredConfigError,
    instantiate_stored,
)
from selfflow.training.run import train
from selfflow.training.run_folder import (
    RunFolderError,
    lock_run_folder,
    release_run_folder,
    run_folder_lock,
)
from tests.helpers.configs import TINY, compose_train
from tests.helpers.hostile import assert_one_line_exit_2, crafted, one_line, run_cli

REPO = Path(__file__).resolve().parents[1]


def payloads(marker: Path) -> dict[str, dict]:
    """Configs that create `marker` if anything builds them."""
    return {
        "open": {"_target_": "builtins.open", "_args_": [str(marker), "w"]},
        # importable through a selfflow module that imports os: a prefix test would let it pass
        "system": {
            "_target_": "selfflow.training.run_folder.os.system",
            "_args_": [f"touch {marker}"],
        },
    }


# --- stored configs are built through the allow-list ----------------------------------------------


def stored_targets(node) -> set[str]:
    """Every `_target_` string at any depth of a plain config."""
    if isinstance(node, dict):
        own = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return own.union(*(stored_targets(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(stored_targets(v) for v in node))
    return set()


def test_every_target_selfflows_own_configs_can_store_is_allowed():
    from hydra import compose, initialize_config_module

    conf = REPO / "conf"
    variants = [[f"experiment={p.stem}"] for p in sorted((conf / "experiment").glob("*.yaml"))]
    for group in ("data", "tokenizer", "model"):
        variants += [
            ["experiment=digits", f"{group}={p.stem}"]
            for p in sorted((conf / group).glob("*.yaml"))
        ]
    found: set[str] = set()
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        for overrides in variants:
            cfg = OmegaConf.to_container(compose("train", overrides=overrides), resolve=False)
            for part in ("tokenizer", "model", "data", "objective", "optimizer"):
                found |= stored_targets(cfg[part])
    assert {
        "selfflow.models.transformer.SelfFlowTransformer",
        "selfflow.tokenizers.audio.AudioMelTokenizer",
        "selfflow.data.folders.captions.CaptionedImageFolder",
        "selfflow.data.shards.dataset.VideoShards",
    } <= found
    allowed = STORED_TARGETS | set(
        NEVER_REBUILT
    )  # the latter refused on purpose, with a reason (next test)
    assert found <= allowed, f"stored by conf/ but not allowed: {sorted(found - allowed)}"


def test_a_stored_object_store_is_refused_naming_why():
    stored = {
        "_target_": "selfflow.data.shards.dataset.ImageShards",
        "root": "s3://bucket/shards",
        "store": {
            "_target_": "selfflow.data.shards.sources.ObjectStore",
            "endpoint_url": "http://127.0.0.1:9",
        },
    }
    with pytest.raises(
        StoredConfigError,
        match=r"data.dataset.store._target_=.*ObjectStore is not rebuilt from a "
        r"file: it would choose which network endpoint",
    ):
        instantiate_stored(stored, "checkpoint x.ckpt", "data.dataset")


@pytest.mark.parametrize(
    "place, key",
    [
        ("tokenizer", "tokenizer.image._target_"),  # the rebuilt part itself
        ("argument", "model.rope_axes._target_"),  # nested inside an argument of an allowed class
        ("list", "tokenizer.image.image_size[0]._target_"),  # inside a list
    ],
)
@pytest.mark.parametrize("payload", ["open", "system"])
def test_a_stored_target_outside_the_allow_list_is_refused_before_anything_runs(
    tiny_checkpoint, tmp_path, place, key, payload
):
    marker = tmp_path / "pwned"
    evil = payloads(marker)[payload]

    def edit(config):
        if place == "tokenizer":
            config["tokenizer"]["image"] = evil
        elif place == "argument":
            config["model"]["rope_axes"] = evil
        else:
            config["tokenizer"]["image"]["image_size"] = [evil]

    path = crafted(tiny_checkpoint, tmp_path / "evil.ckpt", edit)
    with pytest.raises(StoredConfigError) as error:
        load_checkpoint(path)
    assert f"{key}={evil['_target_']} is not a selfflow class; refusing to build it" in one_line(
        error.value
    )
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_an_unsafe_pickle_is_refused_in_one_line(tmp_path):
    from tests.helpers.hostile import hostile_checkpoint

    marker = tmp_path / "pwned"
    path = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="cannot load checkpoint .*evil.ckpt safely") as error:
        load_checkpoint(path)
    one_line(error.value)
    assert not marker.exists()


def test_an_interpolation_in_a_stored_config_is_refused(tiny_checkpoint, tmp_path):
    path = crafted(
        tiny_checkpoint,
        tmp_path / "evil.ckpt",
        lambda config: config["tokenizer"]["image"].update(patch_size="${oc.env:HOME}"),
    )
    with pytest.raises(
        StoredConfigError,
        match=r"tokenizer.image.patch_size='\$\{oc.env:HOME\}' is an "
        r"interpolation",
    ):
        load_checkpoint(path)


def test_stored_arguments_an_allowed_class_rejects_give_one_line(tiny_checkpoint, tmp_path):
    path = crafted(
        tiny_checkpoint,
        tmp_path / "odd.ckpt",
        lambda config: config["tokenizer"]["image"].update(evil=1),
    )
    with pytest.raises(
        StoredConfigError,
        match=r"cannot build tokenizer.image from its stored arguments: .*"
        r"unexpected keyword argument 'evil'",
    ) as error:
        load_checkpoint(path)
    one_line(error.value)


def test_instantiate_stored_builds_allowed_classes_and_never_chooses_a_write_location(tmp_path):
    node = {
        "_target_": "selfflow.tokenizers.text.TextTokenizer",
        "cache_dir": str(tmp_path / "elsewhere"),
    }
    tokenizer = instantiate_stored(OmegaConf.create(node), "test")
    assert tokenizer.cache.folder is None  # captions are cached in memory only
    tokenizer.encode(["a handwritten seven"])
    assert not (tmp_path / "elsewhere").exists()


def test_a_class_stored_under_its_former_module_builds_from_where_it_is_now():
    """Checkpoints written before the data layer's split name
    `selfflow.data.digits.DigitImages`; they still build (the allow-list holds only current
    names, MOVED_TARGETS maps the former ones)."""
    stored = {"_target_": "selfflow.data.digits.DigitImages", "split": "test", "image_size": 8}
    assert stored["_target_"] not in STORED_TARGETS
    assert type(instantiate_stored(stored, "old.ckpt", "data.dataset")).__name__ == "DigitImages"
    assert set(MOVED_TARGETS.values()) <= STORED_TARGETS


def test_the_data_config_of_a_checkpoint_is_built_through_the_allow_list_by_probe_and_metrics(
    tiny_checkpoint, tmp_path
):
    from hydra import compose, initialize_config_module

    from selfflow.cli.probe import probe
    from selfflow.cli.sample import build_metrics
    from selfflow.sampling.job import SamplingModel

    marker = tmp_path / "pwned"
    evil = payloads(marker)["open"]
    path = crafted(
        tiny_checkpoint, tmp_path / "evil.ckpt", lambda config: config["data"].update(dataset=evil)
    )
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        cfg = compose(
            "probe", overrides=[f"ckpt={path}", f"out_dir={tmp_path / 'out'}", "cache_dir=null"]
        )
    with pytest.raises(
        StoredConfigError, match=r"data.dataset._target_=builtins.open is not a selfflow class"
    ):
        probe(cfg)
    loaded = load_checkpoint(path)
    metrics = build_metrics(
        OmegaConf.create(
            {
                "metrics": True,
                "feature_extractor": {"_target_": "torch.nn.Identity"},
                "reference": None,
                "metrics_data": None,
                "metrics_max_real": 4,
                "ckpt": str(path),
            }
        )
    )
    model = SamplingModel(loaded.model, loaded.tokenizers, loaded.config.data, "model")
    with pytest.raises(
        StoredConfigError, match=r"data.dataset._target_=builtins.open is not a selfflow class"
    ):
        metrics.prepare(model, "image", torch.device("cpu"))
    assert not marker.exists()


def test_an_export_whose_config_names_another_callable_is_refused(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    folder = export_weights(tiny_checkpoint, tmp_path / "export")
    meta = json.loads((folder / EXPORT_CONFIG).read_text())
    meta["config"]["tokenizer"]["image"] = payloads(marker)["system"]
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(
        StoredConfigError,
        match=r"exported model .*export: tokenizer.image._target_=selfflow."
        r"training.run_folder.os.system is not a selfflow class",
    ):
        load_checkpoint(folder)
    with pytest.raises(StoredConfigError):  # re-exporting it goes through the same loader
        export_weights(folder, tmp_path / "again")
    assert not marker.exists() and not (tmp_path / "again").exists()


@pytest.mark.slow
def test_sample_cli_refuses_a_crafted_checkpoint_and_export_with_one_line(
    tiny_checkpoint, tmp_path
):
    marker = tmp_path / "pwned"
    path = crafted(
        tiny_checkpoint,
        tmp_path / "evil.ckpt",
        lambda config: config["tokenizer"].update(image=payloads(marker)["system"]),
    )
    result = run_cli(
        "selfflow.cli.sample", [f"ckpt={path}", f"out_dir={tmp_path / 'out'}"], tmp_path
    )
    assert_one_line_exit_2(
        result,
        "selfflow-sample",
        "tokenizer.image._target_=selfflow.training.run_folder.os.system is not a selfflow class",
    )
    result = run_cli(
        "selfflow.cli.probe", [f"ckpt={path}", f"out_dir={tmp_path / 'out'}"], tmp_path
    )
    assert_one_line_exit_2(result, "selfflow-probe", "is not a selfflow class")
    assert not marker.exists() and not list(
        (tmp_path / "out").glob("*.json")
    )  # Hydra's own files only


# --- exports: refused onto existing files, and refused when tampered or truncated -----------------


def test_export_refuses_to_overwrite_unless_told(tiny_checkpoint, tmp_path):
    folder = export_weights(tiny_checkpoint, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="already exists and is not empty; .*--overwrite"):
        export_weights(tiny_checkpoint, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        export_weights(tiny_checkpoint, a_file, overwrite=True)
    assert a_file.read_text() == "mine"
    export_weights(tiny_checkpoint, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", EXPORT_CONFIG, EXPORT_WEIGHTS]


@pytest.mark.slow
def test_export_cli_writes_a_loadable_pair_and_refuses_an_existing_folder_with_one_line(
    tiny_checkpoint, tmp_path
):
    out = tmp_path / "export"
    result = subprocess.run(
        ["selfflow-export", str(tiny_checkpoint), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["files"] == [EXPORT_WEIGHTS, EXPORT_CONFIG, "README.md"]
    weights = (out / EXPORT_WEIGHTS).read_bytes()
    again = subprocess.run(
        ["selfflow-export", str(tiny_checkpoint), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert_one_line_exit_2(again, "selfflow-export", f"{out} already exists and is not empty")
    assert (out / EXPORT_WEIGHTS).read_bytes() == weights
    assert load_checkpoint(out).step == 2


def rewrite_weights(folder: Path, change) -> None:
    """Replace the export's tensors by `change(state)` and record their sha256 (as a
    tamperer would)."""
    from safetensors.torch import load_file, save_file

    from selfflow.io.digests import file_digest

    save_file(change(load_file(str(folder / EXPORT_WEIGHTS))), str(folder / EXPORT_WEIGHTS))
    meta = json.loads((folder / EXPORT_CONFIG).read_text())
    meta["weights_sha256"] = file_digest(folder / EXPORT_WEIGHTS)
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_digest(folder: Path) -> None:
    meta = json.loads((folder / EXPORT_CONFIG).read_text())
    del meta["weights_sha256"]
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta))


def edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / EXPORT_CONFIG).read_text())
    edit(meta)
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            lambda f: truncate(f / EXPORT_WEIGHTS),
            "does not match the sha256 in .*config.json: it was truncated "
            "or changed after the export",
        ),
        (
            lambda f: (drop_digest(f), truncate(f / EXPORT_WEIGHTS)),
            r"cannot read .*model.safetensors: .*truncated or "
            r"damaged",
        ),
        (
            lambda f: truncate(f / EXPORT_CONFIG),
            r"config.json is not valid JSON .*truncated or damaged",
        ),
        (
            lambda f: rewrite_weights(f, lambda s: {k: v.to(torch.int32) for k, v in s.items()}),
            r"does not fit this model: '.*' has dtype torch.int32 in the checkpoint but "
            r"torch.float32 in the model",
        ),
        (
            lambda f: rewrite_weights(f, lambda s: {**s, "extra.weight": torch.zeros(3)}),
            r"does not fit this model: unexpected entry 'extra.weight'",
        ),
        (
            lambda f: rewrite_weights(
                f,
                lambda s: {
                    k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v
                    for k, v in s.items()
                },
            ),
            r"does not fit this model: '.*' has shape",
        ),
        # sizes far beyond memory: refused by shape before any of it is allocated
        (
            lambda f: edit_meta(
                f, lambda m: m["config"]["model"].update(width=1 << 20, heads=1 << 14)
            ),
            r"does not fit this model: '.*' has shape",
        ),
        # a model built in full by the stored config itself, before any check: refused
        (
            lambda f: edit_meta(
                f,
                lambda m: m["config"]["model"].update(
                    _partial_=False,
                    token_channels={"image": 16},
                    num_classes=10,
                    width=1 << 20,
                    heads=1 << 14,
                ),
            ),
            r"model._partial_ must be true",
        ),
        (
            lambda f: edit_meta(f, lambda m: m.update(selfflow_format="9")),
            r"has format '9', which is not a format version",
        ),
    ],
)
def test_a_tampered_or_truncated_export_is_refused_with_one_line(
    tiny_checkpoint, tmp_path, tamper, message
):
    folder = export_weights(tiny_checkpoint, tmp_path / "export")
    tamper(folder)
    with pytest.raises(ValueError, match=message) as error:
        load_checkpoint(folder)
    one_line(error.value)


def test_sample_and_probe_work_from_an_export_and_online_weights_are_refused(
    tiny_checkpoint, tmp_path
):
    from hydra import compose, initialize_config_module

    from selfflow.cli.probe import probe

    folder = export_weights(tiny_checkpoint, tmp_path / "export")
    with pytest.raises(
        ValueError, match=r"weights=online .* is an export, which holds the EMA weights only"
    ) as error:
        load_checkpoint(folder, weights="online")
    one_line(error.value)
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        cfg = compose(
            "probe",
            overrides=[
                f"ckpt={folder}",
                f"out_dir={tmp_path / 'out'}",
                "cache_dir=null",
                "layers=[1]",
                "head.epochs=2",
                "head.learning_rates=[0.1]",
                "head.weight_decays=[0.0]",
                "progress=false",
            ],
        )
        ((path, document),) = probe(cfg).values()
        assert path.is_file() and document["results"][0]["layer"] == 1
        with pytest.raises(ValueError, match="holds the EMA weights only"):
            probe(
                compose("probe", overrides=[f"ckpt={folder}", "weights=online", "cache_dir=null"])
            )


# --- the checkpoint callback's restored paths never reach a delete --------------------------------


def checkpoint_callback_state(raw: dict) -> dict:
    (key,) = [k for k in raw["callbacks"] if "SelfFlowCheckpoint" in k]
    return raw["callbacks"][key]


def test_a_resumed_checkpoint_naming_files_outside_the_run_never_gets_them_deleted(
    tiny_train_cfg, tmp_path
):
    run_dir = tmp_path / "run"
    overrides = ["callbacks.samples.every_n_steps=0", "callbacks.checkpoint.save_top_k=2"]
    train(tiny_train_cfg(*overrides, "trainer.max_steps=2", run_dir=run_dir))
    folder = run_dir / "checkpoints"
    outside = tmp_path / "precious.txt"
    sneaky = tmp_path / "sneaky.txt"
    for marker in (outside, sneaky):
        marker.write_text("keep me")
    via_dots = f"{folder}/../../{sneaky.name}"  # passes Lightning's own "inside dirpath" check
    raw = torch.load(folder / "last.ckpt", weights_only=True)
    state = checkpoint_callback_state(raw)
    state.update(
        best_model_path=via_dots,
        last_model_path=via_dots,
        kth_best_model_path=str(outside),
        best_k_models={via_dots: torch.tensor(2.0), str(outside): torch.tensor(1.0)},
    )
    torch.save(raw, folder / "last.ckpt")
    train(
        tiny_train_cfg(*overrides, "trainer.max_steps=6", "resume=auto", run_dir=run_dir)
    )  # two saves later
    assert outside.read_text() == "keep me" and sneaky.read_text() == "keep me"
    # the forgotten entries are never deleted; the run's own files go on as usual
    assert sorted(p.name for p in folder.glob("*.ckpt")) == [
        "last.ckpt",
        "step_0000002.ckpt",
        "step_0000004.ckpt",
        "step_0000006.ckpt",
    ]


def test_restored_callback_state_keeps_only_files_inside_the_checkpoint_folder(tmp_path):
    from types import SimpleNamespace

    from selfflow.training.checkpoint_callback import SelfFlowCheckpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    own = folder / "step_0000002.ckpt"
    own.write_bytes(b"x")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (folder / "link.ckpt").symlink_to(outside)
    via_dots = f"{folder}/../{outside.name}"
    callback = SelfFlowCheckpoint(dirpath=str(folder), monitor="step", mode="max", save_top_k=2)
    callback.load_state_dict(
        {
            "dirpath": str(folder),
            "best_model_score": torch.tensor(9.0),
            "best_model_path": via_dots,
            "kth_best_model_path": str(folder / "link.ckpt"),
            "kth_value": torch.tensor(1.0),
            "last_model_path": str(outside),
            "best_k_models": {
                str(own): torch.tensor(2.0),
                via_dots: torch.tensor(9.0),
                str(folder / "link.ckpt"): torch.tensor(1.0),
            },
        }
    )
    assert callback.best_k_models == {str(own): torch.tensor(2.0)}
    assert callback.best_model_path == str(own) and callback.kth_best_model_path == ""
    assert callback.last_model_path == "" and float(callback.best_model_score) == 2.0
    trainer = SimpleNamespace(ckpt_path=None)
    assert not callback._should_remove_checkpoint(trainer, via_dots, str(folder / "last.ckpt"))
    assert callback._should_remove_checkpoint(trainer, str(own), str(folder / "last.ckpt"))


# --- resume=auto continues this run only; one run per run folder ----------------------------------


def test_resume_auto_refuses_another_runs_checkpoint_naming_the_differences(
    tiny_train_cfg, tmp_path
):
    run_dir = tmp_path / "run"
    train(
        tiny_train_cfg("trainer.max_steps=2", "callbacks.samples.every_n_steps=0", run_dir=run_dir)
    )

    def files() -> dict:
        return {
            p: p.read_bytes()
            for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"
        }

    before = files()
    other = tiny_train_cfg(
        "seed=1",
        "objective.gamma=0.5",
        "trainer.max_steps=4",
        "callbacks.samples.every_n_steps=0",
        "resume=auto",
        run_dir=run_dir,
    )
    with pytest.raises(ValueError) as error:
        train(other)
    message = one_line(error.value)
    assert (
        "last.ckpt was written by another run" in message
        or "step_0000002.ckpt was written" in message
    )
    assert (
        "objective.gamma: 0.8 in the checkpoint, 0.5 now; seed: 0 in the checkpoint, 1 now"
        in message
    )
    assert "trainer.max_steps" not in message and "resume_allow_changes=true" in message
    assert files() == before  # nothing written
    allowed = tiny_train_cfg(
        "seed=1",
        "objective.gamma=0.5",
        "trainer.max_steps=4",
        "callbacks.samples.every_n_steps=0",
        "resume=auto",
        "resume_allow_changes=true",
        run_dir=run_dir,
    )
    assert train(allowed).trainer.global_step == 4


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until its stdin closes."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from selfflow.training.run_folder import "
            f"lock_run_folder; lock_run_folder({str(folder)!r}); print('locked', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_locked_run_folder_stops_with_one_line(
    tiny_train_cfg, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunFolderError) as error:
            train(tiny_train_cfg(run_dir=run_dir))
        assert f"run folder {run_dir} is in use by another run (pid {holder.pid} on " in one_line(
            error.value
        )
        assert sorted(p.name for p in run_dir.iterdir()) == [
            ".lock"
        ]  # nothing of the second run was written
        monkeypatch.setenv(
            "LOCAL_RANK", "1"
        )  # a process Lightning's ddp launched for another rank: no lock
        with run_folder_lock(run_dir):
            pass
    finally:
        holder.communicate("")
    assert (
        train(
            tiny_train_cfg(
                "trainer.max_steps=2", "callbacks.samples.every_n_steps=0", run_dir=run_dir
            )
        ).trainer.global_step
        == 2
    )  # free once the other run ended


def test_a_forked_worker_does_not_keep_the_run_folder_locked(tmp_path):
    lock_run_folder(tmp_path)
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
    worker.start()  # e.g. a DataLoader worker forked while the lock is held
    try:
        release_run_folder(tmp_path)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from selfflow.training.run_folder import lock_run_folder; "
                f"lock_run_folder({str(tmp_path)!r})",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr[-1000:]
    finally:
        worker.kill()
        worker.join()


@pytest.mark.slow
def test_cli_second_run_into_a_locked_folder_stops_before_hydra_writes(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        result = run_cli("selfflow.cli.train", [*TINY, f"hydra.run.dir={run_dir}"], tmp_path)
    finally:
        holder.communicate("")
    assert_one_line_exit_2(
        result,
        "selfflow-train",
        f"run folder {run_dir} is in use by another run (pid {holder.pid} on ",
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # not even Hydra's .hydra/


def test_a_read_only_run_folder_stops_at_start_up_with_one_line(
    tiny_train_cfg, tmp_path, monkeypatch, capsys
):
    from selfflow.cli import train as train_cli

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    real_access = os.access
    # the effect of a read-only mount or folder (chmod alone does not stop root, who runs these
    # tests in CI)
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if Path(path) == run_dir else real_access(path, mode)
    )
    with pytest.raises(RunFolderError) as error:
        train(tiny_train_cfg(run_dir=run_dir))
    assert f"run folder {run_dir} is not writable" in one_line(error.value)
    monkeypatch.setattr(sys, "argv", ["selfflow-train", *TINY, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_status:
        train_cli.main()  # stops before Hydra would write its files
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"selfflow-train: error: run folder {run_dir} is not writable"
    )
    assert list(run_dir.iterdir()) == []


# --- a full disk and long class names: one line, and the checkpoints survive ----------------------

TORCH_WRITE_FAILURE = (
    "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
    "data/3: file write failed\nframe #0: c10::ThrowEnforceNotMet(...)\nframe #1: ..."
)


def test_a_full_disk_reported_by_torch_as_a_runtime_error_is_one_line_and_keeps_the_checkpoint(
    tiny_train_cfg, monkeypatch, capsys
):
    from selfflow.cli.errors import friendly_errors
    from selfflow.interop.checkpoint import read_checkpoint

    cfg = tiny_train_cfg("trainer.max_steps=6", "callbacks.samples.every_n_steps=0")
    real_save = torch.save

    def fill_up_at_step_4(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 4:
            f.write(b"partial")
            raise RuntimeError(TORCH_WRITE_FAILURE)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_up_at_step_4)
    with pytest.raises(SystemExit) as exit_status, friendly_errors("selfflow-train"):
        train(cfg)
    assert exit_status.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert (
        first.startswith("selfflow-train: error: cannot write checkpoint ")
        and (
            "PytorchStreamWriter failed "
            "writing file data/3: file write failed (is the disk full?); the checkpoints "
            "written before are intact"
        )
        in first
    )
    folder = Path(cfg.run_dir) / "checkpoints"
    assert read_checkpoint(folder / "last.ckpt")["global_step"] == 2 and not list(
        folder.glob("*.tmp")
    )


def test_long_class_names_give_short_distinct_file_names():
    from selfflow.training.callbacks import MAX_STEM_BYTES, file_stem

    first, second = (
        "é" * 124 + "a",
        "é" * 124 + "b",
    )  # 249 bytes each, equal up to the last character
    stems = [file_stem(first), file_stem(second), file_stem("a/b\x00c")]
    assert stems[0] != stems[1] and all(len(s.encode()) <= MAX_STEM_BYTES for s in stems)
    assert stems[2] == "a-b-c" and file_stem("seven") == "seven"


def write_audio_classes(root: Path, names: list[str]) -> None:
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(6):
            wave = 0.3 * np.sin(np.linspace(0, 200 * (i + 1), 4000)) + 0.01 * rng.standard_normal(
                4000
            )
            soundfile.write(root / name / f"{i}.wav", wave.astype("float32"), 8000)


@pytest.mark.slow
def test_a_250_byte_class_folder_name_trains_to_the_end_with_its_checkpoint_and_samples(tmp_path):
    long_name = "x" * 250
    write_audio_classes(tmp_path / "audio", [long_name, "short"])
    cfg = compose_train(
        [
            "experiment=audio_digits",
            "data=audio_folder",
            f"data.root={tmp_path / 'audio'}",
            "data.dataset.duration=0.5",
            "data.batch_size=4",
            "model.depth=2",
            "model.width=32",
            "model.heads=2",
            "~callbacks.probe",
            "trainer.max_steps=2",
        ],
        tmp_path / "run",
    )
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    wavs = sorted(p.name for p in (tmp_path / "run" / "samples" / "audio" / "final").glob("*.wav"))
    assert len(wavs) == 2 and "short_0.wav" in wavs and all(len(n.encode()) < 255 for n in wavs)


def test_the_final_checkpoint_is_written_before_the_final_samples(tiny_train_cfg, monkeypatch):
    from selfflow.interop.checkpoint import read_checkpoint
    from selfflow.training.callbacks import SampleGrid

    cfg = tiny_train_cfg("trainer.max_steps=3", "callbacks.samples.every_n_steps=0")
    real_write = SampleGrid.write

    def failing_at_the_end(self, trainer, module, name):
        if name == "final":
            raise OSError(36, "File name too long")
        return real_write(self, trainer, module, name)

    monkeypatch.setattr(SampleGrid, "write", failing_at_the_end)
    with pytest.raises(OSError, match="File name too long"):
        train(cfg)
    assert read_checkpoint(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")["global_step"] == 3
