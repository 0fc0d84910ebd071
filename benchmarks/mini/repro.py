"""Miniature reproduction of the CoDi paper's tables: one command trains every method and writes the tables.

    .venv/bin/python benchmarks/mini/repro.py                  # what the ledger lacks (all of it: 8-10 h, 2 cores)
    .venv/bin/python benchmarks/mini/repro.py --quick          # headline rows, SR, one seed, short runs (~30 min)
    .venv/bin/python benchmarks/mini/repro.py --phase eval     # re-score the trained adapters only

Everything real except scale: the committed pixel-space base (``--base``, default ``benchmarks/mini/base_v2``:
v-prediction on the zero-terminal-SNR schedule, pretrained here on real photos), the trainer (``trainer/train.py``) and
its condition builders, held-out crops of test-split photos. Every method trains the same adapter (a ControlNet:
encoder copy + hint CNN 16,32 + zero convs) with the same budget (steps x batch):

    controlnet   plain denoising loss (``--loss diffusion``), sampled with DDIM at 50/8/4/2/1 steps
    pe_codi      CoDi, adapter only (the paper's PE-CoDi), 1/2/4 steps
    codi_lora    CoDi, adapter + a jointly trained UNet LoRA (our stand-in for the paper's full CoDi), 1/2/4 steps
    two_stage    ``controlnet`` then LCM-style consistency distillation of it (``--ode_model teacher``, lambda 0),
                 4 steps
    ablations    (SR) CoDi at 4 steps with: the one-step ODE from the frozen base, eps-space consistency, one t per
                 sample, lambda = 0.1, grid N = 20 (seed 0; eps-space three seeds, ``ABLATION_SEEDS``, and also
                 1 and 2 steps, ``ABLATION_STEPS``)
    EMA check    (every task) PE-CoDi seed 0 at 4 steps with the raw weights of its final training state instead of
                 their EMA (what the trainer saves): sampled only, ``<task>_pe_codi_seed0_no_ema``

for the tasks ``sr`` (4x), ``inpaint`` and ``gray`` (colorization). The headline rows train with several seeds
(``SEEDS``): their table cells are mean ± std over seeds, and the verdicts against the paper's claims take that spread
into account. Supplementary SR rows start the same samplers from ``alpha * bicubic + sigma * noise`` instead of pure
noise (an img2img start from the condition; not the paper's protocol).

Each training run is a ``trainer/train.py`` subprocess that saves its full state every ``--save_every`` steps; a rerun
skips finished runs and resumes unfinished ones from their last state. Outputs: ``<work>/runs/<name>/`` (adapters,
logs, ``done.json``), ``<work>/eval/metrics.json``, and in ``--results`` (default ``benchmarks/results``)
``mini_repro_metrics.json``, the tables and verdicts ``mini_repro_tables.md`` and the grids ``mini_repro_<task>.png``
(``--quick``: the same names with ``_quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASE = HERE / "base_v2"

# The shared recipe of every training run (the demo uses the same; see benchmarks/mini/demo.py).
COMMON = ["--resolution", "64", "--adapter_type", "controlnet", "--conditioning_embedding_channels", "16,32",
          "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "20", "--ema_decay", "0.99",
          "--max_grad_norm", "1.0", "--save_precision", "float"]
# Every run in the ledger was trained with x-space consistency, the trainer's default until the ε-space ablation below
# (three seeds, sampled at 1, 2 and 4 steps) made ε-space the default. Pinned so that new runs stay comparable with
# the ledger and the ε-space ablation remains PE-CoDi with one flag changed (its flags come later and win).
LEDGER_CONSISTENCY = ["--consistency_space", "x"]
BATCH_SIZE, LEARNING_RATE = 8, 1e-3
TASK_FLAGS = {"sr": ["--task", "sr", "--sr_scale", "4"], "inpaint": ["--task", "inpaint"], "gray": ["--task", "gray"]}
TASK_NAMES = {"sr": "4x super-resolution", "inpaint": "Inpainting", "gray": "Colorization (gray)"}
METHOD_FLAGS = {"controlnet": ["--loss", "diffusion"], "pe_codi": [], "codi_lora": ["--unet_lora_dim", "16"],
                "two_stage": ["--ode_model", "teacher", "--guidance_weight", "0"]}
# Seeds per (task, method). The rows the paper's claims compare (ControlNet 50/4, PE-CoDi and CoDi + UNet LoRA at 4)
# train three seeds on SR, the two most compared ones (ControlNet, PE-CoDi) three on inpainting and colorization; the
# two-stage baseline, far from the others in every measurement so far, and CoDi + UNet LoRA on the other two tasks
# train one. Even so the whole protocol is 8-10 h at two jobs on a fast 2-core machine
# (benchmarks/results/mini_repro.md has the measured times); the committed ledger lets it accumulate over several
# sittings.
SEEDS = {"sr": {"controlnet": 3, "pe_codi": 3, "codi_lora": 3, "two_stage": 1},
         "inpaint": {"controlnet": 3, "pe_codi": 3, "codi_lora": 1, "two_stage": 1},
         "gray": {"controlnet": 3, "pe_codi": 3, "codi_lora": 1, "two_stage": 1}}
# The paper's ablations (SR, PE-CoDi at 4 steps, seed 0), one flag each against the defaults.
ABLATIONS = {"ode_base": (["--ode_model", "base"], "ODE model = frozen base"),
             "eps_space": (["--consistency_space", "eps"], "eps-space consistency"),
             "per_sample_t": (["--shared_timestep", "false"], "one t per sample"),
             "lambda_0.1": (["--guidance_weight", "0.1"], "lambda = 0.1"),
             "grid_20": (["--distill_grid", "20"], "grid N = 20")}
# An ablation that a single seed shows clearly ahead of the default could move that default, so it gets the headline
# rows' three seeds (``sr_ablation_<key>_seed<k>`` for k >= 1; seed 0 keeps its name): eps-space consistency, which
# the paper prefers and whose seed 0 beat all three PE-CoDi seeds on FD-patch.
ABLATION_SEEDS = {"eps_space": 3}
# The step counts an ablation is sampled at (default 4). Eps-space consistency was ahead of x-space at 4 steps at each
# of its three seeds, but on the toy problem of tests/test_analytic.py it loses at 1 step (energy distance 0.16
# against 0.05; 2 steps: a tie), and the product samples at 1-4 steps, so it is also sampled at 1 and 2. It is ahead
# at every step count and seed (FD-patch 12.7, 7.3 and 7.3 lower at 1, 2 and 4 steps), which made it the trainer's
# default. A ledger entry sampled at fewer step counts stays in the tables and is retrained and rescored by the next
# run that includes it (the adapters are not committed).
ABLATION_STEPS = {"eps_space": (1, 2, 4)}
# The EMA check (every task, not quick): PE-CoDi seed 0's raw weights at the end of training, sampled like its EMA
# adapter (what the trainer saves), so the EMA default (``--ema_decay``; 0.99 here) is measured, not assumed. Sampled
# only: the weights come from that run's final training state.
NO_EMA_LABEL = "no EMA (the run's raw weights)"
METHOD_LABELS = {"controlnet": "ControlNet (DDIM)", "two_stage": "Two-stage (ControlNet + LCM)",
                 "pe_codi": "PE-CoDi", "codi_lora": "CoDi + UNet LoRA"}


def run_name(task: str, method: str, seed: int) -> str:
    return f"{task}_{method}_seed{seed}"


def run_table(tasks, quick: bool = False) -> list[dict]:
    """The runs, in order (the two-stage run needs its ControlNet, listed earlier): per task the headline methods
    seed by seed, SR first with its ablations and a sampling-only run of the base alone (``"train": False``), then
    per task the EMA check (sampled only, from the final training state of the run it names in ``"of"``), so an
    interrupted benchmark has whole tables sooner."""
    runs = []
    for task in tasks:
        seeds = SEEDS[task]
        for method, flags in METHOD_FLAGS.items():
            for seed in range(1 if quick else seeds[method]):
                run = {"name": run_name(task, method, seed), "task": task, "method": method, "seed": seed,
                       "flags": list(flags)}
                if method == "two_stage":
                    run["needs"] = run_name(task, "controlnet", seed)
                runs.append(run)
        if task == "sr" and not quick:
            runs += [{"name": f"sr_ablation_{key}" + (f"_seed{seed}" if seed else ""), "task": "sr",
                      "method": "ablation", "seed": seed, "flags": flags, "label": label,
                      "sample_steps": ABLATION_STEPS.get(key, (4,))}
                     for key, (flags, label) in ABLATIONS.items() for seed in range(ABLATION_SEEDS.get(key, 1))]
        if not quick:
            source = run_name(task, "pe_codi", 0)
            runs.append({"name": f"{source}_no_ema", "task": task, "method": "ablation", "seed": 0, "flags": [],
                         "label": NO_EMA_LABEL, "of": source, "train": False})
        if task == "sr":  # the supplementary rows of the base alone: sampled, nothing trained
            runs.append({"name": "sr_base_alone", "task": "sr", "method": "base", "seed": 0, "flags": [],
                         "train": False})
    # seed by seed (an interrupted benchmark has every method with the seeds done so far), the ControlNet first in
    # each (the two-stage run distills it), the ablations after the headline seeds
    return sorted(runs, key=lambda r: (tasks.index(r["task"]), r["method"] == "ablation", r["seed"],
                                       r["method"] != "controlnet"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("all", "train", "eval", "tables", "score"), default="all",
                   help="all: train and score what the ledger lacks, then the tables; train: train only; eval: "
                        "(re)score every trained run in --work, then the tables; tables: the tables from the ledger "
                        "only; score: score the --only runs in this process (what each job runs)")
    p.add_argument("--quick", action="store_true",
                   help="the headline rows of SR with one seed, 300 steps per run, 128 test crops (~25 min)")
    p.add_argument("--base", type=Path, default=BASE, help="the base bundle every adapter is distilled from")
    p.add_argument("--work", type=Path, default=None,
                   help="runs, data crops and raw metrics (git-ignored; default benchmarks/mini/work[_quick])")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                   help="where the ledger of scored runs, the metrics JSON, the tables and the PNG grids go")
    p.add_argument("--tasks", default=None, help="comma-separated (default sr,inpaint,gray; --quick: sr)")
    p.add_argument("--only", default=None, help="comma-separated run names to train and score (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 900; --quick 300)")
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    p.add_argument("--learning_rate", type=float, default=LEARNING_RATE)
    p.add_argument("--train_crops", type=int, default=2048, help="64x64 training crops of the train-split photos")
    p.add_argument("--test_crops", type=int, default=None,
                   help="held-out 64x64 crops of the test-split photos (default 256; --quick 128)")
    p.add_argument("--save_every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="data crops, evaluation noise; run seeds add to it")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="training runs at a time (each with --threads threads); on a 2-core CPU two 1-thread runs "
                        "beat one 2-thread run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (its training and its scoring)")
    p.add_argument("--eval_batch", type=int, default=64)
    args = p.parse_args(argv)
    args.tasks = (args.tasks or ("sr" if args.quick else "sr,inpaint,gray")).split(",")
    args.steps = args.steps or (300 if args.quick else 900)
    args.test_crops = args.test_crops or (128 if args.quick else 256)
    args.work = args.work or HERE / ("work_quick" if args.quick else "work")
    args.suffix = "_quick" if args.quick else ""
    args.ledger = args.results / f"mini_repro{args.suffix}_runs"
    # what each job's scoring subprocess is started with (it appends its own --phase and --only)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


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


# ------------------------------------------------------------------------------------------------ data


def prepare_data(args) -> dict[str, Path]:
    sys.path.insert(0, str(HERE))
    import photos

    split = json.loads((args.base / "split.json").read_text())
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
    seed = args.seed + run.get("seed", 0)
    argv = [sys.executable, str(REPO / "trainer" / "train.py"), "--pretrained_model_name_or_path",
            str(run.get("base", args.base)), "--train_data_dir", str(data["train"]), *TASK_FLAGS[run["task"]],
            *COMMON, *LEDGER_CONSISTENCY, *flags, "--train_batch_size", str(args.batch_size),
            "--max_train_steps", str(steps), "--learning_rate", str(args.learning_rate), "--seed", str(seed),
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
    record = {"name": run["name"], "task": run["task"], "method": run.get("method"), "seed": seed, "flags": flags,
              "steps": steps, "batch_size": args.batch_size, "seconds_this_call": seconds,
              "training_seconds": seconds_last, "steps_this_call": steps_last,
              "seconds_per_step": seconds_last / steps_last if steps_last else None,
              "resumed": state is not None, "command": " ".join(argv[1:])}
    done.write_text(json.dumps(portable(record), indent=1))
    return record


def run_all(runs: list[dict], args, data) -> None:
    """Train and score ``runs``, ``--jobs`` tasks at a time: each run's training (``--phase all``/``train``; none for
    a sampling-only run) and its scoring in a subprocess (``--phase all``/``eval``) into the ledger. Under ``--phase
    all`` a run already in the ledger (same settings) is skipped altogether. When a lane frees it takes the first
    task of :func:`task_order` whose inputs are ready, so a two-stage run starts training as soon as its ControlNet
    is trained, while another lane scores that ControlNet. A two-stage run whose ControlNet is not in this work folder
    (it came from the ledger of an earlier session) trains that ControlNet again first; so does, under ``--phase
    all``, an EMA check whose PE-CoDi run is not here (``--only`` must name that run too)."""
    import threading

    by_name = {r["name"]: r for r in runs}
    tasks = task_order([r for r in runs if not (args.phase == "all" and skipped(args, r))], args.phase)
    done: dict[tuple, bool] = {}  # task -> succeeded
    started: set = set()
    errors: list[BaseException] = []
    cond = threading.Condition()

    def ready(task) -> bool | None:
        """True to run, None to drop (an input failed), False to wait."""
        kind, run = task
        inputs = [("train", run["name"])] if kind == "score" else []
        if kind == "score" and run.get("of"):  # the EMA check samples the raw weights of a run trained here
            inputs.append(("train", run["of"]))
        if kind == "train" and run.get("needs"):
            inputs.append(("train", run["needs"]))
        inputs = [i for i in inputs if i in {(k, r["name"]) for k, r in tasks}]
        if any(done.get(i) is False for i in inputs):
            return None
        return all(i in done for i in inputs)

    def execute(task) -> None:
        kind, run = task
        if kind == "score":
            source = run.get("of")
            if source:  # the EMA check samples the raw weights of a run trained in this work folder
                if args.phase == "all" and source in by_name and not raw_weights_path(args.work, source).is_file():
                    train_run(by_name[source], args, data)  # scored from the ledger in an earlier session: again
                missing = not raw_weights_path(args.work, source).is_file()
            else:
                missing = run.get("train", True) and not adapter_path(args.work, run["name"]).is_file()
            if missing:
                print(f"repro: {run['name']}: not trained in {args.work}, not scored", flush=True)
                return
            score_in_subprocess(run, args)
            return
        needs = run.get("needs")
        if needs and not adapter_path(args.work, needs).is_file() and needs in by_name:
            train_run(by_name[needs], args, data)
        train_run(run, args, data)

    def lane() -> None:
        while True:
            with cond:
                while True:
                    pending = [t for t in tasks if (t[0], t[1]["name"]) not in started]
                    if not pending:
                        return
                    states = [(t, ready(t)) for t in pending]
                    for t, state in states:
                        if state is None:  # an input failed: this task cannot run
                            started.add((t[0], t[1]["name"]))
                            done[(t[0], t[1]["name"])] = False
                    choice = next((t for t, state in states if state), None)
                    if choice is not None:
                        started.add((choice[0], choice[1]["name"]))
                        break
                    if all(state is None for _, state in states):
                        continue
                    cond.wait()
            key = (choice[0], choice[1]["name"])
            try:
                execute(choice)
                ok = True
            except BaseException as exc:  # a failed run's SystemExit: the others go on, it is re-raised at the end
                errors.append(exc)
                ok = False
            with cond:
                done[key] = ok
                cond.notify_all()

    lanes = [threading.Thread(target=lane) for _ in range(max(1, args.jobs))]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    if errors:
        raise errors[0]


def skipped(args, run: dict) -> bool:
    entry = ledger_entry(args, run)
    if entry is None or unsampled_steps(entry, run):
        return False
    print(f"repro: {run['name']}: in the ledger, skipped", flush=True)
    return True


def task_order(runs: list[dict], phase: str) -> list[tuple[str, dict]]:
    """``[("train" | "score", run)]`` in the order lanes take them when ready: each run's training, then the trainings
    that wait for it (a two-stage run after its ControlNet: the longest chain starts first), then its scoring."""
    train = phase in ("all", "train")
    score = phase in ("all", "eval")
    dependents: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("needs"):
            dependents.setdefault(run["needs"], []).append(run)
    names = {r["name"] for r in runs}
    tasks: list[tuple[str, dict]] = []
    for run in runs:
        if run.get("needs") in names and train:
            continue  # placed right after the run it needs
        if train and run.get("train", True):
            tasks.append(("train", run))
        if train:
            tasks += [("train", d) for d in dependents.get(run["name"], [])]
        if score:
            tasks.append(("score", run))
            if train:
                tasks += [("score", d) for d in dependents.get(run["name"], [])]
    return tasks


def adapter_path(work: Path, run: str) -> Path:
    return work / "runs" / run / f"{run}.safetensors"


def raw_weights_path(work: Path, run: str) -> Path:
    """The trainable weights (not their EMA) at the end of a run: its final training state's."""
    return work / "runs" / run / f"{run}-state" / "trainable.safetensors"


