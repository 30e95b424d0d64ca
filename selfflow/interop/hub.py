"""Hub-style models: an export folder a model hub accepts (model.safetensors, config.json without
machine paths, a README.md model card), loaded back by path or by hub repo id from huggingface_hub's
local cache.

Nothing is ever downloaded: `from_pretrained` takes a local folder, or a repo id that it resolves in
the local hub cache only (`hf download OWNER/NAME`, run by you beforehand, puts it there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from selfflow.interop.export_folder import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    load_exported,
    read_export_config,
)

HUB_PREFIX = "hf://"
PRETRAINED_PREFIX = "pretrained:"  # init=pretrained:NAME (selfflow-train): fine-tune from an export
MODEL_CARD = "README.md"
CARD_TAGS = ("selfflow", "self-flow", "flow-matching")
CARD_DATA_KEYS = ("image_size", "num_frames", "sample_rate")  # the data settings a card lists
REPO_ID = re.compile(r"^[\w][\w.-]*/[\w][\w.-]*$")
# a value that names a place on this machine: an absolute or home path, alone or after a prefix
# (official:/...)
MACHINE_PATH = re.compile(r"(^|[:=,\s])(/|~|[A-Za-z]:[\\/])")
CITATION = """@inproceedings{chefer2026selfflow,
  title     = {Self-Supervised Flow Matching for Scalable Multi-Modal Synthesis},
  author    = {Chefer, Hila and Esser, Patrick and Lorenz, Dominik and Podell, Dustin and
               Raja, Vikash and Tong, Vinh and Torralba, Antonio and Rombach, Robin},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2026},
  eprint    = {2603.06507},
  archivePrefix = {arXiv}
}"""

# the model card of an export (README.md): the hub's YAML front matter, then the model in a page
CARD = """---
library_name: selfflow
tags:
{tags}
---

# Self-Flow model ({modalities})

A flow-matching transformer trained with selfflow (dual-timestep scheduling and EMA
self-distillation, the Self-Flow method). These are the EMA weights after {step}
optimizer steps.

## Use

```python
import selfflow
loaded = selfflow.from_pretrained("path/to/this/folder")   # vae=FOLDER for a latent model
# or the repo id, once `hf download` has put it in the local hub cache (nothing is downloaded)
```

```bash
selfflow-sample ckpt=hf://OWNER/NAME num_samples=16          # from the local hub cache
selfflow-train init=pretrained:hf://OWNER/NAME ...           # fine-tune from these weights
```

## Training

| setting | value |
|---|---|
{training}

Model:

| key | value |
|---|---|
{model}

Objective:

| key | value |
|---|---|
{objective}

The full training config is in `config.json` (local paths removed).

## Metrics

| metric | value |
|---|---|
{measured}

## Citation

