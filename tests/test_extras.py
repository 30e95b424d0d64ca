"""`pip install -e .` brings neither transformers nor wandb: every selfflow module imports without
them, and a config that needs one stops before anything is built with one line naming the extra to
install."""

import subprocess
import sys
import textwrap

import pytest

from selfflow.cli.errors import friendly_errors
from selfflow.training.validate import validate_config
from tests.helpers.configs import compose_train


def test_every_module_imports_without_transformers_and_wandb():
    code = textwrap.dedent("""
        import importlib, importlib.abc, importlib.metadata, pkgutil, sys

        # what an install without the [text] and [wandb] extras lacks
        BLOCKED = {"transformers", "wandb"}

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        def distribution(name, found=importlib.metadata.distribution):
            if name.lower() in BLOCKED:  # libraries that ask the package metadata first
                raise importlib.metadata.PackageNotFoundError(name)
            return found(name)

        sys.meta_path.insert(0, NotInstalled())
        importlib.metadata.distribution = distribution
        import selfflow
        for module in pkgutil.walk_packages(selfflow.__path__, "selfflow."):
            importlib.import_module(module.name)
        assert not BLOCKED & set(sys.modules)
        print("imported")
        """)
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "imported", result.stderr[-3000:]


@pytest.mark.parametrize(
    "module, overrides, message",
    [
        (
            "wandb",
            ["logger=wandb"],
            r"logger\.wandb \(lightning\.pytorch\.loggers\.WandbLogger\) needs wandb: ",
        ),
        (
            "transformers",
            ["experiment=text_digits"],
            r"tokenizer\.text \(selfflow\.tokenizers\.text\.TextTokenizer\) ",
        ),
    ],
)
def test_a_config_needing_a_missing_extra_stops_with_one_line_naming_it(
    module, overrides, message, monkeypatch, tmp_path, capsys
):
    extra = {"wandb": "wandb", "transformers": "text"}[module]
    cfg = compose_train(overrides, tmp_path / "run")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as stop, friendly_errors("selfflow-train"):
        validate_config(cfg)
    assert stop.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("selfflow-train: error: ")
    assert f"pip install 'selfflow[{extra}]'" in first
    assert __import__("re").search(message, first), first


def test_the_text_encoder_names_the_extra_when_transformers_is_missing(monkeypatch):
    from selfflow.tokenizers.text import FrozenTextEncoder

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(
        ModuleNotFoundError,
        match=r"text conditioning .* needs transformers: pip install 'selfflow\[text\]'",
    ):
        FrozenTextEncoder(None)