# ------------------------------------------------------------------------------------------------ the ledger
#
# Every scored run leaves its rows in a committed ledger (``<results>/mini_repro[_quick]_runs/<run>.json`` and a PNG
# strip of its grid images), so the protocol, longer than one sitting, accumulates across machines and sessions:
# a later ``repro.py`` skips what the ledger holds and the tables are assembled from it. Adapters stay in the
# (git-ignored) work folder.


def ledger_settings(args) -> dict:
    """What a run's rows depend on beyond its own flags; an entry made under other settings is not reused."""
    return portable({"base": str(args.base), "steps": args.steps, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "train_crops": args.train_crops,
                     "test_crops": args.test_crops, "seed": args.seed})


def ledger_entry(args, run: dict) -> dict | None:
    """The run's ledger entry, or None when there is none for these settings and flags."""
    path = args.ledger / f"{run['name']}.json"
    if not path.is_file():
        return None
    entry = json.loads(path.read_text())
    if entry.get("settings") != ledger_settings(args) or entry.get("run_flags") != run["flags"]:
        return None
    return entry


def unsampled_steps(entry: dict, run: dict) -> list[int]:
    """The step counts ``run`` is now sampled at that its ledger entry lacks (an ablation whose plan grew): the entry
    stays in the tables, but the run is trained and scored again."""
    have = {row.get("plan_steps", row["steps"]) for row in entry["rows"]}
    return [n for n in run.get("sample_steps", ()) if n not in have]


