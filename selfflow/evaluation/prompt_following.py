"""Do a text-conditioned model's samples follow their prompts? Each prompt names one class ("a
handwritten four" -> 4); samples drawn for it are judged by a local reference classifier, and a
prompt is followed when the classifier's answer is the prompt's class. `selfflow-prompt-following`
runs it from the command line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfflow.io.safe_files import write_json_atomically

# per modality: phrasings among the built-in captions' templates, and phrasings never in the
# training captions
SEEN_TEMPLATES = {
    "image": ("a handwritten {word}", "the digit {word}"),
    "audio": ("a voice saying {word}", "someone says {word}"),
}
UNSEEN_TEMPLATES = {
    "image": ("a picture of a {word}", "the digit {digit}", "number {digit} written with a pen"),
    "audio": ("a recording of the word {word}", "{word}, spoken out loud"),
}


def default_prompts(class_names: list[str], modality: str = "image") -> list[tuple[str, int, bool]]:
    """(prompt, class, seen phrasing) for every class, in both seen and unseen phrasings."""
    from selfflow.data.folders.captions import class_words

    seen, unseen = SEEN_TEMPLATES[modality], UNSEEN_TEMPLATES[modality]
    return [
        (template.format(**class_words(name)), label, template in seen)
        for label, name in enumerate(class_names)
        for template in seen + unseen
    ]


def parse_prompt(spec: str, class_names: list[str]) -> tuple[str, int, None]:
    """'TEXT=CLASS' with CLASS a class name or index of the reference classifier."""
    text, sep, target = spec.rpartition("=")
    if not sep or not text.strip():
        raise ValueError(f"prompt={spec!r} must be 'TEXT=CLASS', e.g. 'a handwritten four=4'")
    target = target.strip()
    if target in class_names:
        return text.strip(), class_names.index(target), None
    if target.isdigit() and int(target) < len(class_names):
        return text.strip(), int(target), None
    known = f"the reference classifier's {class_names}"
    raise ValueError(f"prompt={spec!r}: class {target!r} is not one of {known}")


@torch.no_grad()
def judge(
    ckpt: Path,
    classifier,
    prompts: list[tuple[str, int, bool | None]],
    per_prompt: int,
    steps: int,
    cfg_scale: float,
    seed: int,
    vae=None,
) -> tuple[list[dict], torch.Tensor]:
    """Per-prompt results and the samples ([P * per_prompt, C, H, W] images or [P * per_prompt,
    1, S] waves) of the reference classifier's modality; classifier: a loaded reference
    classifier; vae: a latent model's VAE or autoencoder, named by the user (a path,
    or {modality: path})."""
    from selfflow.interop.checkpoint import load_checkpoint
    from selfflow.sampling.generate import NoiseSource, sample_generators, sample_tokens
    from selfflow.sampling.prompted import prompted_condition
    from selfflow.tokens import TEXT

    loaded = load_checkpoint(ckpt, vae=vae)
    modality = classifier.modality
    if TEXT not in loaded.tokenizers or modality not in loaded.tokenizers:
        experiment = {"image": "text_digits", "audio": "text_audio_digits"}[modality]
        raise ValueError(
            f"{ckpt} is not a text-to-{modality} checkpoint, as the {modality} reference "
            f"classifier needs (its tokenizers: {sorted(loaded.tokenizers)}); train one with "
            f"selfflow-train experiment={experiment}, or give a reference of its modality"
        )
    condition = prompted_condition(loaded.tokenizers[TEXT], [p for p, _, _ in prompts], per_prompt)
    noise = NoiseSource(generators=sample_generators(seed, range(condition.batch_size)))
    tokenizer = loaded.tokenizers[modality]
    samples = tokenizer.decode(
        sample_tokens(
            loaded.model,
            tokenizer,
            condition,
            steps=steps,
            solver="heun",
            cfg_scale=cfg_scale,
            noise=noise,
        ).tokens
    )
    predicted = classifier.logits(samples).argmax(dim=1).view(len(prompts), per_prompt)
    results = []
    for (prompt, target, seen), row in zip(prompts, predicted):
        results.append(
            {
                "prompt": prompt,
                "class": classifier.class_names[target],
                "seen_phrasing": seen,
                "accuracy": float((row == target).float().mean()),
                "predicted": [classifier.class_names[i] for i in row.tolist()],
            }
        )
    return results, samples


def summary(results: list[dict], num_classes: int) -> dict:
    def mean(rows):
        return sum(r["accuracy"] for r in rows) / len(rows) if rows else None

    return {
        "accuracy": mean(results),
        "chance": 1.0 / num_classes,
        "accuracy_seen_phrasings": mean([r for r in results if r["seen_phrasing"] is True]),
        "accuracy_unseen_phrasings": mean([r for r in results if r["seen_phrasing"] is False]),
    }


def write_report(
    out: Path, report: dict, samples: torch.Tensor, classifier, per_prompt: int
) -> None:
    """prompt_following.json, and prompt_grid.png: the modality's preview of every prompt's samples
    (a row each for images; the first sample of each prompt, titled by it, for audio)."""
    from selfflow.sampling.modalities import modality_io

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "prompt_following.json", report)
    prompts = [row["prompt"] for row in report["prompts"]]
    io = modality_io(classifier.modality)
    shown = (
        samples
        if not io.playable
        else samples.view(len(prompts), per_prompt, *samples.shape[1:])[:, 0]
    )
    tokenizer = getattr(
        classifier, "front", None
    )  # audio: the classifier's mel front knows the sample rate
    io.preview(
        shown, out / "prompt_grid.png", tokenizer, nrow=per_prompt, upscale=2, titles=prompts
    )
