"""``make demo`` (``benchmarks/mini/demo.py``): a 4x SR adapter distilled from the committed mini base on the
bundled photos, with the grid, plot and metrics; an interrupted demo resumes from its last state, a finished one only
rewrites the report. Tiny settings (2 steps, 16 training crops, 2 test crops), CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "mini"))

import demo  # noqa: E402

TINY = ["--steps", "2", "--train_crops", "16", "--test_crops", "2", "--save_every", "1"]


def test_demo_trains_reports_resumes_and_skips(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    argv = ["--out", str(out), *TINY]
    adapter = out / f"{demo.OUTPUT_NAME}.safetensors"

    # 1. interrupted: the loss turns non-finite at step 2, after the step-1 state was saved
    monkeypatch.setenv("CODI_DEBUG_NAN_AT_STEP", "2")
    assert demo.main(argv) == 3
    assert not adapter.exists()
    from trainer.training.state import latest_step_state

    assert latest_step_state(out, demo.OUTPUT_NAME).name == f"{demo.OUTPUT_NAME}-step00000001-state"
    assert len(list((out / "data" / "train").glob("*.png"))) == 16
    assert len(list((out / "data" / "test").glob("*.png"))) == 2
    capsys.readouterr()

    # 2. rerun: continues from that state and finishes
    monkeypatch.delenv("CODI_DEBUG_NAN_AT_STEP")
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {demo.OUTPUT_NAME}-step00000001-state" in printed
    assert "resumed from" in printed and "CoDi 4 steps" in printed and "bicubic" in printed
    with safe_open(str(adapter), "pt") as fh:
        metadata = fh.metadata()
        assert "input_hint_block.0.weight" in fh.keys()
    assert metadata["codi.task"] == "sr" and metadata["ss_steps"] == "2"
    assert metadata["modelspec.architecture"] == "codi-mini-pixel-v2/codi-controlnet"
    assert metadata["codi.zero_terminal_snr"] == "true"
    assert not list(out.glob(f"{demo.OUTPUT_NAME}-step*")) and not list(out.glob("*-last-good*"))

    grid = Image.open(out / "grid.png")
    # 7 columns (low-res | bicubic | CoDi 1, 2, 4 | CoDi 4 bicubic start | ground truth) of 128-px cells (64 px x2)
    # with 2-px gaps; a 16-px header over 2 rows
    assert grid.size == (7 * 128 + 6 * 2, 16 + 2 * 128 + 2)
    assert Image.open(out / "quality_vs_steps.png").size[0] > 200
    assert (out / "report.md").read_text().count("low-res input | bicubic | CoDi 1 step") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    psnr = {row["method"]: row["psnr"] for row in metrics["rows"]}
    start = "CoDi 4, bicubic start 0.5"
    assert set(psnr) == {"bicubic", "CoDi 1 step", "CoDi 2 steps", "CoDi 4 steps", start}
    assert all(math.isfinite(v) and v > 0 for v in psnr.values())
    assert next(r for r in metrics["rows"] if r["method"] == start)["timesteps"] == [460, 200]
    scores = metrics["settings"]["fd_patch_and_colour"]
    assert set(scores) == set(psnr) and all(math.isfinite(v["fd_patch"]) for v in scores.values())
    assert f"| {start} |" in (out / "report.md").read_text() and "FD-patch" in printed
    assert metrics["settings"]["demo"]["resumed_from"] == f"{demo.OUTPUT_NAME}-step00000001-state"
    assert metrics["pairs"] == ["00000", "00001"]

    # 3. finished: the adapter is kept, only the report is written again
    stamp = adapter.stat().st_mtime_ns
    (out / "grid.png").unlink()
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipping training" in printed and "codi: done" not in printed
    assert adapter.stat().st_mtime_ns == stamp and (out / "grid.png").is_file()