def write_strip(path: Path, images: list[list]) -> None:
    """``images[plan][crop]`` (``[3, H, W]`` in [0, 1]) as one PNG, a row per plan, no gaps or labels."""
    import torch
    from PIL import Image

    rows = [torch.cat(list(row), dim=2) for row in images]
    array = (torch.cat(rows, dim=1).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def read_strip(path: Path, plans: int, size: int = 64) -> list[list]:
    """The inverse of :func:`write_strip`."""
    import numpy as np
    import torch
    from PIL import Image

    array = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    crops = array.shape[2] // size
    return [[array[:, p * size:(p + 1) * size, c * size:(c + 1) * size] for c in range(crops)] for p in range(plans)]


# ------------------------------------------------------------------------------------------------ evaluation


def sampling_plans(task: str, runs: list[dict]) -> list[dict]:
    """The rows to sample: ``{"method", "run", "steps", "mode", "boundary", "table"[, "start"]}`` for every trained
    run of ``task``, in the paper's order. ControlNet's 8/2/1-step rows come from the first seed only."""
    plans = []
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        if run["task"] == task:
            by_method.setdefault(run["method"], []).append(run)
    for run in by_method.get("controlnet", []):
        plans += [{"method": METHOD_LABELS["controlnet"], "run": run["name"], "steps": n, "mode": "ode",
                   "boundary": False, "table": "main"} for n in ((50, 8, 4, 2, 1) if run["seed"] == 0 else (50, 4))]
    plans += [{"method": METHOD_LABELS["two_stage"], "run": run["name"], "steps": 4, "mode": "consistency",
               "boundary": True, "table": "main"} for run in by_method.get("two_stage", [])]
    for method in ("pe_codi", "codi_lora"):
        plans += [{"method": METHOD_LABELS[method], "run": run["name"], "steps": n, "mode": "ode", "boundary": True,
                   "table": "main"} for run in by_method.get(method, []) for n in (1, 2, 4)]
    plans += [{"method": f"ablation: {run['label']}", "run": run["name"], "steps": n, "mode": "ode",
               "boundary": True, "table": "ablations"}
              for run in by_method.get("ablation", []) for n in run.get("sample_steps", (4,))]
    if task == "sr":
        # Supplementary, not the paper's protocol: start from alpha * bicubic + sigma * noise (the condition as an
        # img2img start) at strength 1 (all 4 steps, from t = 980) and 0.5 (the last 2)
        firsts = {m: next((r["name"] for r in by_method.get(m, []) if r["seed"] == 0), None)
                  for m in ("controlnet", "pe_codi", "codi_lora")}
        for strength in (1.0, 0.5):
            for label, run, boundary in (("base alone", None, False),
                                         ("ControlNet (DDIM)", firsts["controlnet"], False),
                                         ("PE-CoDi", firsts["pe_codi"], True),
                                         ("CoDi + UNet LoRA", firsts["codi_lora"], True)):
                if run is not None or label == "base alone":
                    plans.append({"method": f"start from bicubic, strength {strength}: {label}", "run": run,
                                  "steps": 4, "mode": "ode", "boundary": boundary, "table": "supplementary",
                                  "start": strength})
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


def load_run(work: Path, run: str | None, base_path: Path = BASE, raw: bool = False):
    """``(base, adapter)`` of a trained run (``run`` None: the base alone, adapter None), on a fresh base (a UNet LoRA
    is injected into it); None when the run has no adapter yet. ``raw``: the adapter holds the run's final trainable
    weights instead of their EMA (the saved file), for the EMA check; adapter-only runs."""
    import torch
    from safetensors.torch import load_file

    from trainer.adapters.files import load_adapter
    from trainer.models import load_base_model

    path = None if run is None else adapter_path(work, run)
    if path is not None and not path.is_file():
        print(f"repro: skipping {run}: {path} not trained", flush=True)
        return None
    base = load_base_model(base_path)
    if path is None:
        return base, None
    loaded = load_adapter(base, path)
    if raw:
        if loaded.unet_lora is not None:
            raise SystemExit(f"repro: {run}: the EMA check takes adapter-only runs (this one has a UNet LoRA)")
        weights = load_file(str(raw_weights_path(work, run)))
        with torch.no_grad():
            for name, param in loaded.adapter.trainable_named_parameters():
                param.copy_(weights[f"adapter.{name}"])
    return base, loaded.adapter


def generate(base, adapter, pairs, plan: dict, seed: int, batch: int, grid: int = 50) -> tuple[list, float, int]:
    """Sample every pair with one plan; returns (images in [0, 1], seconds per image, NFE per image)."""
    import torch

    import ccd_sampler as cs
    from trainer.adapters.controlnet import adapted_unet_output, text_conditioning
    from trainer.evaluation.evaluate import reference_timesteps

    timesteps = reference_timesteps(plan["steps"], grid)
    schedule = base.noise_schedule()
    calls = {"n": 0}

    def denoise(z, t, cond):
        calls["n"] += z.shape[0]
        return adapted_unet_output(base.unet, adapter, z, t, cond)

    images, seconds = [], 0.0
    for start in range(0, len(pairs), batch):
        group = list(range(start, min(start + batch, len(pairs))))
        hint = torch.stack([pairs[i].hint for i in group]).float()
        cond = text_conditioning(base.encode_text([""] * len(group)), hint)
        noise = starting_noise(seed, group)
        generator = torch.Generator().manual_seed(seed + 7919 * (start + 1))
        init = {}
        if plan.get("start"):
            init = {"init_image": base.encode_pixels(hint * 2 - 1), "strength": plan["start"]}
        tic = time.perf_counter()
        with torch.no_grad():
            out = cs.sample(denoise, noise, timesteps, base.prediction_type, schedule=schedule, mode=plan["mode"],
                            cond=cond, generator=generator, boundary=plan["boundary"], **init)
        seconds += time.perf_counter() - tic
        images += list((base.decode_latents(out.float()) / 2 + 0.5).clamp(0, 1))
    return images, seconds / len(pairs), calls["n"] // len(pairs)


def colour_statistics(images, targets, noises=None) -> dict:
    """Where an output's colours come from (images in [0, 1], ``[N, 3, H, W]``): the MSE split into the per-image
    mean-colour error and the rest (``mse = mean_colour_mse + rest_mse`` exactly), and the correlation, over images,
    of each output's per-channel mean colour with the target's (per channel and pooled with each channel centred)
    and, given the starting ``noises``, with theirs. A model that takes its colours from the condition has
    correlations near 1 with the target; v1 of the miniature had 1.00 with the noise instead."""
    out_mean, tgt_mean = images.mean(dim=(2, 3)), targets.mean(dim=(2, 3))
    mse = ((images - targets) ** 2).mean()
    colour = ((out_mean - tgt_mean) ** 2).mean()

    def corr(a, b):
        a, b = a - a.mean(0), b - b.mean(0)  # centre each channel over the images
        return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))

    channels = range(out_mean.shape[1])
    per_channel = [corr(out_mean[:, c], tgt_mean[:, c]) for c in channels]
    stats = {"mse": float(mse), "mean_colour_mse": float(colour), "rest_mse": float(mse - colour),
             "colour_share": float(colour / mse) if float(mse) > 0 else 0.0,
             "corr_with_target_mean": corr(out_mean, tgt_mean), "colour_corr": per_channel,
             "colour_corr_min": min(per_channel), "output_mean_colour_std": float(out_mean.std(0).mean())}
    if noises is not None:
        noise_mean = noises.mean(dim=(2, 3))
        stats["corr_with_noise_mean"] = corr(out_mean, noise_mean)
        stats["corr_with_noise_mean_per_channel"] = [corr(out_mean[:, c], noise_mean[:, c]) for c in channels]
    return stats


