#!/usr/bin/env python
"""Pilots for miniature v2: which base design lets a plain ControlNet follow the condition's colours?

    .venv/bin/python benchmarks/mini/pilots.py                  # every pilot (resumable; ~3 h on one CPU thread)
    .venv/bin/python benchmarks/mini/pilots.py --only v_sd      # one pilot

The v1 miniature (``benchmarks/mini/base``: epsilon prediction on Stable Diffusion's schedule, pixels in [-1, 1])
failed in a way that hides every claim of the paper: each output's mean colour follows the starting noise, not the
low-res input, for every method including a ControlNet sampled with 50 DDIM steps. Each pilot changes one design
choice, then asks the question the v2 base must answer with yes: **does a ControlNet trained with the plain
diffusion loss, sampled with 50 DDIM steps, take its colours from the condition?**

    eps_sd         the v1 base unchanged (the reference), ControlNet at the repro budget (900 steps x 8)
    eps_sd_long    the v1 base, ControlNet at 3x that budget: is it just too little training?
    eps_unitvar    v1 fine-tuned with the data scaled to unit variance (x 2, as SD's latent scaling factor does)
    v_sd           v1 fine-tuned to v-prediction, SD's schedule
    v_zsnr         v1 fine-tuned to v-prediction on the zero-terminal-SNR schedule (Lin et al.)

A fine-tuned base starts from the v1 weights (``pretrain_base.py --init_from``), as Lin et al. fine-tuned SD to
zero terminal SNR and SD 2 was fine-tuned to v-prediction: a few hundred steps move a model to a new
parameterisation, which is what a pilot needs to tell the designs apart. Every ControlNet then trains with the recipe
of ``repro.py`` (same adapter, data, learning rate, seed) and is scored on the first ``--test_crops`` held-out SR
crops: PSNR, SSIM, FD-patch, and the per-channel correlation of each output's mean colour with the target's and with
the starting noise's (``repro.colour_statistics``). Bicubic upsampling is the bar.

Everything is resumable: the bases and ControlNets save their state as they go, a finished pilot keeps its scores in
``<work>/pilots/<name>/scores.json``; the table goes to ``benchmarks/results/mini_pilots.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

import repro  # noqa: E402

PILOTS = {
    "eps_sd": {"base": None, "controlnet_steps": 900,
               "what": "v1 base (epsilon, SD schedule), ControlNet 900 x 8"},
    "eps_sd_long": {"base": None, "controlnet_steps": 2700,
                    "what": "v1 base, ControlNet 2700 x 8 (3x the budget)"},
    "eps_unitvar": {"base": ["--prediction_type", "epsilon", "--data_scale", "2.0"], "controlnet_steps": 900,
                    "what": "v1 fine-tuned: epsilon, data x 2 (unit variance)"},
    "v_sd": {"base": ["--prediction_type", "v_prediction"], "controlnet_steps": 900,
             "what": "v1 fine-tuned: v-prediction, SD schedule"},
    "v_zsnr": {"base": ["--prediction_type", "v_prediction", "--zero_terminal_snr"], "controlnet_steps": 900,
               "what": "v1 fine-tuned: v-prediction, zero terminal SNR"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated pilot names (default: all, in table order)")
    p.add_argument("--work", type=Path, default=HERE / "work")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--base_steps", type=int, default=1200, help="fine-tuning steps of a pilot base (batch 16)")
    p.add_argument("--test_crops", type=int, default=128, help="held-out SR crops scored per pilot")
    p.add_argument("--eval_steps", default="50,4", help="DDIM steps the ControlNet is sampled with")
    p.add_argument("--controlnet_steps", type=int, default=None, help="override every pilot's ControlNet budget")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every phase")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pilot_base(name: str, spec: dict, args) -> Path:
    """The pilot's base bundle: the v1 base itself, or a fine-tune of it (resumed when interrupted)."""
    if spec["base"] is None:
        return repro.BASE
    out = args.work / "pilots" / name / "base"
    log = out / "pretrain_log.json"
    if log.is_file() and json.loads(log.read_text())["steps"] >= args.base_steps:
        return out
    state = out.with_name(out.name + "-state") / "last.pt"
    argv = [sys.executable, str(HERE / "pretrain_base.py"), "--init_from", str(repro.BASE), "--out", str(out),
            "--steps", str(args.base_steps), "--threads", str(args.threads), "--seed", str(args.seed),
            "--warmup_steps", "50", "--no_progress", *spec["base"], *(["--resume"] if state.is_file() else [])]
    print(f"pilots: {name}: fine-tuning the base ({args.base_steps} steps)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "base.log", "a") as fh:
        code = subprocess.run(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).returncode
    if code != 0:
        raise SystemExit(f"pilots: {name}: base fine-tuning failed (exit {code}); see {out.parent / 'base.log'}")
    return out


def pilot_controlnet(name: str, spec: dict, base: Path, args, data: dict) -> Path:
    run = {"name": f"{name}_controlnet", "task": "sr", "flags": ["--loss", "diffusion"], "base": base,
           "steps": args.controlnet_steps or spec["controlnet_steps"],
           "dir": args.work / "pilots" / name / "controlnet"}
    targs = argparse.Namespace(work=args.work, batch_size=repro.BATCH_SIZE, learning_rate=repro.LEARNING_RATE,
                               seed=args.seed, save_every=100, threads=args.threads, steps=run["steps"])
    repro.train_run(run, targs, data)
    return run["dir"] / f"{run['name']}.safetensors"


def score_pilot(name: str, base_path: Path, adapter_path: Path, args, data: dict, feature_net) -> dict:
    import torch

    from trainer.adapters.files import load_adapter
    from trainer.models import load_base_model

    torch.set_num_threads(args.threads)
    pairs = repro.evaluation_pairs("sr", data["test"], args.seed)[:args.test_crops]
    noises = repro.starting_noise(args.seed, range(len(pairs)))
    base = load_base_model(base_path)
    adapter = load_adapter(base, adapter_path).adapter
    rows = {}
    for steps in (int(s) for s in args.eval_steps.split(",")):
        plan = {"steps": steps, "mode": "ode", "boundary": False}
        tic = time.time()
        images, spi, nfe = repro.generate(base, adapter, pairs, plan, args.seed, 64)
        rows[f"controlnet_ddim{steps}"] = {**repro.score(images, pairs, "sr", feature_net, noises),
                                           "ms_per_image": 1000 * spi, "seconds": time.time() - tic}
    return rows


def bicubic_row(pairs, feature_net) -> dict:
    return repro.score(repro.baseline_images(pairs, "sr"), pairs, "sr", feature_net)


def markdown(results: dict) -> str:
    lines = ["| pilot | what | sampler | PSNR | SSIM | FD-patch | colour corr. with target (R, G, B) | "
             "colour corr. with noise | mean-colour share of MSE |", "|---|---|---|---|---|---|---|---|---|"]
    b = results["bicubic"]
    lines.append(f"| – | bicubic | – | {b['psnr']:.2f} | {b['ssim']:.4f} | {b['fd_patch']:.2f} | "
                 f"{', '.join(f'{c:.2f}' for c in b['colour_corr'])} | – | "
                 f"{b['colour_share']:.0%} |")
    for name, pilot in results["pilots"].items():
        for sampler, r in pilot["rows"].items():
            lines.append(f"| {name} | {pilot['what']} | {sampler.replace('controlnet_', '').upper()} | "
                         f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['fd_patch']:.2f} | "
                         f"{', '.join(f'{c:.2f}' for c in r['colour_corr'])} | "
                         f"{r['corr_with_noise_mean']:.2f} | {r['colour_share']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import features
    import torch

    torch.set_num_threads(args.threads)
    data_args = argparse.Namespace(work=args.work, train_crops=2048, test_crops=256, seed=args.seed)
    data = repro.prepare_data(data_args)
    feature_net = features.load_feature_net(HERE / "featnet" / "feature_net.safetensors")
    names = args.only.split(",") if args.only else list(PILOTS)
    out_json = args.results / "mini_pilots.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"pilots": {}}
    pairs = repro.evaluation_pairs("sr", data["test"], args.seed)[:args.test_crops]
    results["bicubic"] = bicubic_row(pairs, feature_net)
    results["test_crops"] = len(pairs)
    for name in names:
        spec = PILOTS[name]
        scores = args.work / "pilots" / name / "scores.json"
        if not scores.is_file():
            tic = time.time()
            base = pilot_base(name, spec, args)
            adapter = pilot_controlnet(name, spec, base, args, data)
            rows = score_pilot(name, base, adapter, args, data, feature_net)
            scores.write_text(json.dumps({"what": spec["what"], "rows": rows, "base_steps":
                                          None if spec["base"] is None else args.base_steps,
                                          "controlnet_steps": spec["controlnet_steps"],
                                          "seconds_this_call": time.time() - tic}, indent=1))
        results["pilots"][name] = json.loads(scores.read_text())
        for sampler, r in results["pilots"][name]["rows"].items():
            print(f"pilots: {name} {sampler}: PSNR {r['psnr']:.2f} FD-patch {r['fd_patch']:.2f} colour corr "
                  f"target {r['corr_with_target_mean']:.2f} noise {r['corr_with_noise_mean']:.2f}", flush=True)
        args.results.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1))
        (args.results / "mini_pilots.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
