#!/usr/bin/env python
"""Peak memory and step time of one CoDi training step on the full-size SD1.5 architecture (random weights), next to
the trainer's own ``--dry_run`` prediction.

    .venv/bin/python benchmarks/train_memory.py [--resolution 512] [--out benchmarks/results/train_memory.md]

Every configuration runs the real trainer (``trainer/train.py``) in its own process for one step at batch 1:
{controlnet, control-lora} x {AdamW, AdamW8bit} x {gradient checkpointing off, on}. On a CPU machine the number is the
process's peak resident memory during training (Linux VmHWM, reset after model loading) with float32 weights; on a
CUDA machine (``--mixed_precision fp16``) it is the peak allocated GPU memory. Takes about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

GOALS = {"controlnet": 12.0, "control-lora": 8.0}  # GiB on a GPU (SD1.5, fp16), from the trainer issue


def machine_description(mixed_precision: str) -> str:
    import torch

    if mixed_precision != "no" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU, torch {torch.__version__}"


def make_inputs(workdir: Path, resolution: int) -> tuple[Path, Path]:
    from PIL import Image
    from skimage import data

    from model_builders import build_full_sd15

    ckpt = workdir / "sd15_random.safetensors"
    if not ckpt.exists():
        print("building a random-weight full-size SD1.5 checkpoint ...", flush=True)
        build_full_sd15(ckpt)
    images, conditions = workdir / "images", workdir / "conditions"
    images.mkdir(exist_ok=True)
    conditions.mkdir(exist_ok=True)
    img = Image.fromarray(data.astronaut()).convert("RGB").resize((resolution, resolution), Image.LANCZOS)
    img.save(images / "astronaut.png")
    img.convert("L").convert("RGB").save(conditions / "astronaut.png")
    (images / "astronaut.txt").write_text("a photo of an astronaut")
    return ckpt, workdir


def run_trainer(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "train.py"), *args], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"trainer failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def tokenizer_dir() -> str:
    from harness import comfyui_dir

    return str(comfyui_dir() / "comfy" / "sd1_tokenizer")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is built (default: a temp dir)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_memory.md"))
    opts = parser.parse_args()

    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="codi-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, data = make_inputs(workdir, opts.resolution)
    rows = []
    started = time.time()
    load_at_start = os.getloadavg()[0]
    for adapter, optimizer, checkpointing in itertools.product(("controlnet", "control-lora"),
                                                                ("AdamW", "AdamW8bit"), (False, True)):
        common = ["--pretrained_model_name_or_path", str(ckpt), "--tokenizer_path", tokenizer_dir(),
                  "--train_data_dir", str(data / "images"), "--conditioning_data_dir", str(data / "conditions"),
                  "--caption_extension", ".txt", "--resolution", str(opts.resolution), "--train_batch_size", "1",
                  "--adapter_type", adapter, "--optimizer_type", optimizer, "--network_dim", "64",
                  "--mixed_precision", opts.mixed_precision, "--output_dir", str(workdir / "out"),
                  "--save_precision", "fp16"]
        if checkpointing:
            common.append("--gradient_checkpointing")
        label = f"{adapter}, {optimizer}, checkpointing {'on' if checkpointing else 'off'}"
        print(f"[{time.time() - started:6.0f} s] {label}: dry run ...", flush=True)
        dry = run_trainer(common + ["--dry_run"])
        predicted = float(re.search(r"total\s+([\d.]+) GiB", dry).group(1))
        trainable = int(re.search(r"([\d,]+) trainable", dry).group(1).replace(",", ""))
        print(f"[{time.time() - started:6.0f} s] {label}: one training step ...", flush=True)
        out = run_trainer(common + ["--max_train_steps", "1"])
        done = re.search(r"done: 1 steps \(1 this run\) in ([\d.]+) s .*peak memory ([\d.]+) GiB", out)
        seconds, measured = float(done.group(1)), float(done.group(2))
        rows.append((adapter, optimizer, checkpointing, trainable, predicted, measured, seconds))
        print(f"    predicted {predicted:.2f} GiB, measured {measured:.2f} GiB, step {seconds:.1f} s", flush=True)

    load = max(load_at_start, os.getloadavg()[0])
    write_report(Path(opts.out), rows, opts, machine_description(opts.mixed_precision), time.time() - started,
                 load)
    return 0


def write_report(path: Path, rows, opts, machine: str, seconds: float, load: float) -> None:
    on_gpu = opts.mixed_precision != "no"
    kind = "peak GPU memory allocated" if on_gpu else "peak process RSS during training (float32)"
    lines = [
        "# Training memory: one CoDi step on the full-size SD1.5 architecture",
        "",
        f"Machine: {machine}. Resolution {opts.resolution}x{opts.resolution}, batch 1, random weights, "
        f"mixed precision `{opts.mixed_precision}`. Measured: {kind}. Predicted: the trainer's `--dry_run` "
        "(weights + gradients + optimizer state + EMA + activations measured by a saved-tensor probe). "
        f"Produced by `benchmarks/train_memory.py` in {seconds / 60:.1f} minutes.",
        "",
        "| adapter | optimizer | gradient checkpointing | trainable params | predicted (GiB) | measured (GiB) | "
        "measured / predicted | step time (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for adapter, optimizer, ckpt, trainable, predicted, measured, step in rows:
        lines.append(f"| {adapter} | {optimizer} | {'on' if ckpt else 'off'} | {trainable:,} | {predicted:.2f} | "
                     f"{measured:.2f} | {measured / predicted:.2f} | {step:.1f} |")
    lines += ["", "What the numbers include: the measured peak covers the whole step (ODE and target forwards, the "
              "online forward and backward, the optimizer update and its temporaries, the EMA update) on top of every "
              "frozen weight (UNet, VAE, CLIP, the adapter); the prediction sums the steady components and the "
              "activations autograd saves, so it undershoots where transient buffers (backward of the largest "
              "layers, optimizer temporaries) set the peak — most visibly with gradient checkpointing on."]
    if load > (os.cpu_count() or 1) * 0.75:
        lines += ["", f"Step times are NOT comparable in this run: other processes kept the load average at {load:.1f} "
                  f"on {os.cpu_count()} cores while it ran. The memory numbers are unaffected."]
    lines += ["", "Ratios side by side (same run):", ""]
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    for adapter in ("controlnet", "control-lora"):
        for ckpt in (False, True):
            a, b = by_key[(adapter, "AdamW", ckpt)], by_key[(adapter, "AdamW8bit", ckpt)]
            lines.append(f"- {adapter}, checkpointing {'on' if ckpt else 'off'}: AdamW8bit / AdamW memory "
                         f"{b[5] / a[5]:.2f}")
        a, b = by_key[(adapter, "AdamW8bit", False)], by_key[(adapter, "AdamW8bit", True)]
        lines.append(f"- {adapter}, AdamW8bit: checkpointing on / off memory {b[5] / a[5]:.2f}, step time "
                     f"{b[6] / a[6]:.2f}")
    a, b = by_key[("controlnet", "AdamW8bit", True)], by_key[("control-lora", "AdamW8bit", True)]
    lines.append(f"- control-lora / controlnet (AdamW8bit, checkpointing): memory {b[5] / a[5]:.2f}, trainable "
                 f"parameters {b[3] / a[3]:.3f}")
    lines += ["", "## Against the goals (GPU, fp16): SD1.5 control-lora <= 8 GiB, SD1.5 controlnet <= 12 GiB, "
              "SDXL control-lora <= 12 GiB", ""]
    if on_gpu:
        for adapter, goal in GOALS.items():
            best = min(r[5] for r in rows if r[0] == adapter)
            lines.append(f"- SD1.5 {adapter}: best {best:.2f} GiB vs goal {goal} GiB: "
                         f"{'met' if best <= goal else 'NOT met'}")
    else:
        lines.append("This run had no GPU, so the goals are not measured here: the CPU numbers above hold every "
                     "weight in float32 (the frozen base alone is 2x its fp16 size on a GPU). Rerun with "
                     "`--mixed_precision fp16` on a CUDA machine to check them.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