def score(images, pairs, task: str, feature_net, noises=None) -> dict:
    import torch

    from trainer.evaluation.evaluate import mask_of
    from trainer.evaluation.metrics import masked_psnr, psnr, ssim

    pred = torch.stack(images)
    target = torch.stack([p.target.float() for p in pairs])
    out = {"psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target).mean())}
    composite = None
    if task == "inpaint":
        masks = torch.stack([mask_of(p) for p in pairs])  # the mask the mean-fill baseline fills
        out["masked_psnr"] = float(masked_psnr(pred, target, masks).mean())
        # what an inpainting user gets: the known pixels pasted back over the output (the ComfyUI workflow's
        # ImageCompositeMasked), so only the filled hole is judged
        composite = pred * masks + target * (1 - masks)
    out.update(colour_statistics(pred, target, noises))
    if feature_net is not None:
        import features

        out.update(features.distribution_metrics(feature_net, pred, target))
        if composite is not None:
            pasted = features.distribution_metrics(feature_net, composite, target)
            out.update(fd_patch_composite=pasted["fd_patch"], kd_patch_composite=pasted["kd_patch"])
    return out


def baseline_images(pairs, task: str) -> list:
    import torch

    from trainer.evaluation.evaluate import default_baseline

    mean_colour = torch.stack([p.target.float().flatten(1).mean(1) for p in pairs]).mean(0)
    return [default_baseline(p, task, mean_colour).float().clamp(0, 1) for p in pairs]


BASELINE_NAMES = {"sr": "bicubic", "inpaint": "mean fill", "gray": "grayscale input"}


def score_in_subprocess(run: dict, args) -> None:
    """Score one run in a child process with ``--threads`` torch threads (``--phase score``), so two jobs share the
    cores as two training runs do; its log goes next to the run's."""
    log_dir = args.work / "runs" / run["name"]
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--phase", "score", "--only", run["name"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    print(f"repro: scoring {run['name']}", flush=True)
    with open(log_dir / "score.log", "a") as log:
        code = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"repro: scoring {run['name']} failed (exit {code}); see {log_dir / 'score.log'}")
    for line in (log_dir / "score.log").read_text().splitlines()[-20:]:
        if line.startswith(f"repro: {run['task']} "):
            print(line, flush=True)


