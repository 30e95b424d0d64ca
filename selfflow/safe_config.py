"""Configs read from files (checkpoints, exports) are data: they are rebuilt only through an
allow-list of selfflow's own classes, with plain values as arguments, and never choose where files
are written.

A stored `_target_` could otherwise name any importable callable (one that evaluates a string,
unpickles bytes or writes a file), and an interpolation (`${...}`) would run a resolver.
`instantiate_stored` walks the whole node first and refuses, in one line naming the key, anything
that is not plainly selfflow's; only then is Hydra's instantiate called. Plain PyTorch
and omegaconf: no Lightning here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("selfflow")

# exact names (never a prefix test: `selfflow.x.os.system` is not selfflow's);
# tests/test_hostile_checkpoints.py composes every config of conf/ and checks that each `_target_`
# it can store is listed here
STORED_TARGETS = frozenset(
    {
        # tokenizers
        "selfflow.tokenizers.image.ImagePatchTokenizer",
        "selfflow.tokenizers.video.VideoTubeletTokenizer",
        "selfflow.tokenizers.audio.AudioMelTokenizer",
        "selfflow.tokenizers.text.TextTokenizer",
        "selfflow.tokenizers.latent.VideoLatentTokenizer",
        "selfflow.tokenizers.latent.AudioLatentTokenizer",
        "selfflow.tokenizers.image_latent.ImageLatentTokenizer",
        "selfflow.tokenizers.video_vae.VideoVaeTokenizer",
        "selfflow.tokenizers.audio_vae.AudioVaeTokenizer",
        # the model and the objective around it
        "selfflow.models.transformer.SelfFlowTransformer",
        "selfflow.objectives.selfflow.SelfFlowObjective",
        "selfflow.objectives.gamma_schedule.GammaSchedule",
        "selfflow.objectives.repa.REPAAlignment",
        "selfflow.flow.timesteps.Uniform",
        "selfflow.flow.timesteps.LogitNormal",
        "selfflow.flow.timesteps.ModeSampling",
        # data modules, datasets and captions
        "selfflow.training.datamodule.SelfFlowDataModule",
        "selfflow.training.mixture.MixtureDataModule",
        "selfflow.data.builtin.digits.DigitImages",
        "selfflow.data.builtin.moving_digits.MovingDigits",
        "selfflow.data.builtin.spoken_digits.SpokenDigits",
        "selfflow.data.folders.image_folder.ImageFolder",
        "selfflow.data.folders.video_folder.VideoFolder",
        "selfflow.data.folders.audio_folder.AudioFolder",
        "selfflow.data.shards.dataset.ImageShards",
        "selfflow.data.shards.dataset.VideoShards",
        "selfflow.data.shards.dataset.AudioShards",
        "selfflow.data.shards.latent_cache.LatentCache",
        "selfflow.data.folders.captions.ClassCaptions",
        "selfflow.data.builtin.captioned.CaptionedDigits",
        "selfflow.data.builtin.captioned.CaptionedMovingDigits",
        "selfflow.data.builtin.captioned.CaptionedSpokenDigits",
        "selfflow.data.folders.captions.CaptionedImageFolder",
        "selfflow.data.folders.captions.CaptionedVideoFolder",
        "selfflow.data.folders.captions.CaptionedAudioFolder",
        # the torch classes selfflow's configs name
        "torch.optim.AdamW",
    }
)

# where classes named by configs stored before the data layer was split into stages now live: a
# checkpoint written then resumes, samples and probes as before
MOVED_TARGETS = {
    f"selfflow.data.{old}.{name}": f"selfflow.data.{new}.{name}"
    for old, new, names in (
        ("digits", "builtin.digits", ["DigitImages"]),
        ("moving_digits", "builtin.moving_digits", ["MovingDigits"]),
        ("spoken_digits", "builtin.spoken_digits", ["SpokenDigits"]),
        ("image_folder", "folders.image_folder", ["ImageFolder"]),
        ("video_folder", "folders.video_folder", ["VideoFolder"]),
        ("audio_folder", "folders.audio_folder", ["AudioFolder"]),
        ("shards", "shards.dataset", ["ImageShards", "VideoShards", "AudioShards"]),
        ("latent_cache", "shards.latent_cache", ["LatentCache"]),
        ("captions", "folders.captions", ["ClassCaptions", "CaptionedImageFolder"]),
        ("captions", "folders.captions", ["CaptionedVideoFolder", "CaptionedAudioFolder"]),
        ("captions", "builtin.captioned", ["CaptionedDigits", "CaptionedMovingDigits"]),
        ("captions", "builtin.captioned", ["CaptionedSpokenDigits"]),
    )
    for name in names
}

# selfflow's own classes that a stored config may still not build, and why (named in the refusal)
NEVER_REBUILT = {
    "selfflow.data.shards.sources.ObjectStore": (
        "it would choose which network endpoint selfflow contacts with your "
        "credentials; give data=... for the data to probe or measure"
    ),
}

# arguments that choose where files are written: a stored config never does; the default location is
# used instead
WRITE_LOCATION_KEYS = frozenset({"cache_dir"})

PLAIN = (str, int, float, bool, type(None))


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (torch's and Hydra's messages span
    many lines)."""
    return next(
        (line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__
    )


class StoredConfigError(ValueError):
    """A config read from a file names something selfflow will not build from it."""


def _refuse(where: str, key: str, why: str) -> StoredConfigError:
    return StoredConfigError(f"{where}: {key or '<root>'}{why}; refusing to build it")


def check_plain(value: Any, where: str, key: str = "", targets: bool = False) -> None:
    """Raise StoredConfigError unless `value` is plain data (str, int, float, bool, None, lists and
    string-keyed dicts of those) with no interpolation; with `targets`, every `_target_` at any
    depth must be in STORED_TARGETS."""
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, (str, int)) or isinstance(name, bool):
                raise _refuse(
                    where, key, f" has a key of type {type(name).__name__}, not a plain name"
                )
            path = f"{key}.{name}" if key else str(name)
            if targets and name == "_target_" and item in NEVER_REBUILT:
                raise _refuse(
                    where, path, f"={item} is not rebuilt from a file: {NEVER_REBUILT[item]}"
                )
            if targets and name == "_target_" and item not in STORED_TARGETS:
                shown = item if isinstance(item, str) else type(item).__name__
                raise _refuse(where, path, f"={shown!s:.120} is not a selfflow class")
            check_plain(item, where, path, targets)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_plain(item, where, f"{key}[{index}]", targets)
    elif not isinstance(value, PLAIN):
        raise _refuse(where, key, f" is a {type(value).__name__}, not a plain value")
    elif isinstance(value, str) and "${" in value:
        raise _refuse(
            where, key, f"={value!r:.120} is an interpolation (stored configs hold plain values)"
        )


