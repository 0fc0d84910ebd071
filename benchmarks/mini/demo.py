#!/usr/bin/env python
"""``make demo``: distill a 4x super-resolution CoDi adapter from the miniature pixel-space base model
(``benchmarks/mini/base_v2``: v-prediction on a zero-terminal-SNR schedule) on the bundled real photos and score it on
held-out photos.

    .venv/bin/python benchmarks/mini/demo.py        # what `make demo` runs (CPU; a CUDA GPU is used if present)
    .venv/bin/python benchmarks/mini/demo.py --steps 2 --train_crops 16 --test_crops 2 --out /tmp/demo   # a smoke run

Steps:

1. data: seeded 64x64 crops (``photos.write_crops``) of the base's **train** split (``--train_crops`` 1024, seed
   ``--seed``) and of its held-out **test** split (``--test_crops`` 64, seed ``--seed`` + 1) as PNGs in
   ``<out>/data/train`` and ``<out>/data/test``;
2. training: ``trainer.training.main.main`` with the benchmark's PE-CoDi SR settings (task ``sr`` at scale 4 with the
   trainer's degradation chain, ControlNet adapter with a 16,32 hint CNN, batch 8, ``--steps`` 200, lr 1e-3, EMA 0.99)
   and the trainer's default ε-space consistency (the benchmark's own runs pin x-space, the default they were trained
   with, ``repro.LEDGER_CONSISTENCY``). 200 steps keep ``make demo`` within ten minutes on two cores from a fresh
   clone, set-up included; the pilots of ``demo_pilots.py`` found that training longer (up to 900 steps) or weighting
   the ‖f − x‖² term more (λ = 3, 10; 600 steps) does not make CoDi from pure noise keep the photo's colours either;
   a resumable state is saved every ``--save_every`` (50) steps, so an interrupted demo continues from the last
   one. When ``<out>/codi_sr4x_demo.safetensors`` is already there (from a run with the same settings), training is
   skipped;
3. report (``trainer/evaluation``, the code behind ``train.py --quality_report``): the EMA adapter at 1, 2 and 4 CoDi
   steps from noise, and its 4-step grid started from the bicubic upsample at strength 0.5 (the last 2 steps), vs
   bicubic upsampling on the test crops (the trainer's validation pairs, with the degraded low-res image each hint was
   made from, shown in the grid's first column), scored with PSNR, SSIM, FD-patch (the benchmark's patch-feature
   Fréchet distance, ``features.py``) and the per-image mean-colour correlation with the ground truth:
   ``report.md``, ``grid.png``, ``quality_vs_steps.png`` and ``metrics.json`` in ``<out>``.

Threads: ``--threads``, else ``$OMP_NUM_THREADS`` when set, else ``os.cpu_count()``.
"""

from __future__ import annotations

import os
import sys

# Never reach the network: every model comes from local files (as trainer/train.py does).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

