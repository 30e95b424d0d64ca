"""selfflow-prompt-following: do a text-conditioned model's samples follow their prompts? Judged by a local reference
classifier (selfflow-reference).

  selfflow-train experiment=text_digits hydra.run.dir=runs/text
  selfflow-reference --out refs/digits experiment=digits
  selfflow-prompt-following --ckpt runs/text/checkpoints/last.ckpt --reference refs/digits --out runs/prompts

Text-to-audio the same way: `experiment=text_audio_digits`, a reference trained with `experiment=audio_digits`.
By default every digit gets prompts in phrasings the training captions used and in phrasings they never used;
`--prompt "TEXT=CLASS"` (repeatable) gives your own. For each prompt, `--per-prompt` samples are drawn and classified.
Writes `prompt_following.json` (per-prompt and overall accuracy, chance level) and `prompt_grid.png` under --out, and
prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selfflow.cli.errors import friendly_errors


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="selfflow-prompt-following", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--ckpt", type=Path, required=True, help="a text-conditioned run's checkpoint")
    top.add_argument("--reference", type=Path, required=True, help="a folder written by selfflow-reference")
    top.add_argument("--out", type=Path, required=True, help="folder for prompt_following.json and the grid")
    top.add_argument("--prompt", action="append", default=[], help="'TEXT=CLASS' (repeatable); default: all digits")
    top.add_argument("--per-prompt", type=int, default=16)
    top.add_argument("--steps", type=int, default=25, help="Heun steps (evaluations per sample)")
    top.add_argument("--cfg-scale", type=float, default=3.0)
    top.add_argument("--seed", type=int, default=0)
    return top


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    with friendly_errors("selfflow-prompt-following"):
        from selfflow.evaluation.prompt_following import default_prompts, judge, parse_prompt, summary, write_report
        from selfflow.evaluation.reference_classifier import load_reference_classifier

        classifier = load_reference_classifier(args.reference)
        class_names = classifier.class_names
        prompts = [parse_prompt(p, class_names) for p in args.prompt] or default_prompts(
            class_names, classifier.modality
        )
        results, samples = judge(args.ckpt, classifier, prompts, args.per_prompt, args.steps, args.cfg_scale, args.seed)
        report = {
            "ckpt": str(args.ckpt),
            "reference": str(args.reference),
            "per_prompt": args.per_prompt,
            "sampler": "heun",
            "steps": args.steps,
            "cfg_scale": args.cfg_scale,
            "seed": args.seed,
            **summary(results, len(class_names)),
            "prompts": results,
        }
        write_report(args.out, report, samples, classifier, args.per_prompt)
        for row in results:
            print(f"{row['accuracy']:6.1%}  {row['class']:>6}  {row['prompt']}")
        print(
            json.dumps(
                {k: report[k] for k in ("accuracy", "chance", "accuracy_seen_phrasings", "accuracy_unseen_phrasings")}
            )
        )
        return report


if __name__ == "__main__":
    main()