def with_current_targets(value: Any) -> Any:
    """`value` with every `_target_` that names a class's former place (MOVED_TARGETS) naming its
    place now.

    Args:
        value: a plain stored config (mappings, lists, plain values).

    Returns:
        The same structure, rebuilt where a `_target_` moved.
    """
    if isinstance(value, Mapping):
        return {
            name: MOVED_TARGETS.get(item, item)
            if name == "_target_"
            else with_current_targets(item)
            for name, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [with_current_targets(item) for item in value]
    return value


def stored_config(raw: Any, where: str) -> DictConfig:
    """The config a checkpoint or export stores, as a DictConfig, once it is known to be plain data;
    classes that moved since it was written are named where they are now."""
    if not isinstance(raw, Mapping):
        raise StoredConfigError(
            f"{where}: the stored config is a {type(raw).__name__}, not a mapping; refusing it"
        )
    check_plain(raw, where)
    return OmegaConf.create(with_current_targets(dict(raw)))


def without_write_locations(value: Any, where: str, key: str = "") -> Any:
    """`value` with every WRITE_LOCATION_KEYS entry set to None (the default location), said once
    per key."""
    if isinstance(value, Mapping):
        out = {}
        for name, item in value.items():
            path = f"{key}.{name}" if key else str(name)
            if name in WRITE_LOCATION_KEYS and item is not None:
                log.info(
                    "%s: %s=%s ignored (a stored config does not choose where files are written); "
                    "the default location is used",
                    where,
                    path,
                    item,
                )
                item = None
            out[name] = without_write_locations(item, where, path)
        return out
    if isinstance(value, (list, tuple)):
        return [without_write_locations(item, where, f"{key}[{i}]") for i, item in enumerate(value)]
    return value


def instantiate_stored(node: Any, where: str, key: str = "") -> Any:
    """Hydra's instantiate for a config that came from a file (`where` names it, `key` is the node's
    path in it): every `_target_` must be one of STORED_TARGETS and every value plain, or
    StoredConfigError is raised before anything is imported or called."""
    from hydra.utils import instantiate

    container = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    container = with_current_targets(container)
    check_plain(container, where, key, targets=True)
    if not isinstance(container, Mapping) or "_target_" not in container:
        raise _refuse(where, key, " has no _target_ (nothing to build)")
    try:
        return instantiate(without_write_locations(container, where, key))
    except Exception as error:
        cause = error
        while cause.__cause__ is not None:  # Hydra wraps the class's own error
            cause = cause.__cause__
        raise StoredConfigError(
            f"{where}: cannot build {key or 'the stored config'} from its stored "
            f"arguments: {first_line(cause)}"
        ) from error
