"""A run's name from its command-line overrides, for sweep folders and the wandb run name and group:
`selfflow-train -m objective.gamma=0,0.8` runs in `<sweep dir>/gamma=0` and `<sweep dir>/gamma=0.8`,
and wandb shows runs named so, grouped by the same overrides without the seed (so the seeds of one
setting average in one group).

The `run_name` resolver: `${run_name:subdir}` (the name, or the job number when there are no
overrides), `${run_name:name}` and `${run_name:group}` (None when there are none, or outside a
Hydra job).
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import OmegaConf

# keys that say where and how a run is kept or shown, not what it trains (hydra.* keys are left
# out too)
NOT_NAMED = ("run_dir", "ckpt_path", "resume", "resume_allow_changes", "debug", "logger")
NOT_GROUPED = ("seed",)  # runs that differ only in these share a wandb group
MODES = ("subdir", "name", "group")


def override_name(overrides: Sequence[str], leave_out: Sequence[str] = ()) -> str:
    """`key=value` of each override joined by commas in key order, keys shortened to their last part
    where that stays unique (objective.gamma=0 -> gamma=0), without deletions (~key), NOT_NAMED,
    hydra.* and `leave_out` keys; path separators become "-"."""
    from selfflow.training.callbacks import file_stem

    items = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if key.startswith(
            "~"
        ):  # a deletion (~callbacks.probe, written ~callbacks.probe=null in a sweep)
            continue
        key = key.lstrip("+")
        if sep and not key.startswith("hydra.") and key not in (*NOT_NAMED, *leave_out):
            items.append((key, value))
    items.sort()  # the same name whatever the order on the command line
    last_parts = [key.rsplit(".", 1)[-1] for key, _ in items]
    parts = [
        f"{short if last_parts.count(short) == 1 else key}={value}"
        for (key, value), short in zip(items, last_parts)
    ]
    return file_stem(",".join(parts)) if parts else ""


def run_name(mode: str) -> str | None:
    """The resolver: this Hydra job's name for `mode` (see the module docstring)."""
    from hydra.core.hydra_config import HydraConfig

    if mode not in MODES:
        raise ValueError(f"${{run_name:{mode}}} is unknown; use one of: {', '.join(MODES)}")
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    name = override_name(hydra.overrides.task, NOT_GROUPED if mode == "group" else ())
    if mode == "subdir":
        return name or str(hydra.job.num)
    return name or None


def register_run_name_resolver() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
