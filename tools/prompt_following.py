#!/usr/bin/env python
"""Do a text-conditioned model's samples follow their prompts? Judge them with a local reference classifier.

    selfflow-train experiment=text_digits hydra.run.dir=runs/text
    python tools/train_reference_classifier.py --out refs/digits experiment=digits
    python tools/prompt_following.py --ckpt runs/text/checkpoints/last.ckpt --reference refs/digits --out runs/prompts

Text-to-audio the same way: `experiment=text_audio_digits`, a reference trained with `experiment=audio_digits`.

Each prompt names one class ("a handwritten four" -> 4). By default every digit gets prompts in phrasings the
training captions used and in phrasings they never used; `--prompt "TEXT=CLASS"` (repeatable) gives your own.
For each prompt, `--per-prompt` samples are drawn and classified; a prompt is followed when the classifier's
answer is the prompt's class. Writes `prompt_following.json` (per-prompt and overall accuracy, chance level)
and `prompt_grid.png` (one row per prompt) under --out, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfflow.cli.errors import friendly_errors  # noqa: E402

# per modality: phrasings among the built-in captions' templates, and phrasings never in the training captions
SEEN_TEMPLATES = {"image": ("a handwritten {word}", "the digit {word}"),
                  "audio": ("a voice saying {word}", "someone says {word}")}
UNSEEN_TEMPLATES = {"image": ("a picture of a {word}", "the digit {digit}", "number {digit} written with a pen"),
                    "audio": ("a recording of the word {word}", "{word}, spoken out loud")}


def default_prompts(class_names: list[str], modality: str = "image") -> list[tuple[str, int, bool]]:
    """(prompt, class, seen phrasing) for every class, in both seen and unseen phrasings."""
    from selfflow.data.captions import class_words

    seen, unseen = SEEN_TEMPLATES[modality], UNSEEN_TEMPLATES[modality]
    return [(template.format(**class_words(name)), label, template in seen)
            for label, name in enumerate(class_names) for template in seen + unseen]


def parse_prompt(spec: str, class_names: list[str]) -> tuple[str, int, None]:
    """'TEXT=CLASS' with CLASS a class name or index of the reference classifier."""
    text, sep, target = spec.rpartition("=")
    if not sep or not text.strip():
        raise ValueError(f"--prompt {spec!r} must be 'TEXT=CLASS', e.g. --prompt 'a handwritten four=4'")
    target = target.strip()
    if target in class_names:
        return text.strip(), class_names.index(target), None
    if target.isdigit() and int(target) < len(class_names):
        return text.strip(), int(target), None
    raise ValueError(f"--prompt {spec!r}: class {target!r} is not one of the reference classifier's {class_names}")


@torch.no_grad()
def judge(ckpt: Path, classifier, prompts: list[tuple[str, int, bool | None]], per_prompt: int, steps: int,
          cfg_scale: float, seed: int) -> tuple[list[dict], torch.Tensor]:
    """Per-prompt results and the samples ([P * per_prompt, C, H, W] images or [P * per_prompt, 1, S] waves) of
    the reference classifier's modality; classifier: a loaded reference classifier."""
    from selfflow.sampling.generate import NoiseSource, sample_generators, sample_tokens
    from selfflow.sampling.prompted import prompted_condition
    from selfflow.tokens import TEXT
    from selfflow.interop.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    modality = classifier.modality
    if TEXT not in loaded.tokenizers or modality not in loaded.tokenizers:
        experiment = {"image": "text_digits", "audio": "text_audio_digits"}[modality]
        raise ValueError(f"{ckpt} is not a text-to-{modality} checkpoint, as the {modality} reference classifier "
                         f"needs (its tokenizers: {sorted(loaded.tokenizers)}); train one with selfflow-train "
                         f"experiment={experiment}, or give a reference of its modality")
    condition = prompted_condition(loaded.tokenizers[TEXT], [p for p, _, _ in prompts], per_prompt)
    noise = NoiseSource(generators=sample_generators(seed, range(condition.batch_size)))
    tokenizer = loaded.tokenizers[modality]
    samples = tokenizer.decode(sample_tokens(loaded.model, tokenizer, condition, steps=steps, solver="heun",
                                             cfg_scale=cfg_scale, noise=noise).tokens)
    predicted = classifier.logits(samples).argmax(dim=1).view(len(prompts), per_prompt)
    results = []
    for (prompt, target, seen), row in zip(prompts, predicted):
        results.append({"prompt": prompt, "class": classifier.class_names[target], "seen_phrasing": seen,
                        "accuracy": float((row == target).float().mean()),
                        "predicted": [classifier.class_names[i] for i in row.tolist()]})
    return results, samples


def summary(results: list[dict], num_classes: int) -> dict:
    def mean(rows):
        return sum(r["accuracy"] for r in rows) / len(rows) if rows else None

    return {"accuracy": mean(results), "chance": 1.0 / num_classes,
            "accuracy_seen_phrasings": mean([r for r in results if r["seen_phrasing"] is True]),
            "accuracy_unseen_phrasings": mean([r for r in results if r["seen_phrasing"] is False])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a text-conditioned run's checkpoint")
    parser.add_argument("--reference", type=Path, required=True, help="tools/train_reference_classifier.py output")
    parser.add_argument("--out", type=Path, required=True, help="folder for prompt_following.json and the grid")
    parser.add_argument("--prompt", action="append", default=[], help="'TEXT=CLASS' (repeatable); default: all digits")
    parser.add_argument("--per-prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25, help="Heun steps (evaluations per sample)")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from selfflow.evaluation.reference_classifier import load_reference_classifier
    from selfflow.sampling.media import save_spectrogram
    from selfflow.sampling.writers import save_image_grid

    classifier = load_reference_classifier(args.reference)
    class_names = classifier.class_names
    prompts = [parse_prompt(p, class_names) for p in args.prompt] or default_prompts(class_names,
                                                                                     classifier.modality)
    results, samples = judge(args.ckpt, classifier, prompts, args.per_prompt, args.steps, args.cfg_scale,
                            args.seed)
    report = {"ckpt": str(args.ckpt), "reference": str(args.reference), "per_prompt": args.per_prompt,
              "sampler": "heun", "steps": args.steps, "cfg_scale": args.cfg_scale, "seed": args.seed,
              **summary(results, len(class_names)), "prompts": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompt_following.json").write_text(json.dumps(report, indent=2))
    if classifier.modality == "image":
        save_image_grid(samples, args.out / "prompt_grid.png", nrow=args.per_prompt, upscale=2)
    else:  # the first sample of each prompt, titled by its prompt
        firsts = samples.view(len(prompts), args.per_prompt, *samples.shape[1:])[:, 0]
        save_spectrogram(firsts, args.out / "prompt_grid.png", classifier.front.sample_rate,
                         titles=[r["prompt"] for r in results])
    for r in results:
        print(f"{r['accuracy']:6.1%}  {r['class']:>6}  {r['prompt']}")
    print(json.dumps({k: report[k] for k in ("accuracy", "chance", "accuracy_seen_phrasings",
                                              "accuracy_unseen_phrasings")}))
    return report


if __name__ == "__main__":
    with friendly_errors("prompt_following"):
        main()
