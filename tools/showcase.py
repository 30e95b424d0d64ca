#!/usr/bin/env python
"""The default run as the README shows it: its three final pictures and recognition shares,
under docs/showcase/.

    python -m tools.showcase                          # selfflow-train into runs/showcase, then copy
    python -m tools.showcase --run-dir runs/DATE/TIME # copy from a default run that has finished
    # the recognition shares of other sampler settings:
    python -m tools.showcase --judge runs/showcase/checkpoints/last.ckpt --cfg-scale 1 2 3

Writes docs/showcase/image.png (the grid, one row per digit), video.png (one row of frames per
clip), audio.png (spectrograms), recognition.json (the run's shares) and run.json (steps, wall time,
the machine's load while it ran: wall time on a shared machine says little without it). --judge
prints the shares of a checkpoint's samples for each sampler setting, without writing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from tools.reproduce import ROOT, exe, run, wall_time

OUT = ROOT / "docs" / "showcase"
PICTURES = ("image", "video", "audio")


def train_default(run_dir: Path) -> dict:
    """The default run, exactly `selfflow-train` with nothing but its folder chosen; its wall time
    and load."""
    load_before, started = os.getloadavg()[0], time.perf_counter()
    run([exe("selfflow-train"), f"hydra.run.dir={run_dir}"], run_dir.with_suffix(".log"))
    return {
        "wall_seconds": round(time.perf_counter() - started),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
    }


def copy_outputs(run_dir: Path, out: Path, timing: dict | None) -> None:
    """The three final pictures and recognition.json of `run_dir` into `out`, with run.json
    beside them."""
    out.mkdir(parents=True, exist_ok=True)
    for modality in PICTURES:
        shutil.copyfile(run_dir / "samples" / modality / "final.png", out / f"{modality}.png")
    shutil.copyfile(run_dir / "recognition.json", out / "recognition.json")
    steps = max(
        (int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.ckpt")),
        default=None,
    )
    (out / "run.json").write_text(json.dumps({"steps": steps, **(timing or {})}, indent=2) + "\n")
    print(f"showcase: {', '.join(PICTURES)} pictures, recognition.json and run.json in {out}")


def judge_checkpoint(
    ckpt: Path, cfg_scales: list[float], steps: list[int], samples_per_class: int
) -> None:
    """Print the recognition shares of `ckpt`'s EMA samples for every (steps, cfg_scale): for your
    own runs (the built-in data sets are made with the sizes the checkpoint's config gives, into
    $SELFFLOW_CACHE)."""
    from omegaconf import OmegaConf

    from selfflow.evaluation.recognition import format_recognition, measure_recognition
    from selfflow.interop.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    data = OmegaConf.to_container(loaded.config.data)
    for count in steps:
        for scale in cfg_scales:
            report = measure_recognition(
                loaded.model, loaded.tokenizers, data, samples_per_class, count, scale
            )
            print(f"steps={count} cfg_scale={scale}:\n{format_recognition(report)}", flush=True)


def main() -> None:
    top = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument(
        "--run-dir", type=Path, help="a finished default run to copy from (else one is trained)"
    )
    top.add_argument("--out", type=Path, default=OUT)
    top.add_argument(
        "--judge", type=Path, help="a checkpoint to judge under other sampler settings instead"
    )
    top.add_argument("--cfg-scale", type=float, nargs="+", default=[2.0])
    top.add_argument("--steps", type=int, nargs="+", default=[50])
    top.add_argument("--samples-per-class", type=int, default=10)
    args = top.parse_args()
    if args.judge:
        judge_checkpoint(args.judge, args.cfg_scale, args.steps, args.samples_per_class)
        return
    run_dir = args.run_dir
    if run_dir is not None:
        timing = {"wall_seconds": round(wall_time(run_dir))}  # first to last file written
    else:
        run_dir = ROOT / "runs" / "showcase"
        if run_dir.exists():
            raise SystemExit(
                f"{run_dir} exists: remove it for a fresh default run, or pass --run-dir {run_dir}"
            )
        timing = train_default(run_dir)
    copy_outputs(run_dir, args.out, timing)


if __name__ == "__main__":
    main()