def task_pairs(args, data, task: str):
    """The held-out pairs of ``task`` and the starting noise of each (what :func:`generate` starts it from)."""
    pairs = evaluation_pairs(task, data["test"], args.seed)
    return pairs, starting_noise(args.seed, range(len(pairs)))


def score_run(args, data, run: dict, runs: list[dict]) -> dict:
    """Sample and score every plan of one run on its task's held-out pairs; writes and returns its ledger entry."""
    import torch

    sys.path.insert(0, str(HERE))
    import features
    from trainer.evaluation.evaluate import machine_info

    torch.set_num_threads(args.threads)
    start = time.time()
    feature_net = features.load_feature_net(HERE / "featnet" / "feature_net.safetensors")
    task = run["task"]
    pairs, noises = task_pairs(args, data, task)
    name = None if run["method"] == "base" else run["name"]
    models = load_run(args.work, run.get("of", name), args.base, raw=bool(run.get("of")))
    if models is None:
        raise SystemExit(f"repro: {run['name']} has no adapter in {args.work}: train it first")
    grid = int(run["flags"][run["flags"].index("--distill_grid") + 1]) if "--distill_grid" in run["flags"] else 50
    rows, shown = [], []
    for plan in (p for p in sampling_plans(task, runs) if p["run"] == name):
        images, spi, nfe = generate(*models, pairs, plan, args.seed, args.eval_batch, grid)
        seed = run["seed"] if name else None
        row = {"method": plan["method"], "run": name, "seed": seed, "steps": plan["steps"],
               "plan_steps": plan["steps"], "sampler": plan["mode"], "table": plan["table"], "nfe": nfe,
               "seconds_per_image": spi, **score(images, pairs, task, feature_net, noises)}
        if plan.get("start"):
            row["start_strength"] = plan["start"]
            row["steps"] = nfe
        print(f"repro: {task} {plan['method']} {row['steps']} steps (seed {seed}): PSNR {row['psnr']:.2f} "
              f"FD-patch {row['fd_patch']:.2f} colour corr {row['colour_corr_min']:.2f} "
              f"({spi * 1000:.1f} ms/img)", flush=True)
        rows.append(row)
        if seed == 0 and (plan["method"], plan["steps"]) in GRID_METHODS:
            shown.append((f"{row['method']} {row['steps']}", images[:GRID_ROWS]))
    done = args.work / "runs" / run["name"] / "done.json"
    entry = {"run": run["name"], "task": task, "method": run["method"], "seed": run["seed"],
             "run_flags": run["flags"], "settings": ledger_settings(args), "machine": machine_info("cpu"),
             "training": json.loads(done.read_text()) if done.is_file() else None, "rows": rows,
             "score_seconds": time.time() - start,
             "grid": {"file": f"{run['name']}.png", "labels": [label for label, _ in shown]} if shown else None}
    args.ledger.mkdir(parents=True, exist_ok=True)
    if shown:
        write_strip(args.ledger / f"{run['name']}.png", [images for _, images in shown])
    (args.ledger / f"{run['name']}.json").write_text(json.dumps(portable(entry), indent=1))
    return entry


