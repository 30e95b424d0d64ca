"""Start-up checks of a run config: every user mistake found here stops the run with one line naming
the key and what is allowed, before any data is read or any checkpoint is touched.

Ranges have one source, the constructor of the object that takes the value: start-up builds the data
module (which reads no data until its splits are used), the callbacks, and the model, objective,
training module and optimizer on the meta device (no memory, no initialisation cost at any size),
and turns a constructor's error into a ConfigError. What no constructor sees is checked here: typos
(`check_keys`), the checks across groups, and the ranges of run and trainer keys that neither
selfflow nor Lightning checks.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from selfflow.dependencies import check_config_extras, explain_import_failure
from selfflow.safe_config import first_line
from selfflow.tokens import TEXT
from selfflow.training.datamodule import GEOMETRY_KEYS, has_captions, sample_geometry

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """A config value a user set is unknown or out of range."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _number(
    cfg,
    key: str,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
) -> Any:
    value = _get(cfg, key)
    if value is None:
        return value
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(
        value, bool
    )
    below = low is not None and (value <= low if low_open else value < low) if ok_type else False
    above = high is not None and value > high if ok_type else False
    if not ok_type or below or above:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}]"
        raise ConfigError(f"{key}={value!r} is out of range: use {kind} in {lo}, {hi}")
    return value


def _choice(cfg, key: str, choices: tuple) -> None:
    value = _get(cfg, key)
    if value is not None and value not in choices:
        names = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is unknown; choose one of: {names}")


STEP_LIMITS = "a whole number >= 1 (or -1 for no limit)"


def _step_limit(cfg, key: str) -> None:
    """A step or epoch limit: a whole number >= 1, or -1 for none (Lightning takes 0 and 1.5 without
    a word)."""
    value = _get(cfg, key)
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if value is not None and not (whole and (value >= 1 or value == -1)):
        raise ConfigError(f"{key}={value!r} is not a limit the run can reach: use {STEP_LIMITS}")


def check_unowned_ranges(cfg: DictConfig) -> None:
    """Ranges of the keys no constructor checks: the run's own keys and the trainer keys Lightning
    takes as given (its own checks let max_steps=0 finish at once and max_steps=1.5 round up)."""
    _step_limit(cfg, "trainer.max_steps")
    _step_limit(cfg, "trainer.max_epochs")
    _number(cfg, "seed", 0, 2**32 - 1, integer=True)
    _choice(cfg, "resume", (None, "auto"))
    _number(cfg, "global_batch_size", 1, integer=True)
    _number(cfg, "trainer.log_every_n_steps", 1, integer=True)
    _number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    _number(cfg, "trainer.gradient_clip_val", 0)
    _number(cfg, "callbacks.samples.every_n_steps", 0, integer=True)


