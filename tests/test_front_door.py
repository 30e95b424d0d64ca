"""What a new user meets first: every console script's --help, selfflow-doctor, a dependency that
fails to import named with its fix, debug=fast without the slow judges, a quiet console, no empty
run folder after a failed start."""

import json
import logging
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from selfflow.dependencies import explain_import_failure
from selfflow.training.console import LibraryBanners, keep_library_banners_off_the_console
from selfflow.training.run_folder import remove_if_unused
from tests.helpers.configs import compose_train

SCRIPTS = sorted(
    e.name for e in entry_points(group="console_scripts") if e.name.startswith("selfflow-")
)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_prints_its_help(script, tmp_path):
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert script in result.stdout and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


FILE_TOOLS = {
    "selfflow-export",
    "selfflow-shards",
    "selfflow-doctor",
}  # flags; the rest: Hydra key=value


def test_every_command_is_a_hydra_job_or_a_file_tool_that_takes_flags():
    """The rule of docs/architecture.md ("Command style"): job commands are Hydra apps with their
    own conf/<name>.yaml; only the file tools parse flags."""
    import re
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    for entry in entry_points(group="console_scripts"):
        if not entry.name.startswith("selfflow-"):
            continue
        source = Path(sys.modules[entry.load().__module__].__file__).read_text()
        config = re.search(r'config_name="(\w+)"', source)
        if entry.name in FILE_TOOLS:
            assert "import argparse" in source and config is None, entry.name
        else:
            assert "argparse" not in source and config and (conf / f"{config[1]}.yaml").is_file(), (
                entry.name
            )


@pytest.mark.parametrize("config", ["reference", "prompt_following"])
def test_a_job_command_comments_every_key_of_its_config(config):
    from pathlib import Path

    from selfflow.cli.config_help import key_comments

    text = (Path(__file__).resolve().parents[1] / "conf" / f"{config}.yaml").read_text()
    own = [(key, what) for key, what in key_comments(text) if "." not in key]
    assert len(own) >= 8 and [key for key, what in own if not what] == []


def test_the_console_scripts_include_the_doctor_and_the_cache():
    assert {"selfflow-doctor", "selfflow-cache", "selfflow-train", "selfflow-sample"} <= set(
        SCRIPTS
    )


NATIVE_FAILURE = (
    "/venv/lib/python3.11/site-packages/torchaudio/lib/libtorchaudio.so: undefined symbol: "
    "torch_exception_get_what_without_backtrace"
)


def import_failing_with(error: str, tmp_path, monkeypatch) -> BaseException:
    """What importing a module whose top-level code raises `error` (e.g. a native library that does
    not open) raises."""
    (tmp_path / "broken_native.py").write_text(f"raise {error}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(Exception) as raised:
        import broken_native  # noqa: F401
    return raised.value


def test_a_native_library_that_does_not_load_is_named_with_the_versions_and_the_fix(
    tmp_path, monkeypatch
):
    message = explain_import_failure(
        import_failing_with(f"OSError({NATIVE_FAILURE!r})", tmp_path, monkeypatch)
    )
    assert message.startswith("torchaudio ") and "does not load beside torch " in message
    assert "undefined symbol" in message and "/venv/" not in message
    assert "pip install 'torch>=2.13,<2.15' 'torchaudio>=2.11.1,<2.12'" in message


def test_an_extension_that_does_not_register_names_the_matching_install(tmp_path, monkeypatch):
    failure = (
        "RuntimeError('operator torchvision::nms does not exist: "
        "/v/site-packages/torchvision/_meta.py')"
    )
    message = explain_import_failure(import_failing_with(failure, tmp_path, monkeypatch))
    assert (
        message.startswith("torchvision ")
        and "'torchvision>=0.28,<0.30' (in one command" in message
    )


def test_an_error_of_a_library_at_run_time_is_not_blamed_on_the_install(tmp_path):
    import torch

    with pytest.raises(OSError) as missing:  # raised inside torch's code, not while importing it
        torch.load(tmp_path / "missing.pt")
    assert explain_import_failure(missing.value) is None


def test_a_missing_extra_is_named_with_its_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError) as missing:
        import wandb  # noqa: F401
    assert "pip install 'selfflow[wandb]'" in explain_import_failure(missing.value)