def plan_key(plan_or_row: dict) -> tuple:
    return (plan_or_row["run"], plan_or_row["method"], plan_or_row.get("plan_steps", plan_or_row["steps"]),
            plan_or_row.get("start", plan_or_row.get("start_strength")))


def assemble(args, data, runs: list[dict]) -> tuple[dict, dict]:
    """The tables' data from the ledger: per task the baseline row and every scored run's rows in the paper's order
    (the order of :func:`sampling_plans`), the grid columns, and the runs still missing."""
    sys.path.insert(0, str(HERE))
    import features
    from trainer.evaluation.evaluate import machine_info

    feature_net = features.load_feature_net(HERE / "featnet" / "feature_net.safetensors")
    entries = {r["name"]: ledger_entry(args, r) for r in runs}
    results = {"machine": machine_info("cpu"), "settings": ledger_settings(args), "base": portable(str(args.base)),
               "tasks": {}, "missing": [name for name, entry in entries.items() if entry is None],
               "incomplete": {r["name"]: steps for r in runs
                              if entries[r["name"]] and (steps := unsampled_steps(entries[r["name"]], r))},
               "runs": {name: e["training"] for name, e in entries.items() if e and e["training"]},
               "score_seconds": {name: e["score_seconds"] for name, e in entries.items() if e}}
    grids = {}
    for task in args.tasks:
        pairs, _ = task_pairs(args, data, task)
        base_imgs = baseline_images(pairs, task)
        rows = [{"method": BASELINE_NAMES[task], "steps": 0, "nfe": 0, "table": "main", "seed": None,
                 "seconds_per_image": 0.0, **score(base_imgs, pairs, task, feature_net)}]
        order = {plan_key(p): i for i, p in enumerate(sampling_plans(task, runs))}
        task_entries = [e for r in runs if r["task"] == task and (e := entries[r["name"]]) is not None]
        scored = [row for e in task_entries for row in e["rows"]]
        rows += sorted(scored, key=lambda row: order.get(plan_key(row), len(order)))
        columns = {"condition": [condition_image(p, task) for p in pairs[:GRID_ROWS]],
                   rows[0]["method"]: base_imgs[:GRID_ROWS]}
        shown = {}
        for e in task_entries:
            if e.get("grid"):
                strips = read_strip(args.ledger / e["grid"]["file"], len(e["grid"]["labels"]))
                shown.update(zip(e["grid"]["labels"], strips))
        labels = [f"{r['method']} {r['steps']}" for r in rows if r.get("seed") == 0]
        columns.update((label, shown[label]) for label in dict.fromkeys(labels) if label in shown)
        columns["ground truth"] = [p.target.float() for p in pairs[:GRID_ROWS]]
        results["tasks"][task] = {"pairs": len(pairs), "rows": rows}
        grids[task] = columns
    return results, grids


GRID_ROWS = 6
GRID_METHODS = {("ControlNet (DDIM)", 50), ("ControlNet (DDIM)", 4), ("Two-stage (ControlNet + LCM)", 4),
                ("PE-CoDi", 1), ("PE-CoDi", 4), ("CoDi + UNet LoRA", 4)}


def condition_image(pair, task: str):
    """What the grid's first column shows: the hint (SR: the degraded low-res upsampled; inpaint: grey holes)."""
    hint = pair.hint.float()
    return hint.clamp(0, 1) if task != "inpaint" else hint.where(hint >= 0, 0.5)


# ------------------------------------------------------------------------------------------------ tables, verdicts

