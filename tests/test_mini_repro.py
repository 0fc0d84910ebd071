"""The miniature reproduction's runner (``benchmarks/mini/repro.py``) is wired end to end: tiny training runs
through the trainer (with a dependency: the two-stage baseline distills the ControlNet run), resume after an
interruption, and the evaluation writes the metrics JSON and a grid. Real photos, the committed base, CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "mini"))

import repro  # noqa: E402

TINY = ["--steps", "2", "--batch_size", "2", "--save_every", "1", "--train_crops", "8", "--test_crops", "3",
        "--jobs", "2", "--threads", "1", "--eval_batch", "2", "--tasks", "sr"]


def test_run_table_shares_one_budget_seeds_the_headline_rows_and_orders_dependencies():
    runs = repro.run_table(["sr", "inpaint", "gray"])
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names))
    for run in runs:
        if run.get("needs"):
            assert names.index(run["needs"]) < names.index(run["name"])
            assert run["needs"] == repro.run_name(run["task"], "controlnet", run["seed"])
        # only the method's own flags differ: budget, adapter and optimiser come from COMMON / the CLI
        assert not {"--max_train_steps", "--train_batch_size", "--learning_rate", "--adapter_type"} & set(run["flags"])
    seeds = {(r["task"], r["method"]): sorted(x["seed"] for x in runs if (x["task"], x["method"]) ==
                                              (r["task"], r["method"])) for r in runs}
    # every task's most compared rows (ControlNet, PE-CoDi) have three seeds; off SR the other methods have seed 0
    for task in ("sr", "inpaint", "gray"):
        assert seeds[(task, "pe_codi")] == seeds[(task, "controlnet")] == [0, 1, 2]
    assert seeds[("sr", "codi_lora")] == [0, 1, 2] and seeds[("gray", "codi_lora")] == [0]
    assert seeds[("gray", "two_stage")] == seeds[("inpaint", "two_stage")] == [0]
    # seed by seed: every method's seed 0 before any seed 1, so a stopped benchmark has whole rows
    sr_order = [(r["seed"], r["method"]) for r in runs if r["task"] == "sr" and r["method"] != "ablation"]
    assert sr_order.index((0, "codi_lora")) < sr_order.index((1, "controlnet"))
    ablations = [r for r in runs if r["method"] == "ablation" and not r.get("of")]
    assert len(ablations) == sum(repro.ABLATION_SEEDS.get(key, 1) for key in repro.ABLATIONS)
    # seed 0 keeps the ledger's name; the extra seeds of an ablation train with their own --seed
    assert [(r["name"], r["seed"]) for r in ablations if "eps-space" in r["label"]] == [
        ("sr_ablation_eps_space", 0), ("sr_ablation_eps_space_seed1", 1), ("sr_ablation_eps_space_seed2", 2)]
    # the EMA check: per task, PE-CoDi seed 0's raw weights, sampled only, after that run's training
    checks = [r for r in runs if r.get("of")]
    assert [(r["task"], r["of"]) for r in checks] == [(t, f"{t}_pe_codi_seed0") for t in ("sr", "inpaint", "gray")]
    assert all(r["train"] is False and names.index(r["of"]) < names.index(r["name"]) for r in checks)
    plans = repro.sampling_plans("sr", runs)
    main = [p for p in plans if p["table"] == "main"]
    assert [p["steps"] for p in main if p["run"] == "sr_controlnet_seed0"] == [50, 8, 4, 2, 1]
    assert [p["steps"] for p in main if p["run"] == "sr_controlnet_seed1"] == [50, 4]
    assert {p["start"] for p in plans if p["table"] == "supplementary"} == {1.0, 0.5}
    # eps-space consistency (it could move a default) is sampled at the product's step counts, the others at 4
    ablation_steps = {(p["run"], p["steps"]) for p in plans if p["table"] == "ablations"}
    assert {n for run, n in ablation_steps if run == "sr_ablation_eps_space_seed2"} == {1, 2, 4}
    assert {n for run, n in ablation_steps if run == "sr_ablation_grid_20"} == {4}
    # a ledger entry of that run sampled at 4 steps only stays in the tables but is trained and scored again
    eps = next(r for r in runs if r["name"] == "sr_ablation_eps_space")
    assert repro.unsampled_steps({"rows": [{"steps": 4, "plan_steps": 4}]}, eps) == [1, 2]
    assert repro.unsampled_steps({"rows": [{"steps": n} for n in (1, 2, 4)]}, eps) == []
    # lanes take the two-stage training right after its ControlNet's, before that ControlNet's scoring
    chosen = [r for r in runs if r["name"] in {"sr_controlnet_seed0", "sr_pe_codi_seed0", "sr_two_stage_seed0"}]
    order = [(kind, run["name"]) for kind, run in repro.task_order(chosen, "all")]
    assert order == [("train", "sr_controlnet_seed0"), ("train", "sr_two_stage_seed0"),
                     ("score", "sr_controlnet_seed0"), ("score", "sr_two_stage_seed0"),
                     ("train", "sr_pe_codi_seed0"), ("score", "sr_pe_codi_seed0")]
    assert [k for k, _ in repro.task_order(chosen, "eval")] == ["score"] * 3
    quick = repro.run_table(["sr"], quick=True)
    assert {r["method"] for r in quick} == {"controlnet", "pe_codi", "codi_lora", "two_stage", "base"}
    assert [r["name"] for r in quick if not r.get("train", True)] == ["sr_base_alone"]  # sampled, never trained
    assert {r["seed"] for r in quick} == {0}


def test_verdicts_take_the_seed_spread_into_account():
    def entry(method, steps, psnrs, fds):
        return {"method": method, "steps": steps, "table": "main",
                "psnr": (sum(psnrs) / len(psnrs), repro.std(psnrs), len(psnrs), dict(enumerate(psnrs))),
                "fd_patch": (sum(fds) / len(fds), repro.std(fds), len(fds), dict(enumerate(fds)))}

    entries = [entry("ControlNet (DDIM)", 50, [20.0, 20.4, 19.6], [10, 11, 12]),
               entry("ControlNet (DDIM)", 4, [17.0, 17.2, 16.8], [20, 21, 22]),
               entry("PE-CoDi", 4, [19.8, 20.3, 19.4], [11, 12, 13]),
               entry("Two-stage (ControlNet + LCM)", 4, [19.7, 20.2, 19.5], [12, 11, 13])]
    checks = {c["claim"]: c["verdict"] for c in repro.verdicts(entries, "sr")}
    assert checks["PE-CoDi at 4 steps within 0.5 dB of ControlNet at 50"] == "holds"
    assert checks["PE-CoDi at 4 steps better than ControlNet at 4"] == "holds"
    assert checks["PE-CoDi at 4 steps better than the two-stage baseline at 4"] == "not shown (within the spread)"
    assert repro.compare(entries[1], entries[2])["verdict"] == "worse"
    # PSNR and FD-patch disagreeing is neither "holds" nor "opposite"
    entries[3] = entry("Two-stage (ControlNet + LCM)", 4, [17.7, 18.2, 17.5], [5, 6, 5])
    checks = {c["claim"]: c["verdict"] for c in repro.verdicts(entries, "sr")}
    assert checks["PE-CoDi at 4 steps better than the two-stage baseline at 4"] == "mixed: PSNR better, FD-patch worse"
    entries[2] = entry("PE-CoDi", 4, [19.8, 20.3, 19.4], [31, 32, 33])  # PSNR close to ControlNet-50, FD far worse
    checks = {c["claim"]: c["verdict"] for c in repro.verdicts(entries, "sr")}
    assert checks["PE-CoDi at 4 steps within 0.5 dB of ControlNet at 50"] == "mixed: PSNR within 0.5 dB, FD-patch worse"


def test_an_ablation_at_the_reference_seeds_is_compared_seed_by_seed():
    def rows(method, table, psnrs, fds):
        return [{"method": method, "table": table, "steps": 4, "nfe": 4, "seconds_per_image": 0.1, "seed": seed,
                 "psnr": p, "fd_patch": f} for seed, (p, f) in enumerate(zip(psnrs, fds))]

    # the seeds disagree by more than the variant's gain, but the variant gains at every one of them
    reference = rows("PE-CoDi", "main", [16.0, 15.0, 15.6], [35.0, 52.0, 40.0])
    variant = rows("ablation: eps-space consistency", "ablations", [16.5, 15.3, 15.9], [30.0, 44.0, 33.0])
    single = rows("ablation: lambda = 0.1", "ablations", [16.5], [30.0])
    entries = repro.aggregate(reference + variant + single)
    assert repro.compare(entries[1], entries[0])["verdict"] == "tie"  # unpaired: within the seeds' spread
    checks = {a["ablation"]: a for a in repro.ablation_verdicts(entries, "sr")}
    eps = checks["eps-space consistency"]
    assert eps["psnr"]["paired_seeds"] == [0, 1, 2]
    assert eps["psnr"]["verdict"] == "better" and eps["fd_patch"]["verdict"] == "better"
    assert abs(eps["psnr"]["difference"] - 0.3667) < 1e-3 and abs(eps["fd_patch"]["difference"] - 6.6667) < 1e-3
    # one seed: set against the reference's same seed (+0.5 dB, not +0.97 against the mean of a lucky seed 0 and
    # two worse ones), with the error of one seed against one
    single = checks["lambda = 0.1"]["psnr"]
    assert single["paired_seeds"] == [0] and abs(single["difference"] - 0.5) < 1e-9
    assert abs(single["standard_error"] - math.sqrt(2) * repro.std([16.0, 15.0, 15.6])) < 1e-9
    assert single["verdict"] == "tie"
    # a variant that gains at two seeds and loses at the third is not called
    entries = repro.aggregate(reference + rows("ablation: eps-space consistency", "ablations", [16.5, 14.0, 15.9],
                                               [30.0, 44.0, 33.0]))
    assert repro.ablation_verdicts(entries, "sr")[0]["psnr"]["verdict"] == "tie"


def test_inpainting_is_judged_on_the_hole_with_the_known_pixels_pasted_back():
    import torch
    from types import SimpleNamespace

    import features

    net = features.load_feature_net(REPO / "benchmarks" / "mini" / "featnet" / "feature_net.safetensors")
    generator = torch.Generator().manual_seed(0)
    targets = torch.rand((24, 3, 64, 64), generator=generator)
    hole = torch.zeros((1, 64, 64))
    hole[:, 16:48, 16:48] = 1
    pairs = [SimpleNamespace(target=t, hint=torch.where(hole.bool(), -1.0, t), mask=None) for t in targets]
    # right inside the hole, wrong everywhere else: only the composite sees it as (nearly) the target
    outputs = [torch.where(hole.bool(), t, 1 - t) for t in targets]
    scores = repro.score(outputs, pairs, "inpaint", net)
    assert scores["masked_psnr"] > 60 and scores["psnr"] < 15
    assert scores["fd_patch_composite"] < 1e-3 < scores["fd_patch"]

    def entry(method, steps, masked, fd, pasted):
        row = {"method": method, "steps": steps, "table": "main", "psnr": (14.0, 0.0, 1, {0: 14.0})}
        for key, value in (("masked_psnr", masked), ("fd_patch", fd), ("fd_patch_composite", pasted)):
            row[key] = (value, 0.0, 1, {0: value})
        return row

    entries = [entry("ControlNet (DDIM)", 50, 13.0, 50.0, 10.0), entry("ControlNet (DDIM)", 4, 12.0, 60.0, 12.0),
               entry("PE-CoDi", 4, 12.9, 40.0, 14.0)]
    checks = {c["claim"]: c for c in repro.verdicts(entries, "inpaint")}
    within = checks["PE-CoDi at 4 steps within 0.5 dB of ControlNet at 50"]
    assert within["metrics"] == ["masked_psnr", "fd_patch_composite"]
    assert within["verdict"] == "mixed: PSNR within 0.5 dB, FD-patch worse"  # 14 vs 10 pasted, not 40 vs 50 raw
    assert repro.claim_metrics(entries, "sr") == ("psnr", "fd_patch")


def test_repro_trains_resumes_scores_into_the_ledger_and_skips_what_it_holds(tmp_path):
    import torch

    work, results = tmp_path / "work", tmp_path / "results"
    args = [*TINY, "--work", str(work), "--results", str(results)]
    only = ["--only", "sr_controlnet_seed0,sr_two_stage_seed0"]
    assert repro.main([*args, "--phase", "train", *only]) == 0
    done = json.loads((work / "runs" / "sr_two_stage_seed0" / "done.json").read_text())
    assert "--teacher_adapter" in done["flags"] and done["steps"] == 2
    # an interrupted run resumes from its last complete state: drop the final files, keep the step-1 state
    run_dir = work / "runs" / "sr_controlnet_seed0"
    (run_dir / "done.json").unlink()
    (run_dir / "sr_controlnet_seed0.safetensors").unlink()
    assert repro.main([*args, "--phase", "train", "--only", "sr_controlnet_seed0"]) == 0
    record = json.loads((run_dir / "done.json").read_text())
    assert record["resumed"] and "--resume" in record["command"]
    assert record["steps_this_call"] == 1 and record["seconds_per_step"] > 0  # timed over the resumed part only
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert str(REPO) not in json.dumps(record)  # no machine-specific path in what gets committed

    # scoring: every trained run (and the sampling-only base run) in its own process, into the ledger
    assert repro.main([*args, "--phase", "eval"]) == 0
    ledger = results / "mini_repro_runs"
    assert {p.name for p in ledger.glob("*.json")} == {"sr_controlnet_seed0.json", "sr_two_stage_seed0.json",
                                                       "sr_base_alone.json"}
    metrics = json.loads((results / "mini_repro_metrics.json").read_text())
    rows = metrics["tasks"]["sr"]["rows"]
    methods = [(r["method"], r["steps"]) for r in rows if r["table"] == "main"]
    # the paper's order, whatever order the runs were scored in
    assert methods == [("bicubic", 0), *(("ControlNet (DDIM)", n) for n in (50, 8, 4, 2, 1)),
                       ("Two-stage (ControlNet + LCM)", 4)]
    assert "sr_pe_codi_seed0" in metrics["missing"]  # not trained here: listed, not invented
    supplementary = [r for r in rows if r["table"] == "supplementary"]
    assert {r["start_strength"] for r in supplementary} == {1.0, 0.5}
    assert {r["nfe"] for r in supplementary} == {4, 2}  # strength 0.5 keeps the last 2 of the 4 steps
    assert {r["method"].split(": ")[1] for r in supplementary} == {"base alone", "ControlNet (DDIM)"}
    for row in rows:
        assert row["psnr"] > 5 and 0 < row["ssim"] <= 1 and row["fd_patch"] >= 0
        assert len(row["colour_corr"]) == 3 and -1 <= row["colour_corr_min"] <= 1
    assert {r["nfe"] for r in rows if r["method"] == "ControlNet (DDIM)"} == {50, 8, 4, 2, 1}
    grid_png = results / "mini_repro_sr.png"
    assert grid_png.stat().st_size > 1000
    tables = (results / "mini_repro_tables.md").read_text()
    assert "| 50 | ControlNet (DDIM) | 1 |" in tables and "sampling from alpha * bicubic" in tables
    assert str(REPO) not in (results / "mini_repro_metrics.json").read_text()
    assert str(REPO) not in (ledger / "sr_controlnet_seed0.json").read_text()

    # the ledger outlives the work folder: a new session with none trains nothing already scored, and assembles
    # the same tables and grid from the ledger alone
    grid_before = grid_png.read_bytes()
    fresh = [*TINY, "--work", str(tmp_path / "fresh"), "--results", str(results)]
    assert repro.main([*fresh, *only]) == 0
    assert not (tmp_path / "fresh" / "runs").exists()
    assert json.loads((results / "mini_repro_metrics.json").read_text())["tasks"]["sr"]["rows"] == rows
    assert grid_png.read_bytes() == grid_before
    # ...but entries made under other settings are not reused
    other = [*fresh, "--steps", "1", "--results", str(results)]
    assert repro.main([*other, "--phase", "tables"]) == 0
    assert "sr_controlnet_seed0" in json.loads((results / "mini_repro_metrics.json").read_text())["missing"]
    # a two-stage run whose ControlNet came from the ledger trains that ControlNet again first
    (ledger / "sr_two_stage_seed0.json").unlink()
    assert repro.main([*fresh, *only]) == 0
    assert (tmp_path / "fresh" / "runs" / "sr_controlnet_seed0" / "done.json").is_file()
    assert (ledger / "sr_two_stage_seed0.json").is_file()

    # the EMA check samples the raw weights of a run's final training state (not the saved EMA adapter), once that
    # run is trained
    from safetensors.torch import load_file

    assert repro.main([*fresh, "--only", "sr_pe_codi_seed0_no_ema,sr_pe_codi_seed0"]) == 0
    check = json.loads((ledger / "sr_pe_codi_seed0_no_ema.json").read_text())
    assert [(r["method"], r["steps"], r["table"]) for r in check["rows"]] == [
        (f"ablation: {repro.NO_EMA_LABEL}", 4, "ablations")]
    _, raw = repro.load_run(tmp_path / "fresh", "sr_pe_codi_seed0", raw=True)
    _, ema = repro.load_run(tmp_path / "fresh", "sr_pe_codi_seed0")
    state = load_file(str(repro.raw_weights_path(tmp_path / "fresh", "sr_pe_codi_seed0")))
    raw_weights, ema_weights = dict(raw.trainable_named_parameters()), dict(ema.trainable_named_parameters())
    assert all(torch.equal(p, state[f"adapter.{n}"]) for n, p in raw_weights.items())
    assert any(not torch.equal(p, ema_weights[n]) for n, p in raw_weights.items())
    tables = (results / "mini_repro_tables.md").read_text()
    assert "#### 4x super-resolution: ablations against PE-CoDi" in tables and repro.NO_EMA_LABEL in tables


def test_colour_statistics_split_the_error_and_find_where_the_colour_comes_from():
    import torch

    g = torch.Generator().manual_seed(0)
    targets = torch.rand((16, 3, 8, 8), generator=g)
    noises = torch.randn((16, 3, 8, 8), generator=g)
    # outputs = the target's structure with the *noise's* mean colour: all of the colour error, none of the rest
    offset = noises.mean(dim=(2, 3), keepdim=True) - targets.mean(dim=(2, 3), keepdim=True)
    stats = repro.colour_statistics(targets + offset, targets, noises)
    assert stats["rest_mse"] == pytest.approx(0, abs=1e-6) and stats["colour_share"] == pytest.approx(1, abs=1e-5)
    assert stats["corr_with_noise_mean"] == pytest.approx(1, abs=1e-5)
    # the target shifted by 0.1: all of the error (0.1^2) is colour, and the colour follows the target's, not the
    # noise's
    exact = repro.colour_statistics(targets.clone() + 0.1, targets, noises)
    assert exact["corr_with_target_mean"] == pytest.approx(1, abs=1e-5)
    assert exact["colour_share"] == pytest.approx(1, abs=1e-5) and exact["mse"] == pytest.approx(0.01, rel=1e-4)
    assert abs(exact["corr_with_noise_mean"]) < 0.6