def test_a_misspelt_target_is_not_blamed_on_a_dependency():
    from hydra.utils import get_object

    with pytest.raises(Exception) as misspelt:
        get_object("selfflow.tokenizers.imagee.PixelPatches")
    assert explain_import_failure(misspelt.value) is None


def test_a_target_whose_dependency_is_broken_is_reported_as_such(tmp_path, monkeypatch):
    from selfflow.training.validate import ConfigError, target_parameters

    (tmp_path / "needs_wandb.py").write_text("import wandb\n\n\ndef build(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError) as error:
        target_parameters("needs_wandb.build")
    assert "pip install 'selfflow[wandb]'" in str(error.value) and "spelling" not in str(
        error.value
    )


def test_the_doctor_reports_every_package_and_fails_when_a_required_one_is_broken(
    monkeypatch, capsys
):
    from selfflow.cli.doctor import main

    assert main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in report["packages"]}
    assert rows["torchaudio"]["status"] == "ok" and rows["torch"]["required"]
    assert "mel spectrogram computes" in report["checks"]["torchaudio"]
    monkeypatch.setitem(sys.modules, "torchaudio", None)
    assert main([]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "not working: torchaudio" in out


def test_debug_fast_leaves_the_recognition_judges_out(tmp_path):
    from selfflow.training.build import build_trainer
    from selfflow.training.recognition_callback import Recognition

    cfg = compose_train(["debug=fast"], tmp_path / "run", tiny=[])
    assert cfg.callbacks.recognition is None and cfg.trainer.max_steps == 6
    trainer = build_trainer(cfg, tmp_path / "run")
    assert not any(isinstance(c, Recognition) for c in trainer.callbacks)
    assert compose_train([], tmp_path / "run", tiny=[]).callbacks.recognition is not None


def test_library_banners_stay_off_the_console_and_warnings_reach_it():
    keep = LibraryBanners().filter
    record = logging.makeLogRecord
    assert not keep(
        record({"name": "lightning.pytorch.utilities.rank_zero", "levelno": logging.INFO})
    )
    assert keep(
        record({"name": "lightning.pytorch.utilities.rank_zero", "levelno": logging.WARNING})
    )
    assert keep(record({"name": "selfflow", "levelno": logging.INFO}))


def test_the_banner_filter_goes_on_console_handlers_only(tmp_path):
    console, file = logging.StreamHandler(sys.stderr), logging.FileHandler(tmp_path / "train.log")
    root = logging.getLogger()
    root.addHandler(console)
    root.addHandler(file)
    try:
        keep_library_banners_off_the_console()
        assert any(isinstance(f, LibraryBanners) for f in console.filters) and not file.filters
    finally:
        root.removeHandler(console)
        root.removeHandler(file)
        file.close()


def test_a_run_folder_holding_only_start_up_files_is_removed_and_any_other_is_kept(tmp_path):
    def start_up_files(folder, *extra):
        (folder / ".hydra").mkdir(parents=True)
        for name in ("train.log", ".hydra/config.yaml", ".hydra/overrides.yaml", *extra):
            (folder / name).write_text("x")
        return folder

    assert (
        remove_if_unused(start_up_files(tmp_path / "failed")) and not (tmp_path / "failed").exists()
    )
    kept = start_up_files(tmp_path / "used", "metrics.csv")
    assert not remove_if_unused(kept) and (kept / "metrics.csv").is_file()
    linked = start_up_files(tmp_path / "linked")
    (linked / "checkpoints").symlink_to(tmp_path / "used")
    assert not remove_if_unused(linked) and (tmp_path / "used" / "metrics.csv").is_file()


def test_help_joins_a_comment_continued_on_the_lines_below_and_lists_required_keys():
    from selfflow.cli.config_help import key_comments, keys_help
    from tests.helpers.configs import compose

    text = "a: 1        # one\n            # more\n# above b\nb: 2\n"
    assert key_comments(text) == [("a", "one more"), ("b", "above b")]
    lines = keys_help(compose("eval", []), {}, "eval").splitlines()
    assert any(line.split()[0] == "samples=???" for line in lines)  # a required key is listed
    assert any(
        "holds the same tensors" in line for line in lines if line.split()[0] == "inception=???"
    )