METRICS = ("psnr", "ssim", "masked_psnr", "fd_patch", "fd_patch_composite", "kd_patch", "colour_corr_min")
METRIC_HEADS = {"psnr": "PSNR", "masked_psnr": "PSNR in mask", "fd_patch": "FD-patch",
                "fd_patch_composite": "FD-patch, known pixels pasted back"}


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows of one (method, steps, table) over seeds: ``{metric: (mean, std, n, {seed: value})}`` (the values by
    seed for :func:`compare`'s paired test) plus the method's facts."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["table"], row["method"], row["steps"]), []).append(row)
    out = []
    for (table, method, steps), group in groups.items():
        entry = {"table": table, "method": method, "steps": steps, "n": len(group), "nfe": group[0]["nfe"],
                 "sampler": group[0].get("sampler"),
                 "seconds_per_image": statistics.fmean([r["seconds_per_image"] for r in group])}
        for metric in METRICS:
            values = [r[metric] for r in group if metric in r]
            if values:
                by_seed = {r.get("seed"): r[metric] for r in group if metric in r}
                entry[metric] = (statistics.fmean(values), std(values), len(values), by_seed)
        out.append(entry)
    return out


def std(values) -> float:
    """The sample standard deviation over seeds; 0 for a single seed (its spread is unknown, see :func:`compare`)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def cell(entry: dict, metric: str, digits: int = 2, scale: float = 1.0) -> str:
    if metric not in entry:
        return "–"
    m, s, n, _ = entry[metric]
    text = f"{m * scale:.{digits}f}"
    return f"{text} ± {s * scale:.{digits}f}" if n > 1 else text


def compare(a: dict, b: dict, metric: str = "psnr", higher_is_better: bool = True, paired: bool = False) -> dict:
    """``a`` against ``b`` on ``metric``: the difference of the means and its standard error. ``better`` when the
    difference exceeds two standard errors in ``a``'s favour, ``worse`` the other way, else ``tie``.

    By default the error comes from each row's seed-to-seed spread (a single-seed row borrows the other row's).
    ``paired`` is for a one-flag variant of a method against the method itself (the ablations): at one seed both
    train from the same initial weights on the same data order and are scored from the same noise, so ``a`` is
    compared with ``b`` at the seeds both have. At two or more such seeds the difference is the mean of the per-seed
    differences and its error their spread; at one seed it is the difference at that seed, with the error of one
    seed against one seed (the rows' spread, as unpaired). Set against ``b``'s mean instead, a single-seed variant
    would inherit its seed's luck (on SR, seed 0 was PE-CoDi's best, which flattered every seed-0 ablation)."""
    sign = 1 if higher_is_better else -1
    (ma, sa, na, a_seeds), (mb, sb, nb, b_seeds) = a[metric], b[metric]
    common = sorted((set(a_seeds) & set(b_seeds)) - {None}) if paired else []
    sa, sb = (sa or sb), (sb or sa)
    if len(common) > 1:
        diffs = [sign * (a_seeds[s] - b_seeds[s]) for s in common]
        diff, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    elif common:
        diff, se = sign * (a_seeds[common[0]] - b_seeds[common[0]]), math.sqrt(sa ** 2 + sb ** 2)
    else:
        diff, se = sign * (ma - mb), math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    verdict = "better" if diff > 2 * se and se > 0 else "worse" if diff < -2 * se and se > 0 else "tie"
    if se == 0:  # one seed on both sides: call only differences larger than 0.5 dB (PSNR) / 10 % (others)
        margin = 0.5 if metric in ("psnr", "masked_psnr") else 0.1 * abs(mb)
        verdict = "better" if diff > margin else "worse" if diff < -margin else "tie"
    return {"difference": diff, "standard_error": se, "verdict": verdict, "paired_seeds": common}


def find(entries, method: str, steps: int, table: str = "main"):
    return next((e for e in entries if e["method"] == method and e["steps"] == steps and e["table"] == table), None)


def claim_verdict(kind: str, psnr: dict, fd: dict) -> str:
    """One verdict from PSNR and FD-patch together (the paper argues with both: PSNR for fidelity, FID for realism).

    ``better`` claims: each metric says better / tie / worse (:func:`compare`); the claim holds when one is better
    and neither worse, is the opposite when one is worse and neither better, is not shown when both tie, and is
    mixed when they disagree. ``approx`` claims ("within 0.5 dB of"): PSNR not significantly more than 0.5 dB below,
    and FD-patch not significantly worse."""
    if kind == "approx":
        psnr_ok = psnr["difference"] + 2 * psnr["standard_error"] >= -0.5
        fd_ok = fd["verdict"] != "worse"
        if psnr_ok and fd_ok:
            return "holds"
        if psnr_ok or fd_ok:
            return "mixed: " + ("PSNR within 0.5 dB, FD-patch worse" if psnr_ok else "PSNR more than 0.5 dB lower, "
                                "FD-patch not worse")
        return "does not hold"
    calls = {psnr["verdict"], fd["verdict"]}
    if calls == {"better", "worse"}:
        return f"mixed: PSNR {psnr['verdict']}, FD-patch {fd['verdict']}"
    if "better" in calls:
        return "holds"
    if "worse" in calls:
        return "opposite"
    return "not shown (within the spread)"


def claim_metrics(entries: list[dict], task: str) -> tuple[str, str]:
    """The fidelity and realism metrics a task's claims are judged on: PSNR and FD-patch, except for inpainting,
    where what a user keeps is the filled hole (the known pixels are pasted back): PSNR inside the mask and FD-patch
    of the composite (when every row has them; ledger entries scored before the composite metric lack it)."""
    if task == "inpaint" and all("fd_patch_composite" in e for e in entries if e.get("steps")):
        return "masked_psnr", "fd_patch_composite"
    return "psnr", "fd_patch"


def verdicts(entries: list[dict], task: str) -> list[dict]:
    """The paper's claims checked on one task's table (fidelity and realism, :func:`claim_metrics`, with the seed
    spread)."""
    cn50, cn4 = find(entries, METHOD_LABELS["controlnet"], 50), find(entries, METHOD_LABELS["controlnet"], 4)
    pe4, lora4 = find(entries, "PE-CoDi", 4), find(entries, "CoDi + UNet LoRA", 4)
    two4 = find(entries, METHOD_LABELS["two_stage"], 4)
    fidelity, realism = claim_metrics(entries, task)
    out = []

    def add(claim, a, b, kind):
        if a is None or b is None:
            return
        psnr, fd = compare(a, b, fidelity), compare(a, b, realism, higher_is_better=False)
        out.append({"task": task, "claim": claim, "a": a["method"], "b": b["method"], "psnr": psnr, "fd_patch": fd,
                    "metrics": [fidelity, realism], "verdict": claim_verdict(kind, psnr, fd)})

    for name, entry in (("CoDi + UNet LoRA", lora4), ("PE-CoDi", pe4)):
        add(f"{name} at 4 steps within 0.5 dB of ControlNet at 50", entry, cn50, "approx")
        add(f"{name} at 4 steps better than ControlNet at 4", entry, cn4, "better")
    add("PE-CoDi at 4 steps better than the two-stage baseline at 4", pe4, two4, "better")
    return out


def ablation_verdicts(entries: list[dict], task: str) -> list[dict]:
    """A task's ablations (SR: the paper's; every task: the EMA check) against the PE-CoDi default at the same step
    count (4; eps-space consistency also 1 and 2, ``ABLATION_STEPS``), on the task's :func:`claim_metrics`, with the
    paper's direction for the ablated variant where it reports one, compared at the seeds both have (:func:`compare`,
    ``paired``)."""
    fidelity, realism = claim_metrics(entries, task)
    expected = {"ODE model = frozen base": "worse", "eps-space consistency": "better", "one t per sample": "worse",
                "lambda = 0.1": None, "grid N = 20": None, NO_EMA_LABEL: None}
    out = []
    for label, direction in expected.items():
        for steps in (1, 2, 4):
            entry, reference = find(entries, f"ablation: {label}", steps, "ablations"), find(entries, "PE-CoDi", steps)
            if entry is None or reference is None:
                continue
            psnr = compare(entry, reference, fidelity, paired=True)
            fd = compare(entry, reference, realism, higher_is_better=False, paired=True)
            out.append({"ablation": label, "steps": steps, "paper": direction, "psnr": psnr, "fd_patch": fd,
                        "seeds": entry["n"], "metrics": [fidelity, realism]})
    return out


def markdown_tables(results: dict) -> str:
    out = []
    runs, scoring = results.get("runs", {}), results.get("score_seconds", {})
    if runs or scoring:
        # seconds per step x steps: a resumed run's own timing covers only its last call
        training = sum((r.get("seconds_per_step") or 0) * r.get("steps", 0) for r in runs.values())
        out.append(f"Ledger: {len(scoring)} runs scored ({len(runs)} trained: {training / 3600:.2f} h of one-thread "
                   f"training, {sum(scoring.values()) / 3600:.2f} h of one-thread scoring).\n")
    if results.get("missing"):
        out.append(f"**Not measured yet** (not in the ledger): {', '.join(results['missing'])}.\n")
    if results.get("incomplete"):
        out.append("**Not sampled yet** at every step count of its plan (in the ledger with fewer): "
                   + ", ".join(f"{name} at {', '.join(map(str, steps))} steps"
                               for name, steps in results["incomplete"].items()) + ".\n")
    for task, data in results["tasks"].items():
        entries = aggregate(data["rows"])
        extra = task == "inpaint"
        name = TASK_NAMES[task]
        for table, title in (("main", name), ("ablations", f"{name}: ablations (PE-CoDi with one setting changed)"),
                             ("supplementary", f"{name}, supplementary: sampling from alpha * bicubic + sigma * noise "
                                               "(not the paper's protocol)")):
            rows = [e for e in entries if e["table"] == table]
            if not rows:
                continue
            out.append(f"### {title} ({data['pairs']} held-out crops)\n")
            out.append("| Steps | Method | seeds | PSNR ↑ | SSIM ↑ |" + (" PSNR in mask ↑ |" if extra else "")
                       + " FD-patch ↓ |" + (" FD-patch, known pixels pasted back ↓ |" if extra else "")
                       + " KD-patch ×1000 ↓ | colour corr. (min channel) ↑ | NFE | ms / image |")
            out.append("|---|---|---|---|---|" + ("---|---|" if extra else "") + "---|---|---|---|---|")
            for e in rows:
                steps = "–" if not e["steps"] else str(e["steps"])
                method = e["method"] + (" (LCM sampler)" if e.get("sampler") == "consistency" else "")
                out.append(f"| {steps} | {method} | {e['n'] if e['steps'] else '–'} | {cell(e, 'psnr')} | "
                           f"{cell(e, 'ssim', 4)} |" + (f" {cell(e, 'masked_psnr')} |" if extra else "")
                           + f" {cell(e, 'fd_patch')} |" + (f" {cell(e, 'fd_patch_composite')} |" if extra else "")
                           + f" {cell(e, 'kd_patch', 1, 1000)} | "
                           f"{cell(e, 'colour_corr_min')} | {e['nfe']} | {e['seconds_per_image'] * 1000:.1f} |")
            out.append("")
        checks = verdicts(entries, task)
        if checks:
            out.append(f"#### {name}: the paper's claims (differences ± their standard error over seeds; a row with "
                       "one seed borrows the other's spread, and with one seed on both sides only differences over "
                       "0.5 dB PSNR / 10 % FD-patch are called: indicative only. The verdict weighs both metrics: "
                       "holds when one is better and neither worse, mixed when they disagree)\n")
            fidelity, realism = (METRIC_HEADS[m] for m in checks[0]["metrics"])
            out.append(f"| claim | {fidelity} difference | {realism} difference (positive = first is better) | "
                       "verdict |")
            out.append("|---|---|---|---|")
            for c in checks:
                out.append(f"| {c['claim']} | {c['psnr']['difference']:+.2f} ± {c['psnr']['standard_error']:.2f} | "
                           f"{c['fd_patch']['difference']:+.2f} ± {c['fd_patch']['standard_error']:.2f} | "
                           f"{c['verdict']} |")
            out.append("")
        ablations = ablation_verdicts(entries, task)
        if ablations:
            fidelity, realism = (METRIC_HEADS[m] for m in ablations[0]["metrics"])
            out.append(f"#### {name}: ablations against PE-CoDi\n")
            out.append("(each ablation against PE-CoDi at the same seeds, where the two share initial weights, data "
                       "order and sampling noise: with several seeds the mean of the per-seed differences ± its "
                       "standard error, with one seed the difference at that seed ± the error of one seed against "
                       "one, from PE-CoDi's seed-to-seed spread)\n")
            out.append(f"| ablation | steps | seeds | {fidelity} difference | {realism} difference (positive = "
                       f"ablation is better) | verdict ({fidelity} / {realism}, vs the spread) | paper's direction "
                       "for the ablated variant |")
            out.append("|---|---|---|---|---|---|---|")
            for a in ablations:
                seeds = a["psnr"]["paired_seeds"]
                seeds = ", ".join(map(str, seeds)) if seeds else a["seeds"]
                out.append(f"| {a['ablation']} | {a['steps']} | {seeds} | "
                           f"{a['psnr']['difference']:+.2f} ± {a['psnr']['standard_error']:.2f} | "
                           f"{a['fd_patch']['difference']:+.2f} ± {a['fd_patch']['standard_error']:.2f} | "
                           f"{a['psnr']['verdict']} / {a['fd_patch']['verdict']} | {a['paper'] or '–'} |")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = prepare_data(args)
    runs = run_table(args.tasks, args.quick)
    wanted = set(args.only.split(",")) if args.only else None
    chosen = [r for r in runs if wanted is None or r["name"] in wanted]
    if args.phase == "score":
        for run in chosen:
            score_run(args, data, run, runs)
        return 0
    if args.phase != "tables":
        run_all(chosen, args, data)
    if args.phase == "train":
        return 0
    results, grids = assemble(args, data, runs)
    results["verdicts"] = {task: verdicts(aggregate(d["rows"]), task) for task, d in results["tasks"].items()}
    results["ablation_verdicts"] = {task: ablation_verdicts(aggregate(d["rows"]), task)
                                    for task, d in results["tasks"].items()}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"mini_repro{args.suffix}_metrics.json").write_text(json.dumps(portable(results), indent=1))
    (args.results / f"mini_repro{args.suffix}_tables.md").write_text(markdown_tables(results))
    from trainer.evaluation.report import write_image_grid

    for task, columns in grids.items():
        rows = [list(images) for images in zip(*columns.values())]
        write_image_grid(list(columns), rows, args.results / f"mini_repro{args.suffix}_{task}.png", header_lines=2)
    missing = f"; not yet in the ledger: {', '.join(results['missing'])}" if results["missing"] else ""
    print(f"repro: wrote {args.results / f'mini_repro{args.suffix}_metrics.json'}, the tables and the grids "
          f"({time.time() - start:.0f} s){missing}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
