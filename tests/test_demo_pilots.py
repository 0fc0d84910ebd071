"""``benchmarks/mini/demo_pilots.py``: the demo's recipe plus trainer flags, trained chunk by chunk (each resumed from
the last one's state) and scored like the demo; results merged into a JSON and a table. Tiny settings, CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "mini"))

import demo  # noqa: E402
import demo_pilots  # noqa: E402


def test_pilot_trains_in_chunks_scores_and_resumes(tmp_path, capsys):
    work, results = tmp_path / "pilot", tmp_path / "results"
    results.mkdir()
    argv = ["--work", str(work), "--chunk", "1", "--train_crops", "16", "--test_crops", "2", "--results",
            str(results), "--label", "lambda = 3", "--flags=--guidance_weight 3"]
    assert demo_pilots.main([*argv, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "training to step 1" in printed and f"training to step 2 from {demo.OUTPUT_NAME}-step00000001-state" \
        in printed
    with safe_open(str(work / f"{demo.OUTPUT_NAME}-step00000002.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "2"
    state = json.loads((work / f"{demo.OUTPUT_NAME}-step00000002-state" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["identity"]["guidance_weight"] == 3.0  # the pilot's flag reached the trainer

    # extended: the scored chunks are kept, only step 3 is trained (from step 2's state)
    assert demo_pilots.main([*argv, "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "training to step 1" not in printed and "training to step 2" not in printed
    assert f"training to step 3 from {demo.OUTPUT_NAME}-step00000002-state" in printed

    pilots = json.loads((results / "mini_demo_pilots.json").read_text())
    pilot = pilots["lambda = 3"]
    assert pilot["flags"] == ["--guidance_weight", "3"] and [c["steps"] for c in pilot["chunks"]] == [1, 2, 3]
    scores = pilot["chunks"][2]["scores"]
    assert set(scores) == {"bicubic", "CoDi 1 step", "CoDi 2 steps", "CoDi 4 steps", "CoDi 4, bicubic start 0.5"}
    # the bicubic baseline does not depend on the adapter; the CoDi rows do
    assert scores["bicubic"] == pilot["chunks"][0]["scores"]["bicubic"]
    assert scores["CoDi 4 steps"]["psnr"] != pilot["chunks"][0]["scores"]["CoDi 4 steps"]["psnr"]
    table = (results / "mini_demo_pilots.md").read_text()
    assert table.count("| lambda = 3 | `--guidance_weight 3` |") == 3
