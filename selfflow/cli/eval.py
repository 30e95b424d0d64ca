"""selfflow-eval: FID, sFID, Inception Score, precision and recall of image samples against a reference, as the ADM
evaluation suite defines them, with the standard FID InceptionV3 loaded from a local file.

  selfflow-eval samples=samples/run/samples.npz ref=VIRTUAL_imagenet256_labeled.npz \
    inception=pt_inception-2015-12-05-6726825d.pth out=metrics.json
  selfflow-eval samples=... ref=/data/train_images inception=...   # a folder: statistics kept for ref=<them> next time

Writes `out` (metrics.json): fid, sfid, inception_score, precision, recall (null where a side holds statistics only,
with a note), num_samples, num_ref, the weights file and its sha256, and the library that computed them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from selfflow.cli.config_help import register_config_keys_resolver
from selfflow.cli.errors import check_overrides, friendly_errors
from selfflow.io.safe_files import write_json_atomically

COMMAND = "selfflow-eval"


def check_inputs(cfg: DictConfig) -> None:
    """Every input is given, and samples and ref exist, before the network is loaded or an image read."""
    for key in ("samples", "ref", "inception"):
        if OmegaConf.is_missing(cfg, key):
            raise ValueError(
                f"{key}=... is required: {COMMAND} samples=SAMPLES.npz ref=REF.npz|FOLDER "
                f"inception=pt_inception-2015-12-05-6726825d.pth out=metrics.json"
            )
    for key in ("samples", "ref"):
        if not Path(str(cfg[key])).expanduser().exists():
            raise FileNotFoundError(f"{key}={cfg[key]}: no such file or folder")


def size_mismatch(samples, ref) -> str | None:
    """Samples and reference images of different sizes: allowed (both are resized to 299x299), but a pitfall."""
    if None in (samples.image_size, ref.image_size) or samples.image_size == ref.image_size:
        return None
    return (
        f"samples are {'x'.join(map(str, samples.image_size))} pixels, the reference images "
        f"{'x'.join(map(str, ref.image_size))}; both are resized to 299x299, but published numbers compare "
        f"images of one resolution"
    )


def reference_stats_path(cfg: DictConfig) -> Path:
    if cfg.ref_stats_out is not None:
        return Path(str(cfg.ref_stats_out)).expanduser()
    folder = Path(str(cfg.ref)).expanduser().resolve()
    return Path(str(cfg.out)).expanduser().parent / f"{folder.name}_inception_stats.npz"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run selfflow-eval from its config; returns the document written to `out`."""
    try:
        import torch_fidelity
    except ImportError as error:
        raise ModuleNotFoundError(f"{COMMAND} needs torch-fidelity: pip install -e '.[eval]' ({error})") from None

    from selfflow.evaluation.eval_sets import load_eval_set, write_stats
    from selfflow.evaluation.inception import WEIGHTS_FILE, WEIGHTS_SHA256_PREFIX, load_inception
    from selfflow.evaluation.standard_metrics import standard_metrics
    from selfflow.sampling.generate import resolve_device

    check_inputs(cfg)
    device = resolve_device(cfg.device)
    extractor = load_inception(cfg.inception, device)
    if not extractor.is_standard:
        print(
            f"{COMMAND}: warning: inception={extractor.weights} has sha256 {extractor.sha256[:12]}..., not the "
            f"{WEIGHTS_SHA256_PREFIX}... of {WEIGHTS_FILE}: these numbers are not comparable with published ones",
            file=sys.stderr,
        )
    samples = load_eval_set(cfg.samples, extractor, cfg.batch_size, progress=cfg.progress)
    ref = load_eval_set(cfg.ref, extractor, cfg.batch_size, size=samples.image_size, progress=cfg.progress)
    if (mismatch := size_mismatch(samples, ref)) is not None:
        print(f"{COMMAND}: warning: {mismatch}", file=sys.stderr)
    ref_stats = write_stats(ref, reference_stats_path(cfg)) if Path(str(cfg.ref)).expanduser().is_dir() else None
    metrics = standard_metrics(samples, ref, device, cfg.distance_batch_size)
    notes = metrics.pop("notes")
    document = {
        **metrics,
        "inception": str(extractor.weights),
        "library": f"torch-fidelity {torch_fidelity.__version__}",
        "inception_sha256": extractor.sha256,
        "standard_inception_weights": extractor.is_standard,
        "samples": str(cfg.samples),
        "ref": str(cfg.ref),
        "ref_stats": None if ref_stats is None else str(ref_stats),
        "notes": notes,
    }
    out = Path(str(cfg.out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out, document)
    shown = ", ".join(
        f"{name} {'n/a' if document[key] is None else format(document[key], '.4g')}"
        for name, key in (
            ("FID", "fid"),
            ("sFID", "sfid"),
            ("IS", "inception_score"),
            ("precision", "precision"),
            ("recall", "recall"),
        )
    )
    print(
        f"{COMMAND}: {shown} ({document['num_samples'] or '?'} samples vs {document['num_ref'] or '?'} reference) "
        f"-> {out}"
    )
    if ref_stats is not None:
        print(f"{COMMAND}: reference statistics written to {ref_stats}; next time pass ref={ref_stats}")
    return document


@hydra.main(config_path="pkg://selfflow.conf", config_name="eval", version_base="1.3")
def run_from_config(cfg: DictConfig) -> None:
    with friendly_errors(COMMAND):
        evaluate(cfg)


def main() -> None:
    """Bad overrides (unknown keys) stop here with one line; then Hydra composes and runs."""
    register_config_keys_resolver()  # --help's key list
    check_overrides(COMMAND, "eval", sys.argv[1:])
    run_from_config()


if __name__ == "__main__":
    main()
