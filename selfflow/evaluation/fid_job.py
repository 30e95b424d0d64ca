"""selfflow-eval's job: FID, sFID, Inception Score, precision and recall of a samples file against
a reference, written to metrics.json; and the same job run after selfflow-sample (`metrics=fid`).

The job's settings are selfflow-eval's config (conf/eval.yaml): the command passes it as composed,
and a sampling job takes the file's defaults with its own paths merged in.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from selfflow.io.safe_files import write_json_atomically

COMMAND = "selfflow-eval"
# (name shown, key in metrics.json) of the printed line
SHOWN_METRICS = (
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("IS", "inception_score"),
    ("precision", "precision"),
    ("recall", "recall"),
)


def check_inputs(cfg: DictConfig) -> None:
    """Every input is given, and samples and ref exist, before the network is loaded or an image
    read.

    Args:
        cfg: selfflow-eval's config.

    Raises:
        ValueError: A required key is missing.
        FileNotFoundError: `samples` or `ref` does not exist.
    """
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
    """Samples and reference images of different sizes: allowed (both are resized to 299x299), but
    a pitfall.

    Args:
        samples (EvalSet): The samples' statistics and image size.
        ref (EvalSet): The reference's.

    Returns:
        The warning, or None when the sizes agree or one is unknown.
    """
    if None in (samples.image_size, ref.image_size) or samples.image_size == ref.image_size:
        return None
    return (
        f"samples are {'x'.join(map(str, samples.image_size))} pixels, the reference images "
        f"{'x'.join(map(str, ref.image_size))}; both are resized to 299x299, but published "
        f"numbers compare images of one resolution"
    )


def reference_stats_path(cfg: DictConfig) -> Path:
    """Where a folder reference's statistics are kept: `ref_stats_out`, else beside `out`."""
    if cfg.ref_stats_out is not None:
        return Path(str(cfg.ref_stats_out)).expanduser()
    folder = Path(str(cfg.ref)).expanduser().resolve()
    return Path(str(cfg.out)).expanduser().parent / f"{folder.name}_inception_stats.npz"


def warn(message: str) -> None:
    print(f"{COMMAND}: warning: {message}", file=sys.stderr)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run selfflow-eval from its config.

    Args:
        cfg: selfflow-eval's config (conf/eval.yaml).

    Returns:
        The document written to `out`.
    """
    try:
        import torch_fidelity
    except ImportError as error:
        needs = "needs torch-fidelity: pip install -e '.[eval]'"
        raise ModuleNotFoundError(f"{COMMAND} {needs} ({error})") from None

    from selfflow.evaluation.eval_sets import load_eval_set, write_stats
    from selfflow.evaluation.inception import WEIGHTS_FILE, WEIGHTS_SHA256_PREFIX, load_inception
    from selfflow.evaluation.standard_metrics import standard_metrics
    from selfflow.sampling.generate import resolve_device

    check_inputs(cfg)
    device = resolve_device(cfg.device)
    extractor = load_inception(cfg.inception, device)
    if not extractor.is_standard:
        warn(
            f"inception={extractor.weights} has sha256 {extractor.sha256[:12]}..., not the "
            f"{WEIGHTS_SHA256_PREFIX}... of {WEIGHTS_FILE}: these numbers are not comparable "
            f"with published ones"
        )
    batch, progress = cfg.batch_size, cfg.progress
    samples = load_eval_set(cfg.samples, extractor, batch, progress=progress)
    ref = load_eval_set(cfg.ref, extractor, batch, size=samples.image_size, progress=progress)
    if (mismatch := size_mismatch(samples, ref)) is not None:
        warn(mismatch)
    ref_is_folder = Path(str(cfg.ref)).expanduser().is_dir()
    ref_stats = write_stats(ref, reference_stats_path(cfg)) if ref_is_folder else None
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
    report(document, out, ref_stats)
    return document


def report(document: dict[str, Any], out: Path, ref_stats: Path | None) -> None:
    """Print the numbers in one line, and where a folder reference's statistics went."""
    shown = []
    for name, key in SHOWN_METRICS:
        value = document[key]
        shown.append(f"{name} {'n/a' if value is None else format(value, '.4g')}")
    counts = f"{document['num_samples'] or '?'} samples vs {document['num_ref'] or '?'} reference"
    print(f"{COMMAND}: {', '.join(shown)} ({counts}) -> {out}")
    if ref_stats is not None:
        kept = f"reference statistics written to {ref_stats}; next time pass ref={ref_stats}"
        print(f"{COMMAND}: {kept}")