def check_keys(node: Any, path: str = "") -> None:
    """Every key of a `_target_` node is a parameter of its target (typos such as mask_ration are
    caught here)."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_keys(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    keys = [k for k in node if not (path == "" and k == "hydra")]
    target = node.get("_target_") if "_target_" in node else None
    if isinstance(target, str):
        accepted = target_parameters(target)
        if accepted is not None:
            for key in keys:
                if key not in accepted and key not in HYDRA_KEYS:
                    near = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                    hint = f"did you mean {path}.{near[0]}? " if near else ""
                    raise ConfigError(
                        f"{path}.{key} is not an option of {target.rsplit('.', 1)[-1]}; {hint}"
                        f"allowed: {', '.join(sorted(accepted))}"
                    )
    full = {key: f"{path}.{key}" if path else str(key) for key in keys}
    for key in keys:  # this level first: a child may interpolate a key of it (`${..root}`)
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{full[key]} must be set ({full[key]}=...); it has no default")
    for key in keys:
        check_keys(node[key], full[key])


def check_tokenizers_take_geometry_from_the_data(cfg: DictConfig) -> None:
    """The sample geometry (image size, channels, frames, ...) is the data's: a tokenizer config
    that sets it would disagree with the data sooner or later."""

    for modality, spec in (cfg.get("tokenizer") or {}).items():
        for key in GEOMETRY_KEYS:
            if key in spec.keys():  # noqa: SIM118 - `in` on a DictConfig is False for a ??? value
                raise ConfigError(
                    f"tokenizer.{modality}.{key} is set, but the tokenizer takes {key} from the "
                    f"data: remove it and set data.dataset.{key} (a mixture: "
                    f"data.sources.<modality>.dataset.{key})"
                )


def built(group: str | None, build: Callable[[], Any]) -> Any:
    """`build()`, whose constructor errors (a value out of range, of the wrong type) become one
    ConfigError line, prefixed with the config group unless the message starts with it (or the group
    is None: top-level keys)."""
    try:
        return build()
    except Exception as error:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        chain = [error]
        while chain[-1].__cause__ is not None:  # Hydra wraps the constructor's own error
            chain.append(chain[-1].__cause__)
        cause = next(
            (
                e
                for e in reversed(chain)
                if isinstance(e, (ValueError, TypeError, MisconfigurationException))
            ),
            None,
        )
        if cause is None:
            raise
        message = first_line(cause)
        raise ConfigError(
            message if group is None or message.startswith(group) else f"{group}: {message}"
        ) from error


def build_on_meta(cfg: DictConfig) -> None:
    """Build what the run is made of without reading data or allocating memory, so that every
    constructor checks its own options now: the data module, the callbacks, and the model (one
    input channel per modality, one class), objective, training module and optimizer on the
    meta device."""
    from hydra.utils import instantiate

    from selfflow.training.module import SelfFlowModule

    built("data", lambda: instantiate(cfg.data))
    modalities = built(
        None, lambda: list(tokenizer_configs(cfg))
    )  # its messages name the groups they join
    for name, callback in (cfg.get("callbacks") or {}).items():
        if callback is not None:
            built(f"callbacks.{name}", lambda callback=callback: instantiate(callback))
    with torch.device("meta"):
        model = built(
            "model",
            lambda: instantiate(cfg.model)(
                token_channels=dict.fromkeys(modalities, 1), num_classes=1
            ),
        )
        objective = built("objective", lambda: instantiate(cfg.objective)(model=model))
        lr_schedule = built("lr_schedule", lambda: instantiate(cfg.lr_schedule))
        module = built(
            None,
            lambda: SelfFlowModule(
                objective,
                {},
                optimizer=instantiate(cfg.optimizer),
                lr_schedule=lr_schedule,
                max_nonfinite_in_a_row=cfg.get("max_nonfinite_in_a_row", 5),
            ),
        )
        optimizer = built(
            "optimizer", lambda: module.optimizer_factory(list(objective.parameters()))
        )
        for group in optimizer.param_groups:
            built(None, lambda lr=group["lr"]: lr_schedule.check_base_lr(lr))


def validate_config(cfg: DictConfig) -> None:
    """All start-up checks; raises ConfigError with one line on the first problem
    (ModuleNotFoundError naming the extra when the config needs an optional package that is
    missing)."""
    check_config_extras(OmegaConf.to_container(cfg, resolve=False))
    check_keys(cfg)
    check_unowned_ranges(cfg)
    check_tokenizers_take_geometry_from_the_data(cfg)
    build_on_meta(cfg)


def tokenizer_configs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The tokenizers a run builds, with every argument (as checkpoints store them): one per
    modality of the data, completed with that modality's sample geometry from the data config
    (channels, image_size, num_frames, fps, sample_rate, duration: the arguments of its class that
    are `GEOMETRY_KEYS`), and the text tokenizer when one is configured. Tokenizers of other
    modalities are configured but not built (the root default lists three)."""
    geometry = sample_geometry(cfg.data)
    configured = cfg.get("tokenizer") or {}
    for modality in geometry:
        if modality not in configured:
            raise ValueError(
                f"data gives {modality!r} samples but tokenizer.{modality} is not configured "
                f"(configured: {sorted(configured)}); choose a matching tokenizer=..."
            )
    captioned = has_captions(cfg.data)
    if TEXT in configured and not captioned:
        raise ValueError(
            "tokenizer.text is configured but the data has no captions; use captioned data "
            "(data=text_digits, text_moving_digits, text_spoken_digits, or captioned_image_folder, "
            "captioned_video_folder, captioned_audio_folder for your files) or leave the text "
            "tokenizer out"
        )
    if captioned and TEXT not in configured:
        raise ValueError(
            "the data has captions but no text tokenizer is configured; add text_minilm to the "
            "tokenizers (e.g. tokenizer=[image_pixels,text_minilm] for images) or train with "
            "experiment=text_digits, text_video_digits or text_audio_digits"
        )
    specs = {}
    for (
        modality,
        spec,
    ) in configured.items():  # in the configured order: the model's modules follow it
        if modality in geometry or modality == TEXT:
            spec = OmegaConf.to_container(spec, resolve=True)
            accepted = target_parameters(spec["_target_"]) or set()
            specs[modality] = {
                **spec,
                **{k: v for k, v in geometry.get(modality, {}).items() if k in accepted},
            }
    return specs


def target_parameters(target: str) -> set[str] | None:
    """Keyword names `target` accepts; None when it takes **kwargs or cannot be inspected."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception as error:
        broken_dependency = explain_import_failure(error)
        if broken_dependency is not None:
            raise ConfigError(
                f"_target_={target} cannot be imported: {broken_dependency}"
            ) from None
        raise ConfigError(
            f"_target_={target} cannot be imported ({type(error).__name__}: {error}); check the "
            f"spelling of the class or function"
        ) from None
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {
        name
        for name, p in signature.parameters.items()
        if p.kind is not inspect.Parameter.VAR_POSITIONAL
    }
