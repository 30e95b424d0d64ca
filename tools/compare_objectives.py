#!/usr/bin/env python
"""Self-Flow, REPA and vanilla flow matching trained with the same data, model, seeds and steps,
then compared on linear-probe accuracy per layer, FID against held-out images, loss curves and wall
time per step.

    python -m tools.compare_objectives --encoder /models/dinov2-base \\
        --inception pt_inception-2015-12-05-6726825d.pth --steps 4000 --train-per-class 1000
    python -m tools.compare_objectives --encoder DIR --steps 60 --patch-size 8   # CPU path check

Data: CIFAR-10 photos from ../shared/data/cifar10-small (or --data-root: class folders under train/
and test/), copied into <work>/data with the given counts per class; the test images are the FID
reference (selfflow-eval). Writes <out>.json (every number), <out>.md (the table) and <out>.png
(probe accuracy by layer, a line per objective). Every run is a plain command (selfflow-train,
-probe, -sample), printed as it starts; a finished step is skipped when the tool is run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import time
from pathlib import Path

from tools.reproduce import exe, run, wall_time

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-small"
OBJECTIVES = {"selfflow": "Self-Flow", "repa": "REPA", "vanilla": "vanilla flow matching"}


def subset(source: Path, target: Path, per_class: dict[str, int]) -> Path:
    """`target` with the first `per_class[split]` images of each class of `source`/<split>/."""
    for split, count in per_class.items():
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            out = target / split / folder.name
            out.mkdir(parents=True, exist_ok=True)
            for path in sorted(folder.iterdir())[:count]:
                if not (out / path.name).exists():
                    shutil.copy(path, out / path.name)
    return target


def train_command(args, data: Path, objective: str, run_dir: Path) -> list[str]:
    return [
        exe("selfflow-train"),
        "experiment=cifar10",
        f"data.root={data}",
        f"model={args.model}",
        f"tokenizer.image.patch_size={args.patch_size}",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=5",
        "callbacks.samples.every_n_steps=0",
        "~callbacks.probe",
        f"callbacks.checkpoint.every_n_train_steps={args.steps}",
        "objective.ema_decay=0.999",
        f"objective={objective}",
        f"objective.encoder={args.encoder}",
        f"seed={args.seed}",
        f"hydra.run.dir={run_dir}",
    ]


def train_probe_fid(args, work: Path, data: Path, objective: str) -> Path:
    """Train, probe and (with an Inception file) sample + FID one objective; each step once."""
    run_dir, ckpt = work / objective, work / objective / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        started = time.perf_counter()
        run(train_command(args, data, objective, run_dir), work / f"{objective}.train.log")
        (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}")
    if not (run_dir / "probe" / "probe.json").is_file():
        layers = ",".join(str(i) for i in range(1, args.depth + 1))
        probe = [
            f"ckpt={ckpt}",
            f"out_dir={run_dir / 'probe'}",
            f"layers=[{layers}]",
            f"seed={args.seed}",
        ]
        run([exe("selfflow-probe"), *probe, "progress=false"], work / f"{objective}.probe.log")
    if args.inception and not (run_dir / "fid" / "metrics.json").is_file():
        sample = [
            f"ckpt={ckpt}",
            f"out_dir={run_dir / 'fid'}",
            f"num_samples={args.fid_samples}",
            "metrics=fid",  # the released protocol: SDE, 250 steps, labels drawn from the seed
            f"fid_ref={data / 'test'}",
            f"inception={args.inception}",
            "per_sample_files=false",
            f"seed={args.seed}",
            "progress=false",
        ]
        run([exe("selfflow-sample"), *sample], work / f"{objective}.fid.log")
    return run_dir


def read_run(run_dir: Path, batch_size: int) -> dict:
    """Probe accuracy per layer, FID, loss curve and seconds per step of one run."""
    probe = json.loads((run_dir / "probe" / "probe.json").read_text())
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    flow = [r for r in rows if r.get("train/loss_flow")]
    curve = [(int(r["step"]), float(r["train/loss_flow"])) for r in flow]
    rates = [float(r["train/samples_per_s"]) for r in rows if r.get("train/samples_per_s")]
    fid_file = run_dir / "fid" / "metrics.json"
    return {
        "probe_by_layer": {int(r["layer"]): r["top1"] for r in probe["results"]},
        "probe_best": probe["best"]["top1"],
        "best_layer": probe["best"]["layer"],
        "fid": json.loads(fid_file.read_text()).get("fid") if fid_file.is_file() else None,
        "loss_flow_curve": curve,
        "final_loss_flow": curve[-1][1] if curve else None,
        "seconds_per_step": batch_size / statistics.median(rates) if rates else None,
        "train_wall_seconds": float((run_dir / "wall_seconds.txt").read_text()),
    }


def markdown(results: dict) -> str:
    """The table: one row per objective."""
    layers = sorted({k for r in results.values() for k in r["probe_by_layer"]})
    head = ["objective", *(f"probe L{k}" for k in layers), "best", "FID"]
    head += ["final flow loss", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in results.items():
        fid = "n/a" if r["fid"] is None else f"{r['fid']:.1f}"
        probes = [f"{100 * r['probe_by_layer'][k]:.1f}%" for k in layers]
        best = f"{100 * r['probe_best']:.1f}% (L{r['best_layer']})"
        cells = [OBJECTIVES[name], *probes, best, fid]
        cells += [f"{r['final_loss_flow']:.4f}", f"{r['seconds_per_step']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Probe accuracy by layer, one line per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, r in results.items():
        layers = sorted(r["probe_by_layer"])
        accuracy = [100 * r["probe_by_layer"][k] for k in layers]
        ax.plot(layers, accuracy, marker="o", label=OBJECTIVES[name])
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_xticks(sorted({k for r in results.values() for k in r["probe_by_layer"]}))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


SECTION = "compare_objectives"


def results_section(report: dict, png: str) -> str:
    """The page section: what was run, the table, the plot (between markers that tools.reproduce
    keeps when it rewrites the page)."""
    s = report["settings"]
    how = " ".join(
        [
            "Written by `python -m tools.compare_objectives`",
            f"({report['seconds'] / 60:.1f} minutes on this machine):",
            f"model `{s['model']}` (depth {s['depth']}), patch {s['patch_size']},",
            f"{s['steps']} steps of batch {s['batch_size']}, seed {s['seed']},",
            f"{s['train_per_class']} training and {s['test_per_class']} held-out images per class;",
            "probe: `selfflow-probe` at every block; FID: `selfflow-sample metrics=fid`",
            f"({s['fid_samples']} samples, the released protocol) against the held-out images.",
        ]
    )
    title = "## Self-Flow, REPA and vanilla flow matching in the same code"
    lines = [f"<!-- begin {SECTION} -->", title]
    note = [f"> {s['note']}", ""] if s.get("note") else []
    lines += ["", *note, how, "", markdown(report["results"]).rstrip(), ""]
    lines += [f"![probe accuracy by layer]({png})", f"<!-- end {SECTION} -->"]
    return "\n".join(lines)


def write_section(page: Path, section: str) -> None:
    """Put `section` on `page`, in place of its earlier version (or at the end)."""
    text = page.read_text() if page.is_file() else ""
    pattern = re.compile(rf"<!-- begin {SECTION} -->.*?<!-- end {SECTION} -->", flags=re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text + "\n" + section
    page.write_text(text.rstrip() + "\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--encoder", required=True, help="REPA's encoder: a transformers Dinov2Model folder")
    add("--inception", default=None, help="FID Inception weights file (no FID without)")
    add("--data-root", type=Path, default=CIFAR, help="class folders under train/ and test/")
    add("--steps", type=int, default=150)
    add("--train-per-class", type=int, default=60)
    add("--test-per-class", type=int, default=20)
    add("--batch-size", type=int, default=32)
    add("--model", default="tiny")
    add("--patch-size", type=int, default=4, help="pixels per token side (32 px, 4: 8x8 tokens)")
    add("--depth", type=int, default=4, help="the model's depth: probes at every block")
    add("--fid-samples", type=int, default=100)
    add("--seed", type=int, default=0)
    add("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    add("--work", type=Path, default=ROOT / "runs" / "compare_objectives")
    add("--out", type=Path, default=ROOT / "docs" / "results" / "compare_objectives")
    add("--results-page", type=Path, default=None, help="a page for the table (docs/results.md)")
    add("--note", default=None, help="a sentence put above the table on the results page")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if not (args.data_root / "train").is_dir():
        print(f"compare_objectives: {args.data_root}/train is absent; nothing to compare (skipped)")
        return {}
    counts = {"train": args.train_per_class, "test": args.test_per_class}
    data = subset(args.data_root, args.work / "data", counts)
    results = {}
    for objective in args.objectives:
        run_dir = train_probe_fid(args, args.work, data, objective)
        results[objective] = read_run(run_dir, args.batch_size)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    # each run's first to last file (train, probe, FID), summed: right also on a rerun
    seconds = sum(wall_time(args.work / objective) for objective in args.objectives)
    report = {"settings": settings, "results": results, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    plot(results, args.out.with_suffix(".png"))
    if args.results_page is not None:
        png = args.out.with_suffix(".png").resolve().relative_to(args.results_page.resolve().parent)
        write_section(args.results_page, results_section(report, str(png)))
    print(markdown(results))
    return report


if __name__ == "__main__":
    main()
