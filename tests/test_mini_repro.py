"""The miniature reproduction's runner (``benchmarks/mini/repro.py``) is wired end to end: tiny training runs
through the trainer (with a dependency: the two-stage baseline distills the ControlNet run), resume after an
interruption, and the evaluation writes the metrics JSON and a grid. Real photos, the committed base, CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "mini"))

import repro  # noqa: E402

TINY = ["--steps", "2", "--batch_size", "2", "--save_every", "1", "--train_crops", "8", "--test_crops", "3",
        "--jobs", "2", "--threads", "1", "--eval_batch", "2", "--tasks", "sr"]


def test_run_table_shares_one_budget_and_orders_dependencies():
    runs = repro.run_table(["sr", "inpaint"])
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names)) == 11
    for run in runs:
        if run.get("needs"):
            assert names.index(run["needs"]) < names.index(run["name"])
        # only the method's own flags differ: budget, adapter and optimiser come from COMMON / the CLI
        assert not {"--max_train_steps", "--train_batch_size", "--learning_rate", "--adapter_type"} & set(run["flags"])
    plans = repro.sampling_plans("sr")
    main = [p for p in plans if p.get("table", "main") == "main"]
    assert [p["steps"] for p in main if p["run"] == "sr_controlnet"] == [50, 8, 4, 2, 1]
    assert all(p["run"] is None or p["run"] in names for p in plans)


def test_repro_trains_resumes_and_evaluates(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    args = [*TINY, "--work", str(work), "--results", str(results)]
    only = ["--only", "sr_controlnet,sr_two_stage"]
    assert repro.main([*args, "--phase", "train", *only]) == 0
    done = json.loads((work / "runs" / "sr_two_stage" / "done.json").read_text())
    assert "--teacher_adapter" in done["flags"] and done["steps"] == 2
    # an interrupted run resumes from its last complete state: drop the final files, keep the step-1 state
    run_dir = work / "runs" / "sr_controlnet"
    (run_dir / "done.json").unlink()
    (run_dir / "sr_controlnet.safetensors").unlink()
    assert repro.main([*args, "--phase", "train", "--only", "sr_controlnet"]) == 0
    record = json.loads((run_dir / "done.json").read_text())
    assert record["resumed"] and "--resume" in record["command"]
    assert record["steps_this_call"] == 1 and record["seconds_per_step"] > 0  # timed over the resumed part only
    assert "resumed from" in (run_dir / "train.log").read_text()

    assert repro.main([*args, "--phase", "eval"]) == 0
    metrics = json.loads((results / "mini_repro_metrics.json").read_text())
    rows = metrics["tasks"]["sr"]["rows"]
    methods = {(r["method"], r["steps"]) for r in rows}
    assert ("bicubic", 0) in methods and ("ControlNet (DDIM)", 50) in methods
    assert ("Two-stage (ControlNet + LCM)", 4) in methods
    assert not any(r["method"] == "PE-CoDi" for r in rows)  # not trained here: skipped, not invented
    supplementary = {r["method"]: r for r in rows if r["table"] == "supplementary"}
    assert set(supplementary) == {"img2img from bicubic: base alone", "img2img from bicubic: ControlNet"}
    assert all(r["nfe"] == r["steps"] == 4 for r in supplementary.values())  # t = 420, 280, 140, 0
    for row in rows:
        assert row["psnr"] > 5 and 0 < row["ssim"] <= 1 and row["fd_patch"] >= 0
    assert {r["nfe"] for r in rows if r["method"] == "ControlNet (DDIM)"} == {50, 8, 4, 2, 1}
    assert (results / "mini_repro_sr.png").stat().st_size > 1000
    diag = metrics["tasks"]["sr"]["denoising_accuracy"]
    assert set(diag) == {"base alone", "sr_controlnet", "sr_two_stage"}
    assert diag["base alone"]["x0_psnr_t20"] > diag["base alone"]["x0_psnr_t980"]  # accurate at low noise only
    tables = (results / "mini_repro_tables.md").read_text()
    assert "| 50 | ControlNet (DDIM) |" in tables and "supplementary: img2img" in tables
    with pytest.raises(SystemExit, match="needs"):
        repro.main([*args, "--phase", "train", "--only", "sr_two_stage", "--work", str(tmp_path / "empty")])


def test_colour_probe_splits_the_error_and_finds_where_the_colour_comes_from():
    import colour_probe
    import torch

    g = torch.Generator().manual_seed(0)
    targets = torch.rand((16, 3, 8, 8), generator=g)
    noises = torch.randn((16, 3, 8, 8), generator=g)
    # outputs = the target's structure with the *noise's* mean colour: all of the colour error, none of the rest
    offset = noises.mean(dim=(2, 3), keepdim=True) - targets.mean(dim=(2, 3), keepdim=True)
    stats = colour_probe.colour_statistics(targets + offset, targets, noises)
    assert stats["rest_mse"] == pytest.approx(0, abs=1e-6) and stats["colour_share"] == pytest.approx(1, abs=1e-5)
    assert stats["corr_with_noise_mean"] == pytest.approx(1, abs=1e-5)
    # the target shifted by 0.1: all of the error (0.1^2) is colour, and the colour follows the target's, not the
    # noise's
    exact = colour_probe.colour_statistics(targets.clone() + 0.1, targets, noises)
    assert exact["corr_with_target_mean"] == pytest.approx(1, abs=1e-5)
    assert exact["colour_share"] == pytest.approx(1, abs=1e-5) and exact["mse"] == pytest.approx(0.01, rel=1e-4)
    assert abs(exact["corr_with_noise_mean"]) < 0.6
