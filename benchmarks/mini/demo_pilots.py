#!/usr/bin/env python
"""Pilots of ``make demo``'s recipe: would a longer distillation or another weight λ of the ‖f − x‖² term
(``--guidance_weight``) make CoDi sampled *from pure noise* keep the photo's colours and beat bicubic on FD-patch?

    .venv/bin/python benchmarks/mini/demo_pilots.py --work /tmp/pilot_default --steps 600 --threads 2
    .venv/bin/python benchmarks/mini/demo_pilots.py --work /tmp/pilot_lambda10 --steps 300 --threads 1 \\
        --label "lambda = 10" --flags="--guidance_weight 10"

Each pilot trains the demo's recipe (``demo.train_argv``: the same data, seed, batch, learning rate and steps per
chunk) plus ``--flags`` in chunks of ``--chunk`` steps, resuming each chunk from the previous one's full training
state (exact: the trainer's resume continues as if it had never stopped), and scores the EMA adapter after every
chunk exactly as the demo does (``demo.write_demo_report``: 64 held-out crops, CoDi at 1, 2 and 4 steps from noise,
4 steps from the bicubic upscale at strength 0.5, against bicubic). A chunk already scored in ``--work`` is skipped,
so a pilot resumes where it stopped and can be extended with a larger ``--steps``. The scores go into
``benchmarks/results/mini_demo_pilots.json`` under ``--label`` and the table ``mini_demo_pilots.md`` is rewritten.

The thread count changes the order of float sums and so the whole training trajectory, which on this miniature
moves the from-noise rows by 10-30 FD-patch points; compare pilots with that in mind (the table names the threads).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

import demo  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="demo_pilots.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="the pilot's folder (data, states, scores)")
    p.add_argument("--steps", type=int, default=600, help="train up to this many steps (default 600)")
    p.add_argument("--chunk", type=int, default=300, help="score every N steps (default 300)")
    p.add_argument("--flags", default="", help="trainer flags added to the demo's recipe, e.g. '--guidance_weight 10'")
    p.add_argument("--label", default="demo recipe", help="the pilot's name in the results")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--train_crops", type=int, default=1024, help="the demo's training crops (default 1024)")
    p.add_argument("--test_crops", type=int, default=64, help="the demo's held-out crops scored (default 64)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and the table go")
    args = p.parse_args(argv)
    for name in ("steps", "chunk", "threads", "train_crops", "test_crops"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def run_pilot(args) -> list[dict]:
    """Train and score chunk by chunk; returns one record per chunk (steps, scores per method, machine)."""
    import torch

    from trainer.training.main import main as train_main
    from trainer.training.state import latest_step_state

    torch.set_num_threads(args.threads)
    out = args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = demo.parse_args(["--out", str(out), "--train_crops", str(args.train_crops),
                              "--test_crops", str(args.test_crops)])
    train_dir, test_dir = demo.make_data(recipe, out)
    extra = shlex.split(args.flags)
    records = []
    for target in range(args.chunk, args.steps + 1, args.chunk):
        scored = out / f"eval_{target:05d}"
        recipe.steps = target
        argv = [*demo.train_argv(recipe, train_dir, test_dir), *extra]
        adapter = out / f"{demo.OUTPUT_NAME}-step{target:08d}.safetensors"
        seconds = None
        if not adapter.is_file():
            state = latest_step_state(out, demo.OUTPUT_NAME)
            resume = ["--resume", str(state)] if state is not None else []
            print(f"demo_pilots: {args.label}: training to step {target}" +
                  (f" from {state.name}" if state else ""), flush=True)
            t0 = time.perf_counter()
            code = train_main([*argv, "--save_every_n_steps", str(args.chunk), "--save_state", *resume])
            if code != 0:
                raise SystemExit(f"demo_pilots: the trainer stopped with exit code {code}")
            seconds = time.perf_counter() - t0
            # the last step of a run is saved under the run's own name: keep it as this chunk's resume point
            shutil.copytree(out / f"{demo.OUTPUT_NAME}-state", out / f"{demo.OUTPUT_NAME}-step{target:08d}-state",
                            dirs_exist_ok=True)
            shutil.copy(out / f"{demo.OUTPUT_NAME}.safetensors", adapter)
        if not (scored / "metrics.json").is_file():
            scored.mkdir(exist_ok=True)
            report_args = argparse.Namespace(**{**vars(recipe), "out": scored})
            info = {"train_steps": target, "train_crops": recipe.train_crops, "test_crops": recipe.test_crops,
                    "seed": recipe.seed, "test_photos": [], "threads": args.threads, "pilot_flags": extra,
                    "train_seconds_this_run": seconds}
            demo.write_demo_report(report_args, argv, adapter, info)
        metrics = json.loads((scored / "metrics.json").read_text())
        psnr = {row["method"]: row["psnr"] for row in metrics["rows"]}
        scores = {method: {"psnr": psnr[method], **values}
                  for method, values in metrics["settings"]["fd_patch_and_colour"].items()}
        records.append({"steps": target, "scores": scores, "machine": metrics.get("machine")})
        print(f"demo_pilots: {args.label}, step {target}: " + ", ".join(
            f"{m} FD-patch {v['fd_patch']:.1f} colour {v['colour_corr_min']:.2f}" for m, v in scores.items()),
            flush=True)
    return records


def write_results(results: Path, label: str, entry: dict) -> None:
    """Merge ``entry`` under ``label`` into ``mini_demo_pilots.json`` and rewrite ``mini_demo_pilots.md``."""
    path = results / "mini_demo_pilots.json"
    pilots = json.loads(path.read_text()) if path.is_file() else {}
    pilots[label] = entry
    path.write_text(json.dumps(pilots, indent=1) + "\n")
    methods = ["bicubic", "CoDi 1 step", "CoDi 4 steps", "CoDi 4, bicubic start 0.5"]
    lines = ["# `make demo` recipe pilots (`benchmarks/mini/demo_pilots.py`)", "",
             "64 held-out crops, 4x SR on the v2 mini base; FD-patch ↓ / lowest-channel mean-colour correlation ↑ "
             "per row. Made by `demo_pilots.py` (its docstring has the commands).", "",
             "| pilot | trainer flags added | CPU, threads | steps | " + " | ".join(methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for name, pilot in pilots.items():
        for record in pilot["chunks"]:
            cells = [f"{record['scores'][m]['fd_patch']:.1f} / {record['scores'][m]['colour_corr_min']:.2f}"
                     for m in methods]
            cpu = (record.get("machine") or {}).get("cpu", "?")
            lines.append(f"| {name} | `{' '.join(pilot['flags']) or '–'}` | {cpu}, {pilot['threads']} | "
                         f"{record['steps']} | " + " | ".join(cells) + " |")
    (results / "mini_demo_pilots.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    records = run_pilot(args)
    write_results(args.results, args.label, {"flags": shlex.split(args.flags), "threads": args.threads,
                                             "chunk": args.chunk, "chunks": records})
    print(f"demo_pilots: {args.label}: {len(records)} chunks -> {args.results / 'mini_demo_pilots.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