Self-Supervised Flow Matching for Scalable Multi-Modal Synthesis (Chefer, Esser et al., Black Forest
Labs, ICML 2026), [arXiv:2603.06507](https://arxiv.org/abs/2603.06507):

```bibtex
{citation}
```
"""


def without_machine_paths(value: Any) -> Any:
    """`value` (plain containers) with every string that names a place on this machine replaced by
    None.

    Args:
        value: a resolved run config as plain dicts, lists and scalars.

    Returns:
        The same structure; a VAE folder, data root or run folder given as an absolute path
        becomes None (whoever loads the model names their own: `from_pretrained(..., vae=FOLDER)`).
    """
    if isinstance(value, dict):
        return {key: without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(item) for item in value]
    if isinstance(value, str) and MACHINE_PATH.search(value):
        return None
    return value


def plain_values(node: Any, kinds: tuple[type, ...]) -> dict[str, Any]:
    """The entries of a config node whose values are of `kinds` (what a card table shows)."""
    return {k: v for k, v in (node or {}).items() if isinstance(v, kinds)}


def _rows(table: dict[str, Any]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in table.items())


def model_card(meta: dict, metrics: dict[str, float] | None = None) -> str:
    """README.md of an export: what the model is, how it was trained, how to load it, and the paper
    to cite.

    Args:
        meta: the export's config.json document (step, weights, portable run config).
        metrics: measured results to list (e.g. {"fid50k": 2.3}); None: the card says none were
            given.

    Returns:
        The card as Markdown with the hub's YAML front matter.
    """
    config = meta.get("config") or {}
    modalities = sorted((config.get("tokenizer") or {}).keys())
    model = plain_values(config.get("model"), (int, float, str, bool))
    objective = plain_values(config.get("objective"), (int, float, bool))
    data = config.get("data") or {}
    dataset = data.get("dataset") or {}
    data_rows = {
        "modality": data.get("modality", ", ".join(modalities)),
        "dataset": dataset.get("_target_"),
    }
    data_rows.update({k: v for k, v in dataset.items() if k in CARD_DATA_KEYS})
    measured = _rows(metrics) if metrics else "| (none given at export) | |"
    tags = "\n".join(f"  - {tag}" for tag in [*CARD_TAGS, *modalities])
    return CARD.format(
        tags=tags,
        modalities=", ".join(modalities),
        step=meta.get("step", 0),
        training=_rows(
            {"steps": meta.get("step", 0), "weights": meta.get("weights", "ema"), **data_rows}
        ),
        model=_rows(model),
        objective=_rows(objective),
        measured=measured,
        citation=CITATION,
    )


def resolve_pretrained(
    name: str | os.PathLike,
    revision: str | None = None,
) -> Path:
    """The local folder of an export: `name` itself when it is a folder, else the hub repo `name`
    (OWNER/NAME or hf://OWNER/NAME) from huggingface_hub's cache.

    Args:
        name: a folder, or a hub repo id.
        revision: a branch, tag or commit of the repo (None: main).

    Returns:
        The folder holding model.safetensors and config.json.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    repo_id = str(name).removeprefix(HUB_PREFIX).strip("/")
    if not REPO_ID.match(repo_id):
        raise FileNotFoundError(
            f"{name} is neither a folder nor a hub repo id (OWNER/NAME or hf://OWNER/NAME)",
        )
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        needs = "needs huggingface_hub: pip install 'selfflow[hub]'"
        raise ModuleNotFoundError(f"loading {name} by repo id {needs}") from None
    # the local cache only (no network call exists on this path): selfflow never downloads
    cached = [
        try_to_load_from_cache(repo_id, f, revision=revision)
        for f in (EXPORT_WEIGHTS, EXPORT_CONFIG)
    ]
    if not all(isinstance(found, str) for found in cached):
        raise FileNotFoundError(
            f"{name} is not a local folder, and the hub repo {repo_id} is not in the local hub "
            f"cache (nothing is downloaded); fetch it first: hf download {repo_id}"
        )
    return Path(cached[0]).parent


def from_pretrained(
    name: str | os.PathLike,
    vae: str | None = None,
    revision: str | None = None,
):
    """The model of a `selfflow-export` folder or hub repo, ready to sample
    (`selfflow.sample_tokens`) or to fine-tune (`loaded.model` is a plain `SelfFlowTransformer`;
    `selfflow-train init=pretrained:NAME`).

    Args:
        name: a folder, or a hub repo id (OWNER/NAME, hf://OWNER/NAME) in huggingface_hub's local
            cache.
        vae: the folder of the VAE a latent model was trained with (checked by fingerprint); exports
            store none.
        revision: a branch, tag or commit of the repo.

    Returns:
        `LoadedCheckpoint` (model, tokenizers, config, step).
    """
    return load_exported(resolve_pretrained(name, revision), vae)


def initialize_from_pretrained(objective, name: str, tokenizers: dict) -> None:
    """Fine-tuning from an export: the student and a fresh EMA teacher (and sampling EMAs) equal to
    its weights; a latent model's VAE is the run's own (`tokenizer.*.vae`), checked against the
    export's fingerprint.

    Args:
        objective: the run's SelfFlowObjective (its model built from the run's config).
        name: a folder or hub repo id (see `from_pretrained`).
        tokenizers: the run's tokenizers, by modality.
    """
    from selfflow.interop.state_check import check_state_fits

    vae = next((t.vae_path for t in tokenizers.values() if getattr(t, "vae_path", None)), None)
    state = from_pretrained(name, vae=None if vae is None else str(vae)).model.state_dict()
    check_state_fits(objective.model.state_dict(), state, f"init={PRETRAINED_PREFIX}{name}")
    objective.model.load_state_dict(state)
    for ema in (objective.teacher, *objective.sampling_emas.values()):
        ema.module.load_state_dict(state)


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True) -> str:
    """Upload an export folder (its model.safetensors, config.json and README.md) to the hub repo
    `repo_id`, creating the repo when needed; the token comes from HF_TOKEN or `hf auth login`,
    never from selfflow.

    Args:
        folder: a folder written by `selfflow-export`.
        repo_id: OWNER/NAME.
        private: create the repo private.

    Returns:
        The URL of the commit.
    """
    from huggingface_hub import HfApi

    read_export_config(Path(folder) / EXPORT_CONFIG)  # an export, not any folder
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        allow_patterns=[EXPORT_WEIGHTS, EXPORT_CONFIG, MODEL_CARD],
    )
    return str(getattr(commit, "commit_url", commit))