def fid_eval_config(
    *,
    samples: Path,
    fid_ref: str | None,
    inception: str | None,
    out: Path,
    device: torch.device,
    progress: bool,
) -> DictConfig:
    """selfflow-eval's config (its defaults from conf/eval.yaml) for a sampling job's samples.npz
    against `fid_ref`, checked before any sampling: the reference exists, the weights file is a safe
    state dict, torch-fidelity is installed.

    Args:
        samples: The samples.npz the job will write.
        fid_ref: The `fid_ref` key: a reference .npz or image folder.
        inception: The `inception` key: the FID Inception weights file.
        out: Where metrics.json goes.
        device: Where the Inception network runs.
        progress: Progress bars.

    Returns:
        The config `evaluate` takes once the samples are written.

    Raises:
        ValueError: `fid_ref` or `inception` is not given.
        ModuleNotFoundError: torch-fidelity is not installed.
    """
    from selfflow.evaluation.inception import read_weights

    for key, value in (("fid_ref", fid_ref), ("inception", inception)):
        if value is None:
            raise ValueError(
                f"metrics=fid needs {key}=...: fid_ref=REF.npz|FOLDER (e.g. the ADM reference "
                f"batch) inception=pt_inception-2015-12-05-6726825d.pth (see docs/evaluation.md)"
            )
    eval_cfg = OmegaConf.load(files("selfflow.conf").joinpath("eval.yaml"))
    for key in ("defaults", "hydra"):
        eval_cfg.pop(key)
    paths = {"samples": str(samples), "ref": str(fid_ref), "inception": str(inception)}
    settings = {"out": str(out), "device": str(device), "progress": progress}
    eval_cfg = OmegaConf.merge(eval_cfg, {**paths, **settings})
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as error:
        needs = "needs torch-fidelity: pip install -e '.[eval]'"
        raise ModuleNotFoundError(f"metrics=fid {needs} ({error})") from None
    check_inputs(OmegaConf.merge(eval_cfg, {"samples": str(fid_ref)}))  # no samples yet
    read_weights(inception)
    return eval_cfg


class FidJobMetrics:
    """`selfflow-sample metrics=fid`: selfflow-eval on the job's samples.npz once it is written,
    its inputs checked before the checkpoint loads.

    Args:
        fid_ref: A reference .npz or image folder.
        inception: The FID Inception weights file.
        progress: Progress bars.
    """

    def __init__(self, *, fid_ref: str | None, inception: str | None, progress: bool):
        self.fid_ref, self.inception, self.progress = fid_ref, inception, progress
        self.eval_cfg: DictConfig | None = None

    def before_loading(self, out_dir: Path, device: torch.device) -> None:
        """Check the reference, the weights and torch-fidelity (`fid_eval_config`).

        Args:
            out_dir: The job's folder (samples.npz and metrics.json go there).
            device: Where the Inception network runs.
        """
        self.eval_cfg = fid_eval_config(
            samples=out_dir / "samples.npz",
            fid_ref=self.fid_ref,
            inception=self.inception,
            out=out_dir / "metrics.json",
            device=device,
            progress=self.progress,
        )

    def check_modality(self, modality: str) -> None:
        """Only modalities written to samples.npz (images).

        Args:
            modality: The generated modality.
        """
        from selfflow.sampling.modalities import modality_io

        if not modality_io(modality).arrays:
            raise ValueError(f"metrics=fid measures images; this checkpoint samples {modality}")

    def prepare(self, loaded, modality: str, device: torch.device) -> None:
        """Nothing to build before sampling."""

    def visit(self, samples, labels) -> None:
        """The numbers come from samples.npz, not from the chunks."""

    def finish(self, out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
        """Run selfflow-eval on the written samples.npz.

        Args:
            out_dir: The job's folder.
            summary: The job's summary.

        Returns:
            The document written to metrics.json.
        """
        return evaluate(self.eval_cfg)
