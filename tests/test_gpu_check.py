"""``benchmarks/gpu_check.py`` is ready for a GPU machine: its plumbing runs on the CPU with ``--smoke`` (micro
models, a few steps), both parts, and writes the JSON and the Markdown report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import pytest  # noqa: E402


# the whole check in miniature on the CPU: ~6 min on an idle slow 2-core machine, over the default 900 s limit when
# benchmark jobs share the cores
@pytest.mark.timeout(1800)
def test_gpu_check_smoke_writes_every_number(tmp_path, monkeypatch, comfyui_dir):
    monkeypatch.setattr(gpu_check, "WORK", tmp_path / "work")
    assert gpu_check.main(["--part", "train", "--smoke", "--results", str(tmp_path)]) == 0
    train = json.loads((tmp_path / "gpu_check_train.json").read_text())
    assert [r["name"] for r in train["training"]] == ["sd15_controlnet", "sd15_control_lora", "sdxl_control_lora"]
    for row in train["training"]:
        assert row["predicted_gib"] > 0 and row["peak_gib"] > 0 and row["seconds_per_step"] > 0
        assert row["trainable"] > 0
    assert {r["precision"] for r in train["precision_paths"]} == {"bf16", "fp16"}
    for row in train["precision_paths"]:
        assert row["finished"] and row["adapter_finite"] and row["samples"]
    assert gpu_check.main(["--part", "comfyui", "--smoke", "--reps", "1", "--results", str(tmp_path)]) == 0
    comfy = json.loads((tmp_path / "gpu_check_comfyui.json").read_text())["comfyui"]
    assert comfy["ratios"] and comfy["nfe"]["codi_sr_4"] == [4] and comfy["nfe"]["stock_cn_euler_50"] == [50]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "## Part `train` (smoke" in report and "## Part `comfyui` (smoke" in report and "sd15_controlnet" in report