BASE = HERE / "base_v2"
FEATURE_NET = HERE / "featnet" / "feature_net.safetensors"
OUTPUT_NAME = "codi_sr4x_demo"
SR_SCALE = 4
RESOLUTION = 64
REPORT_STEPS = (1, 2, 4)
HINT_START = (0.5,)  # the 4-step grid started from the bicubic upsample: the last round(0.5 * 4) = 2 steps
# What the user should see (the console and the report say it in one sentence).
EXPECTATION = ("What you should see: the adapter started from the bicubic upscale (4-step grid, strength 0.5: 2 "
               "network calls) keeps the photo's colours and beats bicubic on FD-patch (sharper, more photo-like "
               "texture, so PSNR stays below bicubic's), while CoDi from pure noise after this short distillation "
               "still gets colours and detail wrong; the base is a 3.8M-parameter pixel-space model pretrained here, "
               "not Stable Diffusion.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "demo", help="output folder (default outputs/demo)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--train_crops", type=int, default=1024, help="64x64 training crops of the train photos")
    p.add_argument("--test_crops", type=int, default=64, help="64x64 crops of the held-out test photos to score")
    p.add_argument("--seed", type=int, default=0, help="training seed and train-crop seed (test crops: seed + 1)")
    p.add_argument("--save_every", type=int, default=50,
                   help="save a resumable training state every N steps (default 50)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $OMP_NUM_THREADS when set, else the number of CPU cores)")
    args = p.parse_args(argv)
    for name in ("steps", "train_crops", "test_crops", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def thread_count(requested: int | None) -> int:
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


def train_argv(args, train_dir: Path, test_dir: Path) -> list[str]:
    """The trainer's flags: the benchmark's PE-CoDi SR settings (``repro.COMMON``, batch, learning rate); every other
    flag, the consistency space included, at the trainer's default."""
    from repro import BATCH_SIZE, COMMON, LEARNING_RATE, TASK_FLAGS

    return ["--pretrained_model_name_or_path", str(BASE), "--train_data_dir", str(train_dir),
            "--validation_data_dir", str(test_dir), *TASK_FLAGS["sr"], *COMMON,
            "--train_batch_size", str(BATCH_SIZE), "--max_train_steps", str(args.steps),
            "--learning_rate", str(LEARNING_RATE),
            "--seed", str(args.seed), "--output_dir", str(args.out), "--output_name", OUTPUT_NAME]


def save_argv(every: int) -> list[str]:
    """Resume points: the adapter and the full training state every ``every`` steps, the last two kept."""
    return ["--save_every_n_steps", str(every), "--save_state", "--save_last_n_steps", str(every)]


def remove_step_saves(out: Path) -> None:
    """The intermediate ``-stepNNNNNNNN`` adapters and states are resume points only (and ``-last-good`` is what a
    run stopped by a non-finite loss left behind): drop them once training has ended."""
    for path in [*out.glob(f"{OUTPUT_NAME}-step*"), *out.glob(f"{OUTPUT_NAME}-last-good*")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def adapter_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        from ccd_sampler.metadata import read_safetensors_header

        read_safetensors_header(str(path))
    except Exception:  # a truncated or foreign file: train again
        return False
    return True


def make_data(args, out: Path) -> tuple[Path, Path]:
    import photos

    split = json.loads((BASE / "split.json").read_text())
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    print(f"demo: {args.train_crops} training crops of {len(split['train'])} photos -> {train_dir}", flush=True)
    photos.write_crops(split["train"], train_dir, args.train_crops, seed=args.seed, size=RESOLUTION)
    print(f"demo: {args.test_crops} test crops of the held-out photos ({', '.join(split['test'])}) -> {test_dir}",
          flush=True)
    photos.write_crops(split["test"], test_dir, args.test_crops, seed=args.seed + 1, size=RESOLUTION)
    return train_dir, test_dir


def eval_pairs(argv: list[str]) -> list:
    """The trainer's validation pairs for ``argv`` (the same targets and hints its ``--quality_report`` scores), each
    with the degraded low-res image its hint was upsampled from (drawn again from the same generator, and checked)."""
    import dataclasses

    import numpy as np
    import torch

    import ccd_sampler.hints as hints
    from trainer.data.conditions import image_to_tensor
    from trainer.data.dataset import build_datasets
    from trainer.evaluation.evaluate import validation_pairs
    from trainer.training.config import parse_args as trainer_args
    from trainer.training.settings import Settings

    _train, validation = build_datasets(Settings.from_args(trainer_args(argv)).data, (RESOLUTION, RESOLUTION))
    pairs = []
    for index, pair in enumerate(validation_pairs(validation)):
        pixels = (pair.target.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        builder = validation.builder(validation.items[index])
        low_res = image_to_tensor(builder.degrade_to_low_res(pixels, validation.condition_rng(index, 0)))
        if not torch.allclose(hints.sr_hint(low_res, SR_SCALE)[0], pair.hint, atol=1e-5):
            raise RuntimeError(f"demo: the low-res image of {validation.items[index].image_path.name} does not "
                               "reproduce the trainer's hint")
        pairs.append(dataclasses.replace(pair, low_res=low_res[0]))
    return pairs


def distribution_scores(result) -> dict[str, dict]:
    """FD-patch (``features.distribution_metrics``, the benchmark's feature net) and the lowest per-channel
    correlation of each output's mean colour with its ground truth's (``repro.colour_statistics``), per row."""
    import torch

    import features
    from repro import colour_statistics

    net = features.load_feature_net(FEATURE_NET)
    target = torch.stack(result.targets)
    scores = {}
    for method, images in result.images.items():
        pred = torch.stack(images)
        scores[method] = {"fd_patch": features.distribution_metrics(net, pred, target)["fd_patch"],
                          "colour_corr_min": colour_statistics(pred, target)["colour_corr_min"]}
    return scores


def distribution_table(scores: dict[str, dict]) -> str:
    lines = ["| method | FD-patch ↓ | mean-colour correlation with the ground truth (lowest channel) ↑ |",
             "|---|---|---|"]
    lines += [f"| {m} | {v['fd_patch']:.2f} | {v['colour_corr_min']:.2f} |" for m, v in scores.items()]
    return "\n".join(lines)


def write_demo_report(args, argv: list[str], adapter_path: Path, info: dict) -> tuple[dict, object]:
    import torch

    from trainer.adapters.files import load_adapter
    from trainer.evaluation.evaluate import evaluate_adapter
    from trainer.evaluation.report import write_report
    from trainer.models import load_base_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(BASE)
    loaded = load_adapter(base, adapter_path)
    adapter, codi = loaded.adapter, loaded.codi
    base.unet.to(device)
    adapter.to(device)
    pairs = eval_pairs(argv)
    print(f"demo: scoring the adapter on {len(pairs)} held-out crops at {', '.join(map(str, REPORT_STEPS))} steps",
          flush=True)
    result = evaluate_adapter(base, adapter, pairs, task="sr", steps=REPORT_STEPS, grid=codi.distill_grid,
                              sampler_mode=codi.sampler_mode, boundary=codi.boundary, sigma_data=codi.sigma_data,
                              timestep_scaling=codi.timestep_scaling, seed=args.seed, cfg=codi.recommended_cfg,
                              device=device, progress=False, hint_start=HINT_START)
    distribution = distribution_scores(result)
    result.settings["fd_patch_and_colour"] = distribution
    result.settings["adapter_file"] = adapter_path.name
    result.settings["base_model"] = str(BASE.relative_to(REPO))  # no machine-specific path in the report
    result.settings["demo"] = info
    lines = [f"Adapter `{adapter_path.name}`: PE-CoDi (ControlNet, hint CNN 16,32) distilled for {info['train_steps']} "
             f"steps at batch 8 from the miniature pixel-space base `benchmarks/mini/base_v2` (64x64, pretrained in "
             f"this repository; not Stable Diffusion) on {info['train_crops']} crops of the train photos; scored on "
             f"{info['test_crops']} crops of the held-out photos ({', '.join(info['test_photos'])}). The low-res "
             "inputs are the trainer's `sr` degradation (blur, downscale, noise, JPEG) of the ground truth; column 1 "
             "shows them nearest-upscaled.", "", distribution_table(distribution), "", EXPECTATION, "",
             "Made by `make demo` (`benchmarks/mini/demo.py`)."]
    paths = write_report(result, args.out, title="CoDi demo: 4x super-resolution on the miniature base",
                         extra_lines=lines)
    return paths, result


def main(argv=None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    args.out = args.out.resolve()
    threads = thread_count(args.threads)
    import torch

    torch.set_num_threads(threads)
    print(f"demo: 4x super-resolution CoDi adapter from the miniature base -> {args.out} ({threads} torch threads)",
          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = make_data(args, args.out)
    argv_train = train_argv(args, train_dir, test_dir)

    adapter = args.out / f"{OUTPUT_NAME}.safetensors"
    recipe = {"steps": args.steps, "train_crops": args.train_crops, "seed": args.seed, "trainer_argv": argv_train}
    recipe_path = args.out / "demo_settings.json"
    previous = json.loads(recipe_path.read_text()) if recipe_path.is_file() else None
    if previous is not None and previous != recipe:
        print("demo: the settings differ from the previous run in this folder: training from scratch", flush=True)
        remove_step_saves(args.out)
        shutil.rmtree(args.out / f"{OUTPUT_NAME}-state", ignore_errors=True)
        adapter.unlink(missing_ok=True)
    recipe_path.write_text(json.dumps(recipe, indent=1) + "\n")

    train_seconds, resumed = None, None
    if previous == recipe and adapter_complete(adapter):
        print(f"demo: {adapter.name} is already trained: skipping training, rewriting the report", flush=True)
        remove_step_saves(args.out)  # left behind when the previous run stopped right after training
        training = "skipped (adapter already trained)"
    else:
        from trainer.training.main import main as train_main
        from trainer.training.state import latest_step_state

        state = latest_step_state(args.out, OUTPUT_NAME)
        argv = [*argv_train, *save_argv(args.save_every)]
        if state is not None:
            resumed = state.name
            print(f"demo: resuming from {state.name}", flush=True)
            argv += ["--resume", str(state)]
        print(f"demo: training {args.steps} steps", flush=True)
        t0 = time.perf_counter()
        code = train_main(argv)
        train_seconds = time.perf_counter() - t0
        if code != 0:
            print(f"demo: error: the trainer stopped with exit code {code}", file=sys.stderr, flush=True)
            return code
        remove_step_saves(args.out)
        training = f"{train_seconds / 60:.1f} min" + (f" (resumed from {resumed})" if resumed else "")

    split = json.loads((BASE / "split.json").read_text())
    info = {"train_steps": args.steps, "train_crops": args.train_crops, "test_crops": args.test_crops,
            "seed": args.seed, "test_seed": args.seed + 1, "test_photos": split["test"], "threads": threads,
            "train_seconds_this_run": train_seconds, "resumed_from": resumed}
    paths, result = write_demo_report(args, argv_train, adapter, info)
    total = time.perf_counter() - start

    def rel(path) -> str:
        try:
            return str(Path(path).resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    rows = [result.rows[0], *[r for r in result.rows if r.kind in ("codi", "hint_start")]]
    scores = result.settings["fd_patch_and_colour"]
    print("\n" + "=" * 72)
    print(f"CoDi demo done in {total / 60:.1f} min (training: {training}).")
    print(f"  adapter  {rel(adapter)}")
    print(f"  grid     {rel(paths['grid'])}")
    print("           (low-res input | bicubic | CoDi 1, 2, 4 steps | CoDi 4 bicubic start | ground truth)")
    print(f"  plot     {rel(paths['plot'])}")
    print(f"  metrics  {rel(paths['metrics'])}   (report: {rel(paths['report'])})")
    print(f"\n  {len(result.pair_names)} held-out 64x64 crops, 4x super-resolution from 16x16:")
    print(f"  {'method':<30}{'PSNR':>6}{'SSIM':>7}{'FD-patch':>9}{'colour':>7}")
    for row in rows:
        score = scores[row.method]
        print(f"  {row.method:<30}{row.psnr:>6.2f}{row.ssim:>7.3f}{score['fd_patch']:>9.2f}"
              f"{score['colour_corr_min']:>7.2f}")
    print("  (PSNR in dB; FD-patch: lower is better; colour: correlation of each output's mean colour with the "
          "ground truth's)")
    print("\n" + textwrap.fill(EXPECTATION, 72, initial_indent="  ", subsequent_indent="  "))
    print("=" * 72, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
