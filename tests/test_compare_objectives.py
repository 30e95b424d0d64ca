"""tools.compare_objectives: the three objectives' table, plot and JSON from their runs' files; a
clean skip where the data is absent (the runs are plain selfflow-train / -probe / -sample
commands, tested elsewhere)."""

import json

from PIL import Image

from tools import compare_objectives as tool


def fake_run(run_dir, probe, fid, rates):
    (run_dir / "probe").mkdir(parents=True)
    results = [{"layer": k, "top1": v} for k, v in probe.items()]
    best = max(results, key=lambda r: r["top1"])
    (run_dir / "probe" / "probe.json").write_text(json.dumps({"results": results, "best": best}))
    (run_dir / "fid").mkdir()
    (run_dir / "fid" / "metrics.json").write_text(json.dumps({"fid": fid}))
    rows = ["step,train/loss_flow,train/samples_per_s"]
    rows += [f"{i},{1.0 - i / 10},{r}" for i, r in enumerate(rates)]
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "wall_seconds.txt").write_text("12.5")
    return run_dir


def test_table_plot_and_numbers_from_the_runs(tmp_path):
    results = {
        name: tool.read_run(fake_run(tmp_path / name, probe, fid, [64.0, 32.0, 64.0]), 32)
        for name, probe, fid in (
            ("selfflow", {1: 0.3, 2: 0.4}, 80.0),
            ("repa", {1: 0.35, 2: 0.38}, 82.5),
            ("vanilla", {1: 0.25, 2: 0.3}, 90.0),
        )
    }
    assert results["repa"]["best_layer"] == 2 and results["selfflow"]["fid"] == 80.0
    assert results["vanilla"]["seconds_per_step"] == 0.5  # 32 samples at the median 64 samples/s
    assert results["vanilla"]["final_loss_flow"] == 0.8
    table = tool.markdown(results).splitlines()
    assert table[0].startswith("| objective | probe L1 | probe L2 | best | FID")
    assert table[3].startswith("| REPA | 35.0% | 38.0% | 38.0% (L2) | 82.5 | 0.8000 | 0.500 |")
    png = tool.plot(results, tmp_path / "probe.png")
    assert Image.open(png).size[0] > 100
    settings = vars(tool.parse(["--encoder", "DIR", "--steps", "60", "--note", "A stand-in."]))
    section = tool.results_section(
        {"settings": settings, "results": results, "seconds": 90}, "p.png"
    )
    assert "60 steps of batch 32" in section and "| REPA | 35.0%" in section
    assert "> A stand-in." in section
    assert section.endswith("![probe accuracy by layer](p.png)\n<!-- end compare_objectives -->")


def test_absent_data_is_skipped_cleanly(tmp_path, capsys):
    assert tool.main(["--encoder", str(tmp_path), "--data-root", str(tmp_path / "none")]) == {}
    assert "skipped" in capsys.readouterr().out


def test_the_results_section_replaces_its_earlier_version_and_survives_reproduce(tmp_path):
    from tools.reproduce import kept_sections

    page = tmp_path / "results.md"
    page.write_text("# Results\n\nother text\n")
    for marker in ("first", "second"):
        section = f"<!-- begin {tool.SECTION} -->\n{marker}\n<!-- end {tool.SECTION} -->"
        tool.write_section(page, section)
    text = page.read_text()
    assert text.count("begin compare_objectives") == 1 and "second" in text and "first" not in text
    assert "other text" in text
    assert "second" in kept_sections(page)
