#!/usr/bin/env python
"""What only a GPU can tell: training memory and speed of full-size models in half precision, the half-precision
training paths end to end, and CoDi's 4 steps against a stock 50-step ControlNet in ComfyUI -- one command per part.

    python benchmarks/gpu_check.py --prepare            # here (no GPU): the folder each part carries, .gpu_carry/
    python benchmarks/gpu_check.py --part train         # on the GPU machine, about 6 minutes on an H200
    python benchmarks/gpu_check.py --part comfyui       # on the GPU machine, right after (same warm machine)
    python benchmarks/gpu_check.py --part train --smoke # the plumbing on a CPU, micro models (a test runs it)

``--part train`` (the trainer, real processes, random weights):

* peak VRAM and seconds per step, full-size SD1.5 at 512 px, ``--mixed_precision fp16``, AdamW8bit, gradient
  checkpointing, cached latents: the ``controlnet`` and the ``control-lora`` adapter; SDXL ``control-lora`` at 1024
  px; each beside the trainer's own ``--dry_run`` prediction. Seconds per step are the trainer's own timing of the
  run's steps (the first, warm-up step included);
* the bf16 and fp16 training paths end to end (a few steps of the SD1.5 Control-LoRA with ``--sample_prompts``): the
  run ends (a non-finite loss would stop it) and the samples are written;
* it also leaves the full-size SD1.5 checkpoint and a CoDi 4x SR adapter in ``.cache/bench/full`` for the next part.

``--part comfyui``: ``benchmarks/comfy_speed.py --full`` on the GPU: full-size SD1.5 at 512 px, the 4x SR workflow
with CoDi at 4 steps against the stock ControlNet + KSampler at 50 steps: wall-clock ratio and NFE, ComfyUI running
on the GPU (not ``--cpu``).

Why two parts: a device call carries at most 64 MiB with the repository. The GPU machines here have Python 3.12,
torch, transformers, accelerate, safetensors and OpenCV but no diffusers, bitsandbytes or ComfyUI, and no network.
``--prepare`` builds ``.gpu_carry/`` (git-ignored): ``train/`` (the diffusers wheel, bitsandbytes unpacked with only
its CUDA 13 library -- the wheel's other CUDA builds are most of its 41 MiB -- and the CLIP tokenizer) and
``comfyui/`` (``ComfyUI.zip``: ComfyUI 0.3.75 as ``make comfyui`` prepares it, without the tokenizers of other model
families; the PyAV, torchsde and trampoline wheels ComfyUI imports at start). The commands on the GPU machine
(``device`` tool, one call each with ``carry=[".gpu_carry/<part>"]``, the second right after the first, while the
machine is still warm):

    pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/train/*.whl &&
      PYTHONPATH=/tmp/site:$PWD/.gpu_carry/train python benchmarks/gpu_check.py --part train
    pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/comfyui/*.whl &&
      unzip -qo .gpu_carry/comfyui/ComfyUI.zip -d /tmp && CODI_COMFYUI_DIR=/tmp/ComfyUI PYTHONPATH=/tmp/site
      python benchmarks/gpu_check.py --part comfyui

Results: ``benchmarks/results/gpu_check_<part>.json`` and ``benchmarks/results/gpu_check.md`` (machine, versions,
every number; the Markdown gathers whichever parts have run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
CARRY = REPO / ".gpu_carry"
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / ".cache" / "gpu_check"
PINS = {"diffusers": "diffusers==0.42.1", "bitsandbytes": "bitsandbytes==0.50.2", "av": "av==19.0.2",
        "torchsde": "torchsde==0.2.6", "trampoline": "trampoline==0.1.2"}
BNB_CUDA_LIB = "libbitsandbytes_cuda130.so"  # the GPU machines' torch is built for CUDA 13.0


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ --prepare (here)


def pip_download(spec: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(dest), spec], check=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    return next(p for p in dest.iterdir() if p.name.lower().startswith(name) and p.suffix == ".whl")


def unpack(wheel: Path, target: Path, keep=lambda name: True) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if keep(member):
                zf.extract(member, target)


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def prepare() -> dict:
    """Build ``.gpu_carry/{train,comfyui}`` here (PyPI reachable); returns their sizes in MiB. Wheels travel packed
    (the device call counts the bytes on disk) and are installed there with ``pip --no-index --target``."""
    from harness import comfyui_dir

    shutil.rmtree(CARRY, ignore_errors=True)
    train, comfy = CARRY / "train", CARRY / "comfyui"
    train.mkdir(parents=True)
    comfy.mkdir()
    pip_download(PINS["diffusers"], train)
    bnb = pip_download(PINS["bitsandbytes"], CARRY)
    unpack(bnb, train, keep=lambda m: m.startswith("bitsandbytes/") and not (
        re.search(r"libbitsandbytes_(cuda|rocm)\d+\.so$", m) and not m.endswith(BNB_CUDA_LIB)))
    bnb.unlink()
    shutil.copytree(comfyui_dir() / "comfy" / "sd1_tokenizer", train / "sd1_tokenizer")
    for spec in ("av", "torchsde", "trampoline"):
        pip_download(PINS[spec], comfy)
    skip = ("tests/", "tests-unit/", "custom_nodes/", "comfy/text_encoders/llama_tokenizer",
            "comfy/text_encoders/qwen25_tokenizer", "comfy/text_encoders/t5_tokenizer", "__pycache__")
    source = comfyui_dir()
    with zipfile.ZipFile(comfy / "ComfyUI.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and not any(part in relative for part in skip):
                zf.write(path, f"ComfyUI/{relative}")
    sizes = {"train": folder_mib(train), "comfyui": folder_mib(comfy)}
    repo = sum((REPO / p).stat().st_size for p in subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()) / 2**20
    for part, size in sizes.items():
        log(f".gpu_carry/{part}: {size:.1f} MiB; with the repository's tracked files ({repo:.1f} MiB) "
            f"{size + repo:.1f} of the 64 MiB a device call carries")
    return {**sizes, "repository": repo}


# ------------------------------------------------------------------------------------------------ --part train


def make_data(folder: Path, size: int) -> Path:
    """Four photos (scikit-image when present, else synthetic gradients) as targets + grey conditions + captions."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data

        arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    except ImportError:
        ramp = np.linspace(0, 255, 256, dtype=np.uint8)
        arrays = [np.stack([np.add.outer(ramp, ramp * k) % 256 for _ in range(3)], -1).astype(np.uint8)
                  for k in range(1, 5)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "conditions").mkdir(exist_ok=True)
    for i, array in enumerate(arrays):
        img = Image.fromarray(array).convert("RGB").resize((size, size), Image.LANCZOS)
        img.save(folder / "images" / f"{i}.png")
        img.convert("L").convert("RGB").save(folder / "conditions" / f"{i}.png")
        (folder / "images" / f"{i}.txt").write_text("a photo")
    (folder / "prompts.txt").write_text(f"a photo --cn {folder / 'conditions' / '0.png'} --s 4 --d 1\n")
    return folder


