"""Start-up checks of a run config: every user mistake found here stops the run with one line naming the key and
what is allowed, before any data is read or any checkpoint is touched."""
from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from selfflow.flow.dual_timestep import MASK_MODES, check_mask_ratio

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


class ConfigError(ValueError):
    """A config value a user set is unknown or out of range."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _number(cfg, key: str, low: float | None = None, high: float | None = None, *, integer: bool = False,
            low_open: bool = False, high_open: bool = False, allowed_extra: tuple = (), default: Any = None) -> Any:
    value = _get(cfg, key, default)
    if value is None or value in allowed_extra:
        return value
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    below = low is not None and (value <= low if low_open else value < low) if ok_type else False
    above = high is not None and (value >= high if high_open else value > high) if ok_type else False
    if not ok_type or below or above:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        span = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
        extra = f" (or {', '.join(map(str, allowed_extra))})" if allowed_extra else ""
        raise ConfigError(f"{key}={value!r} is out of range: use {kind}{span}{extra}")
    return value


def _choice(cfg, key: str, choices: tuple) -> None:
    value = _get(cfg, key)
    if value is not None and value not in choices:
        names = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is unknown; choose one of: {names}")


def check_ranges(cfg: DictConfig) -> None:
    """Ranges of the keys users tune most (objective, model, data, trainer, optimizer, run)."""
    _number(cfg, "seed", 0, 2**32 - 1, integer=True)
    _number(cfg, "max_nonfinite_in_a_row", 1, integer=True)
    _number(cfg, "lr_warmup_steps", 0, integer=True)
    _choice(cfg, "resume", (None, "auto"))
    _number(cfg, "optimizer.lr", 0, low_open=True)
    _number(cfg, "optimizer.weight_decay", 0)
    if isinstance(_get(cfg, "data.batch_size"), Mapping):  # joint training: a batch size per modality
        for modality in _get(cfg, "data.batch_size"):
            _number(cfg, f"data.batch_size.{modality}", 1, integer=True)
    else:
        _number(cfg, "data.batch_size", 1, integer=True)
    _number(cfg, "data.num_workers", 0, integer=True)
    _number(cfg, "global_batch_size", 1, integer=True)
    _number(cfg, "trainer.max_steps", 1, integer=True, allowed_extra=(-1,))
    _number(cfg, "trainer.log_every_n_steps", 1, integer=True)
    _number(cfg, "trainer.accumulate_grad_batches", 1, integer=True)
    _number(cfg, "trainer.gradient_clip_val", 0)
    _number(cfg, "callbacks.checkpoint.every_n_train_steps", 0, integer=True)
    _number(cfg, "callbacks.checkpoint.save_top_k", -1, integer=True)
    _number(cfg, "callbacks.samples.every_n_steps", 0, integer=True)
    if _get(cfg, "objective") is None:
        return
    ratio = _get(cfg, "objective.mask_ratio")
    ratios = ratio.items() if isinstance(ratio, Mapping) else [(None, ratio)]
    for modality, value in ratios:
        key = "objective.mask_ratio" if modality is None else f"objective.mask_ratio.{modality}"
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is out of range: use a number in [0, 0.5]")
        try:
            check_mask_ratio(float(value), key)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    _choice(cfg, "objective.mask_mode", MASK_MODES)
    _number(cfg, "objective.gamma", 0)
    _number(cfg, "objective.class_dropout", 0, 1)
    _number(cfg, "objective.ema_decay", 0, 1, high_open=True)
    _number(cfg, "objective.loss_buckets", 1, integer=True)
    check_layers(cfg)


def check_layers(cfg: DictConfig) -> None:
    """1 <= student_layer < teacher_layer <= model.depth (null layers take the method's defaults)."""
    from selfflow.objectives.selfflow import default_layers

    depth = _number(cfg, "model.depth", 1, integer=True)
    width = _number(cfg, "model.width", 1, integer=True)
    heads = _number(cfg, "model.heads", 1, integer=True)
    if width and heads and width % heads:
        raise ConfigError(f"model.width={width} must be a multiple of model.heads={heads}")
    student = _number(cfg, "objective.student_layer", 1, integer=True)
    teacher = _number(cfg, "objective.teacher_layer", 1, integer=True)
    if depth is None:
        return
    auto_student, auto_teacher = default_layers(depth)
    student = auto_student if student is None else student
    teacher = auto_teacher if teacher is None else teacher
    if teacher > depth:
        raise ConfigError(f"objective.teacher_layer={teacher} is beyond the model's depth: use a block in "
                          f"[{student + 1}, {depth}] (model.depth={depth})")
    if student >= teacher:
        raise ConfigError(f"objective.student_layer={student} must be below objective.teacher_layer={teacher}: use "
                          f"1 <= student_layer < teacher_layer <= model.depth ({depth})")


def _parameters(target: str) -> set[str] | None:
    """Keyword names `target` accepts; None when it takes **kwargs or cannot be inspected."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception as error:  # noqa: BLE001 - an unimportable target is a config mistake
        raise ConfigError(f"_target_={target} cannot be imported ({type(error).__name__}: {error}); check the "
                          f"spelling of the class or function") from None
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {name for name, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_keys(node: Any, path: str = "") -> None:
    """Every key of a `_target_` node is a parameter of its target (typos such as mask_ration are caught here)."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_keys(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    keys = [k for k in node.keys() if not (path == "" and k == "hydra")]
    target = node.get("_target_") if "_target_" in node else None
    if isinstance(target, str):
        accepted = _parameters(target)
        if accepted is not None:
            for key in keys:
                if key not in accepted and key not in HYDRA_KEYS:
                    near = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                    hint = f"did you mean {path}.{near[0]}? " if near else ""
                    raise ConfigError(f"{path}.{key} is not an option of {target.rsplit('.', 1)[-1]}; {hint}"
                                      f"allowed: {', '.join(sorted(accepted))}")
    for key in keys:
        full = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{full} must be set ({full}=...); it has no default")
        check_keys(node[key], full)


def validate_config(cfg: DictConfig) -> None:
    """All start-up checks; raises ConfigError with one line on the first problem."""
    check_keys(cfg)
    check_ranges(cfg)
