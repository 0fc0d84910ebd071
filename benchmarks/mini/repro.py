"""Miniature reproduction of the CoDi paper's tables: one command trains every method and writes the tables.

    .venv/bin/python benchmarks/mini/repro.py              # train what is missing, evaluate, write the results
    .venv/bin/python benchmarks/mini/repro.py --phase eval # re-score the trained adapters only

Everything real except scale: the committed pixel-space base (``benchmarks/mini/base``, pretrained here on real photos),
the trainer (``trainer/train.py``) and its condition builders, held-out crops of test-split photos. Every method trains
the same adapter (a ControlNet: encoder copy + hint CNN 16,32 + zero convs) with the same budget (steps x batch):

    controlnet   plain denoising loss (``--loss diffusion``), sampled with DDIM at 50/8/4/2/1 steps
    pe_codi      CoDi, adapter only (the paper's PE-CoDi), 1/2/4 steps
    codi_lora    CoDi, adapter + a jointly trained UNet LoRA (our stand-in for the paper's full CoDi), 1/2/4 steps
    two_stage    ``controlnet`` then LCM-style consistency distillation of it (``--ode_model teacher``, lambda 0),
                 4 steps
    ablations    CoDi at 4 steps with the one-step ODE from the frozen base, eps-space consistency, per-sample t

Each training run is a ``trainer/train.py`` subprocess that saves its full state every ``--save_every`` steps; a rerun
skips finished runs and resumes unfinished ones from their last state (an interrupted benchmark loses at most
``--save_every`` steps per run). Outputs: ``<work>/runs/<name>/`` (adapters, logs, ``done.json``),
``<work>/eval/metrics.json``, and with ``--results`` (default ``benchmarks/results``) ``mini_repro_metrics.json``, the
tables
``mini_repro_tables.md`` and the PNG grids ``mini_repro_<task>.png``; ``benchmarks/results/mini_repro.md`` quotes
those tables and reads them against the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASE = HERE / "base"

# The shared recipe of every training run (the demo uses the same; see benchmarks/mini/demo.py).
COMMON = ["--resolution", "64", "--adapter_type", "controlnet", "--conditioning_embedding_channels", "16,32",
          "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "20", "--ema_decay", "0.99",
          "--max_grad_norm", "1.0", "--save_precision", "float"]
BATCH_SIZE, LEARNING_RATE = 8, 1e-3
TASK_FLAGS = {"sr": ["--task", "sr", "--sr_scale", "4"], "inpaint": ["--task", "inpaint"]}


def portable(obj):
    """``obj`` with this checkout's absolute paths made relative to the repository (committed results must not
    depend on the machine they were made on)."""
    if isinstance(obj, str):
        return obj.replace(f"{REPO}/", "").replace(str(REPO), ".")
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def run_table(tasks) -> list[dict]:
    """The training runs, in order (a run may depend on an earlier one's adapter); SR first, with its ablations (the
    paper's ablations are on SR), so that an interrupted benchmark has whole tables sooner."""
    runs = []
    for task in tasks:
        runs += [
            {"name": f"{task}_controlnet", "task": task, "flags": ["--loss", "diffusion"]},
            {"name": f"{task}_pe_codi", "task": task, "flags": []},
            {"name": f"{task}_codi_lora", "task": task, "flags": ["--unet_lora_dim", "16"]},
            {"name": f"{task}_two_stage", "task": task, "needs": f"{task}_controlnet",
             "flags": ["--ode_model", "teacher", "--guidance_weight", "0"]},
        ]
        if task == "sr":
            runs += [
                {"name": "sr_ablation_eps_space", "task": "sr", "flags": ["--consistency_space", "eps"]},
                {"name": "sr_ablation_ode_base", "task": "sr", "flags": ["--ode_model", "base"]},
                {"name": "sr_ablation_per_sample_t", "task": "sr", "flags": ["--shared_timestep", "false"]},
            ]
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("all", "train", "eval"), default="all")
    p.add_argument("--work", type=Path, default=HERE / "work", help="runs, data crops and raw metrics (git-ignored)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                   help="where the metrics JSON and PNG grids go")
    p.add_argument("--tasks", default="sr,inpaint")
    p.add_argument("--only", default=None, help="comma-separated run names to train (default: all)")
    p.add_argument("--steps", type=int, default=900, help="training steps per run")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    p.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    p.add_argument("--train_crops", type=int, default=2048, help="64x64 training crops of the train-split photos")
    p.add_argument("--test_crops", type=int, default=256, help="held-out 64x64 crops of the test-split photos")
    p.add_argument("--save_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="training runs at a time (each with --threads threads); on a 2-core CPU two 1-thread runs "
                        "beat one 2-thread run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run and for the evaluation")
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--eval_threads", type=int, default=os.cpu_count() or 1, help="torch threads of the evaluation")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data


def prepare_data(args) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    import photos

    split = json.loads((BASE / "split.json").read_text())
    train = args.work / "data" / "train"
    test = args.work / "data" / "test"
    photos.write_crops(split["train"], train, args.train_crops, seed=args.seed)
    photos.write_crops(split["test"], test, args.test_crops, seed=args.seed + 1)
    return {"train": train, "test": test}


# ------------------------------------------------------------------------------------------------ training


def train_run(run: dict, args, data: dict[str, Path]) -> dict:
    """Train one run (or resume it, or skip it when done.json exists); returns its done.json."""
    run_dir = run.get("dir") or args.work / "runs" / run["name"]
    done = run_dir / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    flags = list(run["flags"])
    if run.get("needs"):
        teacher = args.work / "runs" / run["needs"] / f"{run['needs']}.safetensors"
        if not teacher.is_file():
            raise SystemExit(f"repro: {run['name']} needs {teacher}: train {run['needs']} first")
        flags += ["--init_adapter", str(teacher), "--teacher_adapter", str(teacher)]
    steps = run.get("steps", args.steps)
    argv = [sys.executable, str(REPO / "trainer" / "train.py"), "--pretrained_model_name_or_path",
            str(run.get("base", BASE)),
            "--train_data_dir", str(data["train"]), *TASK_FLAGS[run["task"]], *COMMON, *flags,
            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps),
            "--learning_rate", str(args.learning_rate), "--seed", str(args.seed),
            "--save_every_n_steps", str(args.save_every), "--save_state", "--save_last_n_steps", str(args.save_every),
            "--output_dir", str(run_dir), "--output_name", run["name"]]
    from trainer.training.state import latest_step_state

    state = latest_step_state(run_dir, run["name"])
    if state is not None:
        argv += ["--resume", str(state)]
        print(f"repro: {run['name']}: resuming from {state.name}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    print(f"repro: training {run['name']} ({steps} steps x batch {args.batch_size})", flush=True)
    start = time.time()
    with open(run_dir / "train.log", "a") as log:
        code = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    if code != 0:
        raise SystemExit(f"repro: {run['name']} failed (exit {code}); see {run_dir / 'train.log'}")
    text = (run_dir / "train.log").read_text()
    # the trainer's own timing of its last (uninterrupted) call: with the step count it gives seconds per step even
    # when earlier calls were interrupted
    done_lines = re.findall(r"codi: done: \d+ steps \((\d+) this run\) in ([0-9.]+) s", text)
    steps_last, seconds_last = (int(done_lines[-1][0]), float(done_lines[-1][1])) if done_lines else (0, 0.0)
    record = {"name": run["name"], "task": run["task"], "flags": flags, "steps": steps,
              "batch_size": args.batch_size, "seconds_this_call": seconds, "training_seconds": seconds_last,
              "steps_this_call": steps_last,
              "seconds_per_step": seconds_last / steps_last if steps_last else None,
              "resumed": state is not None, "command": " ".join(argv[1:])}
    done.write_text(json.dumps(portable(record), indent=1))
    return record


def train_all(runs: list[dict], args, data) -> None:
    """Train ``runs`` with ``--jobs`` at a time; a run that needs another waits for it (it is earlier in the list,
    so it is already running or done)."""
    from concurrent.futures import ThreadPoolExecutor

    futures = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        def job(run):
            if run.get("needs") in futures:
                futures[run["needs"]].result()
            return train_run(run, args, data)

        for run in runs:
            futures[run["name"]] = pool.submit(job, run)
        for future in futures.values():
            future.result()  # re-raises a failed run's SystemExit


# ------------------------------------------------------------------------------------------------ evaluation


def sampling_plans(task: str) -> list[dict]:
    """(method label, run, steps, sampler) rows of the tables, in the paper's order."""
    plans = [{"method": "ControlNet (DDIM)", "run": f"{task}_controlnet", "steps": n, "mode": "ode",
              "boundary": False} for n in (50, 8, 4, 2, 1)]
    plans += [{"method": "Two-stage (ControlNet + LCM)", "run": f"{task}_two_stage", "steps": 4,
               "mode": "consistency", "boundary": True}]
    plans += [{"method": "PE-CoDi", "run": f"{task}_pe_codi", "steps": n, "mode": "ode", "boundary": True}
              for n in (1, 2, 4)]
    plans += [{"method": "CoDi + UNet LoRA", "run": f"{task}_codi_lora", "steps": n, "mode": "ode",
               "boundary": True} for n in (1, 2, 4)]
    if task == "sr":
        plans += [{"method": label, "run": run, "steps": 4, "mode": "ode", "boundary": True} for label, run in (
            ("ablation: ODE model = frozen base", "sr_ablation_ode_base"),
            ("ablation: eps-space consistency", "sr_ablation_eps_space"),
            ("ablation: per-sample t", "sr_ablation_per_sample_t"))]
        # Supplementary, not the paper's protocol: start from the bicubic upsample at t = 420 (the last 4 of the
        # 8-step grid) instead of pure noise at t = 980, which separates "the adapter learned the condition" from
        # "the base's first steps at t ~ 980 are accurate" (see mini_repro.md).
        plans += [{"method": f"img2img from bicubic: {label}", "run": run, "steps": 8, "mode": "ode",
                   "boundary": True, "img2img_strength": 0.5, "table": "supplementary"} for label, run in (
            ("base alone", None), ("ControlNet", "sr_controlnet"), ("PE-CoDi", "sr_pe_codi"),
            ("CoDi + UNet LoRA", "sr_codi_lora"))]
    return plans


def evaluation_pairs(task: str, test_dir: Path, seed: int):
    """Held-out pairs: every test crop with its condition drawn from (validation seed, index) by the trainer's own
    validation dataset (fixed per crop, identical for every method)."""
    from trainer.data.dataset import build_datasets
    from trainer.data.spec import DataSettings
    from trainer.evaluation.evaluate import validation_pairs

    settings = DataSettings(train_data_dir=str(test_dir), validation_data_dir=str(test_dir), task=task,
                            sr_scale=4 if task == "sr" else None, resolution=(64, 64), seed=seed)
    return validation_pairs(build_datasets(settings, (64, 64))[1])


def starting_noise(seed: int, indices):
    """The starting noise of the crops ``indices``: seeded by ``seed + index``, so a crop starts from the same noise
    under every method and step count."""
    import torch

    return torch.stack([torch.randn((3, 64, 64), generator=torch.Generator().manual_seed(seed + i)) for i in indices])


def load_run(work: Path, run: str | None, base_path: Path = BASE):
    """``(base, adapter)`` of a trained run (``run`` None: the base alone, adapter None), on a fresh base (a UNet LoRA
    is injected into it); None when the run has no adapter yet."""
    from trainer.adapters.files import load_adapter
    from trainer.models import load_base_model

    path = None if run is None else work / "runs" / run / f"{run}.safetensors"
    if path is not None and not path.is_file():
        print(f"repro: skipping {run}: {path} not trained", flush=True)
        return None
    base = load_base_model(base_path)
    return base, None if path is None else load_adapter(base, path).adapter


def generate(base, adapter, pairs, plan: dict, seed: int, batch: int) -> tuple[list, float, int]:
    """Sample every pair with one plan; returns (images in [0, 1], seconds per image, NFE per image)."""
    import torch

    import ccd_sampler as cs
    from trainer.adapters.controlnet import adapted_unet_output, text_conditioning
    from trainer.evaluation.evaluate import reference_timesteps

    timesteps = reference_timesteps(plan["steps"], 50)
    schedule = cs.NoiseSchedule.from_config(base.scheduler)
    scale = base.vae_scaling_factor  # pixel-space base: latents = pixels in [-1, 1] times this
    calls = {"n": 0}

    def denoise(z, t, cond):
        calls["n"] += z.shape[0]
        return adapted_unet_output(base.unet, adapter, z, t, cond)

    images, seconds = [], 0.0
    for start in range(0, len(pairs), batch):
        group = list(range(start, min(start + batch, len(pairs))))
        hint = torch.stack([pairs[i].hint for i in group]).float()
        text = base.encode_text([""] * len(group))
        cond = text_conditioning(text, hint)
        noise = starting_noise(seed, group)
        generator = torch.Generator().manual_seed(seed + 7919 * (start + 1))
        tic = time.perf_counter()
        with torch.no_grad():
            init = {}
            if plan.get("img2img_strength"):
                init = {"init_image": (hint * 2 - 1) * scale, "strength": plan["img2img_strength"]}
            out = cs.sample(denoise, noise, timesteps, base.prediction_type, schedule=schedule, mode=plan["mode"],
                            cond=cond, generator=generator, boundary=plan["boundary"], **init)
        seconds += time.perf_counter() - tic
        images += list((base.decode_latents(out.float()) / 2 + 0.5).clamp(0, 1))
    return images, seconds / len(pairs), calls["n"] // len(pairs)


DIAGNOSTIC_T = (20, 200, 500, 800, 980)
DIAGNOSTIC_CROPS = 64


def denoising_accuracy(base, adapter, pairs, seed: int, batch: int) -> dict:
    """PSNR of the one-step estimate x0 = (z_t - sigma_t eps_hat) / alpha_t against the target at fixed t (z_t made
    from the target and seeded noise), and the standard deviation of x0 from *pure noise* at t = 980: how accurate
    the (adapted) model is at each noise level, in particular at the t ~ 980 every few-step sampler starts from."""
    import torch

    import ccd_sampler as cs
    from trainer.adapters.controlnet import adapted_unet_output, text_conditioning
    from trainer.evaluation.metrics import psnr

    schedule = cs.NoiseSchedule.from_config(base.scheduler)
    scale = base.vae_scaling_factor
    x = (torch.stack([p.target.float() for p in pairs]) * 2 - 1) * scale
    hint = torch.stack([p.hint.float() for p in pairs])
    out = {}
    for t in (*DIAGNOSTIC_T, "noise"):
        estimates = []
        for start in range(0, len(pairs), batch):
            xb, hb = x[start:start + batch], hint[start:start + batch]
            tt = torch.full((len(xb),), 980 if t == "noise" else t)
            alpha, sigma = schedule.alpha_sigma(tt, like=xb)
            noise = torch.randn(xb.shape, generator=torch.Generator().manual_seed(seed + 31 * start + 1))
            z = noise if t == "noise" else alpha * xb + sigma * noise
            cond = text_conditioning(base.encode_text([""] * len(xb)), hb)
            with torch.no_grad():
                prediction = adapted_unet_output(base.unet, adapter, z, tt, cond)
            estimates.append(cs.to_x0_eps(prediction, z, alpha, sigma, base.prediction_type)[0] / scale)
        x0 = torch.cat(estimates)
        if t == "noise":
            out["x0_std_from_noise_980"] = float(x0.std())
        else:
            out[f"x0_psnr_t{t}"] = float(psnr((x0 / 2 + 0.5).clamp(0, 1), x / scale / 2 + 0.5).mean())
    return out


def score(images, pairs, task: str, feature_net) -> dict:
    import torch

    from trainer.evaluation.metrics import masked_psnr, psnr, ssim

    pred = torch.stack(images)
    target = torch.stack([p.target.float() for p in pairs])
    out = {"psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target).mean())}
    if task == "inpaint":
        masks = torch.stack([(p.hint[:1] < 0).float() for p in pairs])
        out["masked_psnr"] = float(masked_psnr(pred, target, masks).mean())
    if feature_net is not None:
        import features

        out.update(features.distribution_metrics(feature_net, pred, target))
    return out


def baseline_images(pairs, task: str) -> list:
    import torch

    from trainer.evaluation.evaluate import default_baseline

    mean_colour = torch.stack([p.target.float().flatten(1).mean(1) for p in pairs]).mean(0)
    return [default_baseline(p, task, mean_colour).float().clamp(0, 1) for p in pairs]


def evaluate(args, data) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import features

    from trainer.evaluation.evaluate import machine_info

    torch.set_num_threads(args.eval_threads)
    feature_net = features.load_feature_net(HERE / "featnet" / "feature_net.safetensors")
    results = {"machine": machine_info("cpu"), "settings": {k: str(v) for k, v in vars(args).items()}, "tasks": {}}
    grids = {}
    loaded: dict = {}

    def models_of(run: str | None):
        """``load_run``, once per run."""
        if run not in loaded:
            loaded[run] = load_run(args.work, run)
        return loaded[run]

    for task in args.tasks.split(","):
        pairs = evaluation_pairs(task, data["test"], args.seed)
        rows = []
        base_imgs = baseline_images(pairs, task)
        rows.append({"method": "bicubic" if task == "sr" else "mean fill", "steps": 0, "nfe": 0, "table": "main",
                     "seconds_per_image": 0.0, **score(base_imgs, pairs, task, feature_net)})
        grid_columns = {"condition": [condition_image(p, task) for p in pairs[:GRID_ROWS]],
                        rows[0]["method"]: base_imgs[:GRID_ROWS]}
        for plan in sampling_plans(task):
            models = models_of(plan["run"])
            if models is None:
                continue
            images, spi, nfe = generate(*models, pairs, plan, args.seed, args.eval_batch)
            row = {"method": plan["method"], "run": plan["run"], "steps": plan["steps"], "sampler": plan["mode"],
                   "table": plan.get("table", "main"), "nfe": nfe, "seconds_per_image": spi,
                   **score(images, pairs, task, feature_net)}
            if plan.get("img2img_strength"):
                row["steps"] = nfe  # the steps actually run: the tail of the grid
            rows.append(row)
            print(f"repro: {task} {plan['method']} {row['steps']} steps: PSNR {row['psnr']:.2f} "
                  f"SSIM {row['ssim']:.4f} FD-patch {row['fd_patch']:.2f} ({spi * 1000:.1f} ms/img)", flush=True)
            if (plan["method"], plan["steps"]) in GRID_METHODS:
                grid_columns[f"{plan['method']} {plan['steps']}"] = images[:GRID_ROWS]
        grid_columns["ground truth"] = [p.target.float() for p in pairs[:GRID_ROWS]]
        diagnostics = {}
        for run in [None, *dict.fromkeys(p["run"] for p in sampling_plans(task) if p["run"])]:
            models = models_of(run)
            if models is not None:
                # a diagnostic, not a table row: the first 64 crops suffice and keep the evaluation inside the time
                # budget
                diagnostics[run or "base alone"] = denoising_accuracy(*models, pairs[:DIAGNOSTIC_CROPS], args.seed,
                                                                      args.eval_batch)
        results["tasks"][task] = {"pairs": len(pairs), "rows": rows, "denoising_accuracy": diagnostics}
        grids[task] = grid_columns
    return results, grids


GRID_ROWS = 6
GRID_METHODS = {("ControlNet (DDIM)", 50), ("ControlNet (DDIM)", 4), ("Two-stage (ControlNet + LCM)", 4),
                ("PE-CoDi", 1), ("PE-CoDi", 4), ("CoDi + UNet LoRA", 4)}


def condition_image(pair, task: str):
    """What the grid's first column shows: the hint (SR: the degraded low-res upsampled; inpaint: grey holes)."""
    hint = pair.hint.float()
    return hint.clamp(0, 1) if task != "inpaint" else hint.where(hint >= 0, 0.5)


def markdown_tables(results: dict) -> str:
    """The tables of ``mini_repro.md`` in the paper's layout (Steps | Method | metrics), one per task (and the
    supplementary img2img rows apart)."""
    out = []
    for task, data in results["tasks"].items():
        extra = task == "inpaint"
        name = "4x super-resolution" if task == "sr" else "Inpainting"
        for table in ("main", "supplementary"):
            rows = [r for r in data["rows"] if r.get("table", "main") == table]
            if not rows:
                continue
            title = (name if table == "main"
                     else f"{name}, supplementary: img2img start at t = 420 (not the paper's protocol)")
            out.append(f"### {title} ({data['pairs']} held-out crops)\n")
            out.append("| Steps | Method | PSNR ↑ | SSIM ↑ |" + (" PSNR in mask ↑ |" if extra else "")
                       + " FD-patch ↓ | KD-patch ×1000 ↓ | NFE | ms / image |")
            out.append("|---|---|---|---|" + ("---|" if extra else "") + "---|---|---|---|")
            for r in rows:
                steps = "–" if not r["steps"] else str(r["steps"])
                method = r["method"] + (" (LCM sampler)" if r.get("sampler") == "consistency" else "")
                out.append(f"| {steps} | {method} | {r['psnr']:.2f} | {r['ssim']:.4f} |"
                           + (f" {r['masked_psnr']:.2f} |" if extra else "")
                           + f" {r['fd_patch']:.2f} | {r['kd_patch'] * 1000:.1f} | {r['nfe']} |"
                           f" {r['seconds_per_image'] * 1000:.1f} |")
            out.append("")
        diag = data.get("denoising_accuracy") or {}
        if diag:
            out.append(f"### {name}: one-step x0 accuracy by noise level (first {DIAGNOSTIC_CROPS} crops; PSNR of x0 "
                       "from z_t = alpha_t x + sigma_t eps; std of x0 from pure noise at t = 980)\n")
            out.append("| model | " + " | ".join(f"t = {t}" for t in DIAGNOSTIC_T) + " | x0 std from noise, t = 980 |")
            out.append("|---|" + "---|" * (len(DIAGNOSTIC_T) + 1))
            for model, d in diag.items():
                out.append(f"| {model} | " + " | ".join(f"{d[f'x0_psnr_t{t}']:.2f}" for t in DIAGNOSTIC_T)
                           + f" | {d['x0_std_from_noise_980']:.3f} |")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = prepare_data(args)
    tasks = args.tasks.split(",")
    if args.phase in ("all", "train"):
        wanted = set(args.only.split(",")) if args.only else None
        train_all([r for r in run_table(tasks) if wanted is None or r["name"] in wanted], args, data)
    if args.phase in ("all", "eval"):
        eval_start = time.time()
        results, grids = evaluate(args, data)
        results["runs"] = {p.parent.name: json.loads(p.read_text())
                           for p in sorted((args.work / "runs").glob("*/done.json"))}
        results["eval_seconds"] = time.time() - eval_start
        out = args.work / "eval" / "metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "mini_repro_metrics.json").write_text(json.dumps(portable(results), indent=1))
        (args.results / "mini_repro_tables.md").write_text(markdown_tables(results))
        from trainer.evaluation.report import write_image_grid

        for task, columns in grids.items():
            rows = [list(images) for images in zip(*columns.values())]
            write_image_grid(list(columns), rows, args.results / f"mini_repro_{task}.png", header_lines=2)
        print(f"repro: wrote {args.results / 'mini_repro_metrics.json'} and the grids "
              f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
