"""selfflow-prompt-following: do a text-conditioned model's samples follow their prompts? Judged
by a local reference classifier (selfflow-reference).

  selfflow-train experiment=text_digits hydra.run.dir=runs/text
  selfflow-reference out=refs/digits experiment=digits
  selfflow-prompt-following ckpt=runs/text/checkpoints/last.ckpt reference=refs/digits out=DIR

Text-to-audio the same way: `experiment=text_audio_digits`, a reference trained with
`experiment=audio_digits`. By default every digit gets prompts in phrasings the training captions
used and in phrasings they never used; `prompt='TEXT=CLASS'` (or a list of them) gives your own. For
each prompt, `per_prompt` samples are drawn and classified. Writes `prompt_following.json`
(per-prompt and overall accuracy, chance level) and `prompt_grid.png` under `out`, and prints the
table. The keys are those of conf/prompt_following.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from selfflow.cli.config_help import register_config_keys_resolver
from selfflow.cli.errors import check_overrides, friendly_errors

COMMAND = "selfflow-prompt-following"
REQUIRED = ("ckpt", "reference", "out")


def prompt_specs(value) -> list[str]:
    """The `prompt` key as a list of 'TEXT=CLASS' strings: null (none: the defaults), one, or a
    list."""
    if value is None:
        return []
    return [str(p) for p in value] if isinstance(value, ListConfig | list) else [str(value)]


def user_vae(value):
    """The `vae` key as load_checkpoint takes it: null, a path, or {modality: path}."""
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


def prompt_following(cfg: DictConfig) -> dict:
    """Judge the checkpoint's samples per prompt, write the report and the grid, print the table.

    Args:
        cfg: the composed conf/prompt_following.yaml.

    Returns:
        The report written to out/prompt_following.json.
    """
    from selfflow.evaluation import prompt_following as tool
    from selfflow.evaluation.reference_classifier import load_reference_classifier

    for key in REQUIRED:
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(f"{key}=... is required: {COMMAND} ckpt=CKPT reference=REF out=DIR")
    ckpt, reference, out = (Path(str(cfg[key])) for key in REQUIRED)
    per_prompt, steps, seed = int(cfg.per_prompt), int(cfg.steps), int(cfg.seed)
    cfg_scale = float(cfg.cfg_scale)
    classifier = load_reference_classifier(reference)
    class_names = classifier.class_names
    prompts = [tool.parse_prompt(p, class_names) for p in prompt_specs(cfg.prompt)]
    prompts = prompts or tool.default_prompts(class_names, classifier.modality)
    sampling = {"steps": steps, "cfg_scale": cfg_scale, "seed": seed, "vae": user_vae(cfg.vae)}
    results, samples = tool.judge(ckpt, classifier, prompts, per_prompt, **sampling)
    report = {
        "ckpt": str(ckpt),
        "reference": str(reference),
        "per_prompt": per_prompt,
        "sampler": "heun",
        "steps": steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        **tool.summary(results, len(class_names)),
        "prompts": results,
    }
    tool.write_report(out, report, samples, classifier, per_prompt)
    for row in results:
        print(f"{row['accuracy']:6.1%}  {row['class']:>6}  {row['prompt']}")
    overall = ("accuracy", "chance", "accuracy_seen_phrasings", "accuracy_unseen_phrasings")
    print(json.dumps({k: report[k] for k in overall}))
    return report


@hydra.main(config_path="pkg://selfflow.conf", config_name="prompt_following", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors(COMMAND):
        prompt_following(cfg)


def main() -> None:
    """Bad overrides (unknown keys) stop here with one line; then Hydra composes and runs."""
    register_config_keys_resolver()  # --help's key list
    check_overrides(COMMAND, "prompt_following", sys.argv[1:])
    run_from_config()


if __name__ == "__main__":
    main()