def tokenizer_dir() -> str:
    carried = CARRY / "train" / "sd1_tokenizer"
    if carried.is_dir():
        return str(carried)
    from harness import comfyui_dir

    return str(comfyui_dir() / "comfy" / "sd1_tokenizer")


def trainer(args: list[str], timeout: int = 900) -> str:
    result = subprocess.run([sys.executable, str(REPO / "trainer" / "train.py"), *args], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"the trainer failed (exit {result.returncode}): {' '.join(args)}\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def measure(name: str, checkpoint: Path, data: Path, resolution: int, adapter: str, steps: int, extra=()) -> dict:
    common = ["--pretrained_model_name_or_path", str(checkpoint), "--tokenizer_path", tokenizer_dir(),
              "--train_data_dir", str(data / "images"), "--conditioning_data_dir", str(data / "conditions"),
              "--caption_extension", ".txt", "--resolution", str(resolution), "--train_batch_size", "1",
              "--adapter_type", adapter, "--network_dim", "64", "--output_dir", str(WORK / "out" / name),
              "--output_name", name, *extra]
    log(f"{name}: dry run")
    dry = trainer(common + ["--dry_run"])
    predicted = float(re.search(r"total\s+([\d.]+) GiB", dry).group(1))
    log(f"{name}: {steps} steps")
    out = trainer(common + ["--max_train_steps", str(steps)])
    done = re.search(r"done: (\d+) steps \((\d+) this run\) in ([\d.]+) s .*peak memory ([\d.]+) GiB \(([^)]*)\)",
                     out)
    seconds, peak = float(done.group(3)), float(done.group(4))
    return {"name": name, "adapter": adapter, "resolution": resolution, "steps": steps, "predicted_gib": predicted,
            "peak_gib": peak, "peak_kind": done.group(5), "seconds_per_step": seconds / steps,
            "trainable": int(re.search(r"([\d,]+) trainable", dry).group(1).replace(",", ""))}


def precision_path(name: str, checkpoint: Path, data: Path, resolution: int, precision: str) -> dict:
    out_dir = WORK / "out" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    log(f"{name}: {precision} end to end with samples")
    text = trainer(["--pretrained_model_name_or_path", str(checkpoint), "--tokenizer_path", tokenizer_dir(),
                    "--train_data_dir", str(data / "images"), "--conditioning_data_dir", str(data / "conditions"),
                    "--caption_extension", ".txt", "--resolution", str(resolution), "--adapter_type", "control-lora",
                    "--network_dim", "16", "--mixed_precision", precision, "--max_train_steps", "3",
                    "--learning_rate", "1e-4", "--sample_prompts", str(data / "prompts.txt"),
                    "--sample_every_n_steps", "3", "--output_dir", str(out_dir), "--output_name", name])
    samples = sorted(p.name for p in (out_dir / "sample").glob("*.png"))
    from safetensors import safe_open

    with safe_open(str(out_dir / f"{name}.safetensors"), "pt") as fh:
        finite = all(bool(fh.get_tensor(k).float().isfinite().all()) for k in fh.keys())
    return {"name": name, "precision": precision, "finished": "codi: done: 3 steps" in text, "samples": samples,
            "adapter_finite": finite}


def comfyui_inputs(checkpoint: Path) -> None:
    """The full-size SD1.5 checkpoint and a CoDi 4x SR adapter where ``comfy_speed.py --full`` looks for them, so
    the ComfyUI part (which carries no diffusers) finds them on the same warm machine."""
    import comfy_speed

    target = REPO / ".cache" / "bench" / "full"
    target.mkdir(parents=True, exist_ok=True)
    comfy_speed.prepare(target, True, 512, checkpoint=checkpoint)


def part_train(smoke: bool) -> dict:
    import torch

    from model_builders import build_full_sd15, build_full_sdxl, build_micro_sd15, build_small_sdxl

    WORK.mkdir(parents=True, exist_ok=True)
    sd15_size, sdxl_size = (64, 64) if smoke else (512, 1024)
    steps, xl_steps = (2, 1) if smoke else (10, 4)
    sd15 = WORK / ("micro_sd15.safetensors" if smoke else "sd15_full.safetensors")
    sdxl = WORK / ("small_sdxl.safetensors" if smoke else "sdxl_full.safetensors")
    for path, build in ((sd15, build_micro_sd15 if smoke else build_full_sd15),
                        (sdxl, build_small_sdxl if smoke else build_full_sdxl)):
        if not path.exists():
            log(f"building {path.name} (random weights)")
            build(path)
    data = make_data(WORK / f"data{sd15_size}", sd15_size)
    data_xl = make_data(WORK / f"data{sdxl_size}", sdxl_size)
    precision = [] if smoke and not torch.cuda.is_available() else ["--mixed_precision", "fp16"]
    savers = [*precision, "--optimizer_type", "AdamW8bit", "--gradient_checkpointing", "--cache_latents"]
    rows = [measure("sd15_controlnet", sd15, data, sd15_size, "controlnet", steps, savers),
            measure("sd15_control_lora", sd15, data, sd15_size, "control-lora", steps, savers),
            measure("sdxl_control_lora", sdxl, data_xl, sdxl_size, "control-lora", xl_steps, savers)]
    paths = [precision_path(f"sd15_{p}", sd15, data, sd15_size, p) for p in ("bf16", "fp16")]
    if not smoke:
        comfyui_inputs(sd15)
    return {"training": rows, "precision_paths": paths}


# ------------------------------------------------------------------------------------------------ --part comfyui


def part_comfyui(smoke: bool, reps: int) -> dict:
    import comfy_speed

    args = ["--reps", str(reps), "--no-cfg75", "--threads", str(os.cpu_count() or 1),
            "--out", str(WORK / "comfy_speed.md"), "--json", str(WORK / "comfy_speed.json")]
    if not smoke:
        args += ["--full", "--gpu"]
    comfy_speed.main(args)
    return json.loads((WORK / "comfy_speed.json").read_text())


# ------------------------------------------------------------------------------------------------ report


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    for name in ("diffusers", "transformers", "accelerate", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed on that machine
            info[name] = None
    return info


def markdown(parts: dict) -> str:
    lines = ["# GPU check", "", "Produced by `benchmarks/gpu_check.py` (one command per part; see its docstring).", ""]
    for part, result in parts.items():
        m = result["machine"]
        lines += [f"## Part `{part}`{' (smoke: CPU, micro models -- plumbing only)' if result['smoke'] else ''}", "",
                  f"Machine: {m.get('gpu') or 'no GPU'} (CUDA {m.get('cuda')}), {m['cpu_count']} CPUs, Python "
                  f"{m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, "
                  f"accelerate {m['accelerate']}, bitsandbytes {m['bitsandbytes']}; {result['seconds']:.0f} s.", ""]
        if part == "train":
            lines += ["| run | adapter | resolution | trainable | predicted (GiB) | measured peak (GiB) | "
                      "measured / predicted | s / step |", "|---|---|---|---:|---:|---:|---:|---:|"]
            for r in result["training"]:
                lines.append(f"| {r['name']} | {r['adapter']} | {r['resolution']} | {r['trainable']:,} | "
                             f"{r['predicted_gib']:.2f} | {r['peak_gib']:.2f} ({r['peak_kind']}) | "
                             f"{r['peak_gib'] / r['predicted_gib']:.2f} | {r['seconds_per_step']:.2f} |")
            lines += ["", "| precision path | finished | adapter finite | samples |", "|---|---|---|---|"]
            for r in result["precision_paths"]:
                lines.append(f"| {r['precision']} | {r['finished']} | {r['adapter_finite']} | "
                             f"{', '.join(r['samples']) or 'none'} |")
        else:
            for key, value in result["comfyui"].get("ratios", {}).items():
                lines.append(f"- {key}: {value}")
            lines += ["", result["comfyui"].get("table", "")]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="build .gpu_carry/ here (needs PyPI), then exit")
    p.add_argument("--part", choices=("train", "comfyui"), default="train")
    p.add_argument("--smoke", action="store_true", help="CPU, micro models: check the plumbing")
    p.add_argument("--reps", type=int, default=3, help="ComfyUI: timed runs per graph")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.prepare:
        prepare()
        return 0
    start = time.time()
    result = part_train(args.smoke) if args.part == "train" else {"comfyui": part_comfyui(args.smoke, args.reps)}
    result.update(machine=machine(), smoke=args.smoke, seconds=time.time() - start)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"gpu_check_{args.part}.json").write_text(json.dumps(result, indent=1) + "\n")
    parts = {part: json.loads((args.results / f"gpu_check_{part}.json").read_text())
             for part in ("train", "comfyui") if (args.results / f"gpu_check_{part}.json").is_file()}
    (args.results / "gpu_check.md").write_text(markdown(parts))
    log(f"wrote {args.results / 'gpu_check.md'} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
