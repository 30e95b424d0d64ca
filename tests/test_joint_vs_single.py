"""tools/joint_vs_single.py: which runs it trains, and the page it writes from their
probe reports."""

import json

from tools import joint_vs_single as tool_module


def fake_run(run_dir, by_layer: dict[int, float], modality: str | None = None):
    """A finished run as the tool finds it: a checkpoint and a probe.json per probed modality."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    rows = [
        {
            "layer": layer,
            "noise_level": 0.0,
            "pool": "mean",
            "top1": top1,
            "baseline_random_init_top1": 0.3,
            "baseline_input_top1": 0.5,
        }
        for layer, top1 in by_layer.items()
    ]
    out = run_dir / f"probe_{modality}"
    out.mkdir()
    (out / "probe.json").write_text(
        json.dumps({"results": rows, "best": max(rows, key=lambda r: r["top1"])})
    )


def test_the_page_compares_the_joint_probe_with_both_single_runs(tmp_path):
    tool = tool_module
    assert tool.modality_steps(1000) == {"image": 570, "video": 300, "audio": 130}
    work = tmp_path / "work"
    for modality, base in (("image", 0.8), ("video", 0.6), ("audio", 0.4)):
        fake_run(work / "joint", {1: base, 2: base + 0.05, 3: base, 4: base - 0.1}, modality)
        fake_run(work / f"{modality}_1000", {1: base + 0.1, 2: base, 3: base, 4: base}, modality)
    fake_run(
        work / "image_570", {1: 0.7, 2: 0.75, 3: 0.7, 4: 0.7}, "image"
    )  # video_300 and audio_130 not run
    out = tmp_path / "joint.md"
    tool.main(["--steps", "1000", "--work", str(work), "--out", str(out), "--report-only"])
    page = out.read_text()
    assert (
        "| image: handwritten digit images (16x16) | 85.0% (layer 2) | 90.0% "
        "(layer 1) | 75.0% (layer 2) |" in page
    )
    assert (
        "| audio: spoken digits (1 s at 8 kHz) | 45.0% (layer 2) | 50.0% (layer 1) | not run |"
        in page
    )
    assert "| video | 60.0 / 70.0 | 65.0 / 60.0 | 60.0 / 60.0 | 50.0 / 60.0 |" in page
    assert (
        "- image: joint 85.0% vs 90.0% for its own model at equal steps (-5.0 points) and 75.0% at "
        "equal image steps (+10.0 points)." in page
    )
    assert "Not run: video_digits (300 steps); audio_digits (130 steps)." in page
    assert (
        "single-modality model's on every modality; given the same total steps, on 0 of 1." in page
    )  # image only
    saved = json.loads(out.with_suffix(".json").read_text())
    assert (
        saved["results"]["video"]["joint"]["best"] == 0.65
        and saved["results"]["image"]["joint"]["steps"] == 1000
    )
