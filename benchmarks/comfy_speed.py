#!/usr/bin/env python
"""CoDi in the real ComfyUI 0.3.75 on CPU: NFE and wall-clock, side by side in one run (ratios, never wall-clock
asserts in tests).

    .venv/bin/python benchmarks/comfy_speed.py [--full] [--reps 5] [--threads 1] \
        [--out benchmarks/results/comfy_speed.md]

One in-process ComfyUI (``tests/harness``: ``run_inprocess``, the real ``validate_prompt`` + ``PromptExecutor``, our
pack in ``custom_nodes/``) runs, with the same checkpoint, the same CoDi adapter (a random-weight ControlNet exported
by ``trainer/adapters/files.py`` with ``codi.*`` metadata: task sr, 4 recommended steps, cfg 1) and the same inputs:

(a) the shipped 4x super-resolution workflow ``workflows/api/codi_sr_x4.json`` (CoDiSuperResolutionInput ->
    CoDiSample at 4 steps -> VAEDecode -> SaveImage) against the stock way to use the same adapter: ControlNetLoader +
    ControlNetApplyAdvanced + KSampler (euler, normal, 50 steps) on the same hint, latent, prompts and cfg, also
    decoded and saved; plus, for reference, the stock graph at cfg 7.5 (the usual SD1.5 setting: two UNet batch rows
    per call);
(b) CoDiSampler (ode) against the stock euler sampler (KSamplerSelect "euler"), both in stock SamplerCustom with the
    same model (CoDiModelPatch), the same sigmas (CoDiScheduler) and conditioning, at 4 and 8 steps (ends in
    SaveLatent: only sampling is timed besides graph overhead).

NFE is counted by a benchmark-only node inserted after the checkpoint loader that clones the MODEL and sets a
``set_model_unet_function_wrapper`` counting UNet calls (a ControlNet evaluation precedes each; cond/uncond batched in
one call count once, the batch rows are reported separately). Time is the wall-clock of ``env.run_prompt`` for the
whole graph: the checkpoint, CLIP encodings and adapter are cached by ComfyUI's executor after a warm-up run of every
graph, and every timed run changes only the seed, so sampling, the ControlNet, VAE decoding and saving are what is
timed. Runs are interleaved (rep 1 of every graph, then rep 2, ...) so that load changes hit all configurations alike;
the median of ``--reps`` runs is reported.

Checkpoint: micro SD1.5 (``tests/model_builders.build_micro_sd15``: one-level UNet, full-size CLIP-L and VAE) at
128x128 output by default -- about 4 minutes on 2 cores (1 minute of it building the checkpoint and adapter on the
first run, cached afterwards, and starting ComfyUI).
``--full`` uses ``build_full_sd15`` (the full-size SD1.5 architecture, random weights) at 512x512 output: one UNet
forward at a 64x64 latent takes ~6.5 s on one of these 2 CPU cores (+ the ControlNet), so one stock 50-step image is
~7-8 minutes and ``--full`` with the default 5 repetitions takes over an hour on 2 cores (``--full --reps 1
--no-cfg75`` about 20 minutes; better a machine with more cores).
Files are cached in ``.cache/bench/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SR_WORKFLOW = REPO / "workflows" / "api" / "codi_sr_x4.json"
CKPT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"  # the name the workflow loads
ADAPTER_NAME = "codi_sr_x4.safetensors"
INPUT_NAME = "codi_sr_input.png"
CODI_STEPS = 4
STOCK_STEPS = 50
CFG = 1.0
SEED = 42


# --------------------------------------------------------------------------------------------------------- setup


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def prepare(workdir: Path, full: bool, size: int, checkpoint: Path | None = None) -> Path:
    """A ComfyUI base dir with the checkpoint (``checkpoint``, else built), the adapter (in models/codi and
    models/controlnet) and the input. Building needs the trainer's requirements (diffusers); a base dir prepared
    before (e.g. by ``gpu_check.py --part train`` on the same machine) needs nothing beyond ComfyUI's."""
    import numpy as np
    from PIL import Image

    from harness import make_base_dir

    base = make_base_dir(workdir / "base")
    models = base / "models"
    for sub in ("checkpoints", "codi", "controlnet"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    ckpt = workdir / ("full_sd15.safetensors" if full else "micro_sd15.safetensors")
    if checkpoint is not None and not ckpt.exists():
        ckpt.symlink_to(Path(checkpoint).resolve())
    if not ckpt.exists():
        from model_builders import build_full_sd15, build_micro_sd15

        print(f"building {ckpt.name} ...", flush=True)
        tmp = ckpt.with_suffix(".tmp.safetensors")
        (build_full_sd15 if full else build_micro_sd15)(tmp)
        tmp.rename(ckpt)
    link = models / "checkpoints" / CKPT_NAME
    if not link.exists():
        link.symlink_to(ckpt)
    adapter = models / "codi" / ADAPTER_NAME
    if not adapter.exists():
        import torch
        from model_builders import sd1_tokenizer_source

        from ccd_sampler.metadata import CoDiMetadata
        from trainer.adapters.controlnet import build_adapter
        from trainer.adapters.files import build_metadata, save_adapter
        from trainer.models import load_base_model

        print("building the CoDi adapter (random ControlNet from the checkpoint's UNet) ...", flush=True)
        model = load_base_model(ckpt, tokenizer_path=sd1_tokenizer_source())
        net = build_adapter(model.unet, "controlnet")
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, p in net.trainable_named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        codi = CoDiMetadata(task="sr", adapter_type="controlnet", recommended_steps=CODI_STEPS, recommended_cfg=CFG,
                            hint_preprocessing={"type": "sr", "scale": 4, "upsample": "bicubic", "antialias": False})
        tmp = adapter.with_name("tmp-" + adapter.name)
        save_adapter(tmp, net.export_state_dict(), build_metadata(
            base_architecture="stable-diffusion-v1", adapter_type="controlnet", title="benchmark", codi=codi))
        tmp.rename(adapter)
        del model, net
    stock = models / "controlnet" / ADAPTER_NAME  # where the stock ControlNetLoader looks
    if not stock.exists():
        stock.symlink_to(adapter)
    low = size // 4
    try:
        from skimage import data

        array = data.astronaut()
    except ImportError:  # a machine without scikit-image: any image does for timing
        array = (np.indices((256, 256)).sum(0) % 256).astype(np.uint8)[..., None].repeat(3, -1)
    photo = Image.fromarray(array).convert("RGB").resize((low, low), Image.LANCZOS)
    photo.save(base / "input" / INPUT_NAME)
    assert np.asarray(photo).shape == (low, low, 3)
    return base


# --------------------------------------------------------------------------------------------------------- graphs


def sr_prompts() -> dict:
    """The shipped SR workflow (4 steps) and the stock ControlNet + KSampler(euler, normal, 50) graph on its inputs."""
    wf = json.loads(SR_WORKFLOW.read_text(encoding="utf-8"))
    assert wf["1"]["class_type"] == "CheckpointLoaderSimple" and wf["7"]["class_type"] == "CoDiSample"
    wf["1"]["inputs"]["ckpt_name"] = CKPT_NAME
    wf["5"]["inputs"]["adapter_name"] = ADAPTER_NAME
    wf["4"]["inputs"]["image"] = INPUT_NAME
    wf["count"] = {"class_type": "BenchCountNFE", "inputs": {"model": ["1", 0]}}
    wf["7"]["inputs"].update({"model": ["count", 0], "steps": CODI_STEPS, "cfg": CFG})
    wf["9"]["inputs"]["filename_prefix"] = "codi_sr_x4"

    def stock(cfg: float, prefix: str) -> dict:
        g = {k: v for k, v in json.loads(json.dumps(wf)).items() if k not in ("7", "8", "9")}
        g.update({
            "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": ADAPTER_NAME}},
            "apply": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["2", 0], "negative": ["3", 0], "control_net": ["cn", 0], "image": ["6", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
            "ksampler": {"class_type": "KSampler", "inputs": {
                "model": ["count", 0], "seed": SEED, "steps": STOCK_STEPS, "cfg": cfg, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["apply", 0], "negative": ["apply", 1], "latent_image": ["6", 1],
                "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["1", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
        })
        return g

    return {"codi_sr_4": wf, "stock_cn_euler_50": stock(CFG, "stock_50"),
            "stock_cn_euler_50_cfg7.5": stock(7.5, "stock_50_cfg75")}


def sampler_prompts(steps_list=(4, 8)) -> dict:
    """CoDiSampler (ode) vs KSamplerSelect euler in SamplerCustom, same patched model, sigmas and conditioning."""
    wf = json.loads(SR_WORKFLOW.read_text(encoding="utf-8"))
    front = {k: wf[k] for k in ("1", "2", "3", "4", "5", "6")}
    front["1"]["inputs"]["ckpt_name"] = CKPT_NAME
    front["5"]["inputs"]["adapter_name"] = ADAPTER_NAME
    front["4"]["inputs"]["image"] = INPUT_NAME
    out = {}
    for steps in steps_list:
        for name, sampler in (("codi_ode", {"class_type": "CoDiSampler",
                                            "inputs": {"mode": "ode", "noise_seed": 0, "start": "codi"}}),
                              ("stock_euler", {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}})):
            g = json.loads(json.dumps(front))
            g.update({
                "count": {"class_type": "BenchCountNFE", "inputs": {"model": ["1", 0]}},
                "apply": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                    "positive": ["2", 0], "negative": ["3", 0], "control_net": ["5", 0], "image": ["6", 0],
                    "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
                "patch": {"class_type": "CoDiModelPatch", "inputs": {
                    "model": ["count", 0], "boundary": "auto", "lora_name": "None", "lora_strength": 1.0,
                    "codi_info": ["5", 1]}},
                "sigmas": {"class_type": "CoDiScheduler", "inputs": {
                    "model": ["patch", 0], "steps": steps, "grid": 0, "end": "zero", "denoise": 1.0,
                    "codi_info": ["5", 1]}},
                "sampler": sampler,
                "sample": {"class_type": "SamplerCustom", "inputs": {
                    "model": ["patch", 0], "add_noise": True, "noise_seed": SEED, "cfg": CFG,
                    "positive": ["apply", 0], "negative": ["apply", 1], "sampler": ["sampler", 0],
                    "sigmas": ["sigmas", 0], "latent_image": ["6", 1]}},
                "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                                "filename_prefix": f"{name}_{steps}"}},
            })
            out[f"{name}_{steps}"] = g
    return out


SEED_INPUTS = {"CoDiSample": "seed", "KSampler": "seed", "SamplerCustom": "noise_seed"}

INPROCESS = r'''
import json, statistics, time
import torch
spec = json.load(open(SPEC_PATH))
COUNT = {"calls": 0, "rows": 0}

class BenchCountNFE:
    """Benchmark only: the MODEL with a UNet function wrapper counting the model calls."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "benchmark"

    def patch(self, model):
        m = model.clone()
        previous = m.model_options.get("model_function_wrapper")
        def wrapper(apply_model, args):
            COUNT["calls"] += 1
            COUNT["rows"] += int(args["input"].shape[0])
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])
        m.set_model_unet_function_wrapper(wrapper)
        return (m,)

env.nodes.NODE_CLASS_MAPPINGS["BenchCountNFE"] = BenchCountNFE
seed_inputs = spec["seed_inputs"]

def with_seed(prompt, seed):
    p = json.loads(json.dumps(prompt))
    for node in p.values():
        key = seed_inputs.get(node["class_type"])
        if key:
            node["inputs"][key] = seed
    return p

def run(name, seed):
    COUNT["calls"] = COUNT["rows"] = 0
    t0 = time.perf_counter()
    res = env.run_prompt(with_seed(spec["prompts"][name], seed))
    dt = time.perf_counter() - t0
    if not res["success"]:
        errors = [m[1] for m in res["messages"] if m[0] == "execution_error"]
        raise RuntimeError(f"{name} failed: {res['error']} {res['node_errors']} {errors}")
    return dt, COUNT["calls"], COUNT["rows"], res["outputs"]

names = list(spec["prompts"])
warm = {}
for name in names:  # warm-up: loads and caches the checkpoint, CLIP encodings, adapter
    warm[name] = run(name, spec["seed"])[:3]
    print(f"[bench] warm-up {name}: {warm[name][0]:.2f} s, {warm[name][1]} UNet calls", flush=True)
times = {n: [] for n in names}
nfe = {n: set() for n in names}
rows = {n: set() for n in names}
outputs = {}
loads = [open("/proc/loadavg").read().split()[0]]
for rep in range(spec["reps"]):
    for name in names:
        dt, calls, r, out = run(name, spec["seed"] + 1 + rep)
        times[name].append(dt)
        nfe[name].add(calls)
        rows[name].add(r)
        outputs[name] = out
        print(f"[bench] rep {rep + 1} {name}: {dt:.3f} s, {calls} UNet calls", flush=True)
    loads.append(open("/proc/loadavg").read().split()[0])
RESULT = {"times": times, "median": {n: statistics.median(v) for n, v in times.items()},
          "nfe": {n: sorted(v) for n, v in nfe.items()}, "rows": {n: sorted(v) for n, v in rows.items()},
          "warm": warm, "loads": loads, "torch": torch.__version__, "threads": torch.get_num_threads(),
          "outputs": outputs, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
'''


# --------------------------------------------------------------------------------------------------------- report


def write_report(out: Path, res: dict, args, size: int, seconds: float, load_start: str, load_end: str,
                 command: str) -> str:
    from harness import COMFYUI_VERSION

    med, nfe, rows = res["median"], res["nfe"], res["rows"]

    def fmt_nfe(name):
        calls = "/".join(map(str, nfe[name]))
        r = "/".join(map(str, rows[name]))
        return calls if r == calls else f"{calls} ({r} rows)"

    base = med["stock_cn_euler_50"]
    nfe_codi, nfe_stock = nfe["codi_sr_4"][0], nfe["stock_cn_euler_50"][0]
    per_call = (base - med["codi_sr_4"]) / (nfe_stock - nfe_codi)
    fixed = med["codi_sr_4"] - nfe_codi * per_call
    share_codi, share_stock = nfe_codi * per_call / med["codi_sr_4"], nfe_stock * per_call / base
    ckpt = ("full-size SD1.5 architecture, random weights (`build_full_sd15`)" if args.full
            else "micro SD1.5 (`build_micro_sd15`: one-level UNet 320 ch, full-size CLIP-L + VAE), random weights")
    lines = [
        f"# CoDi in ComfyUI: speed on {'GPU' if args.gpu else 'CPU'} (`benchmarks/comfy_speed.py`)",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu_model()}), {res.get('gpu') or 'no GPU'}; torch {res['torch']} "
        f"({res['threads']} intra-op thread{'s' if res['threads'] != 1 else ''}), ComfyUI {COMFYUI_VERSION} "
        f"({'on the GPU' if args.gpu else '`--cpu`'}, in-process via `tests/harness`), "
        f"Python {platform.python_version()}.",
        f"Load average (1 min) at start {load_start.split()[0]}, after each round of repetitions "
        f"{', '.join(res['loads'][1:])}, at end {load_end.split()[0]}: absolute seconds depend on what else "
        "the machine was doing; the ratios are measured side by side (interleaved repetitions) in one run.",
        "",
        f"Command: `{command}` (took {seconds / 60:.1f} min including building the checkpoint/adapter if not cached "
        "and ComfyUI start-up).",
        "",
        f"Checkpoint: {ckpt}. Adapter: random ControlNet built from that UNet, exported with `codi.*` metadata "
        f"(task sr, {CODI_STEPS} recommended steps, cfg {CFG}). Input: skimage astronaut at {size // 4}x{size // 4} "
        f"-> {size}x{size} output (latent {size // 8}x{size // 8}); prompts, hint, latent, cfg {CFG} and seeds are "
        "the same for every graph.",
        "",
        f"Time = median of {args.reps} runs of the whole graph (`env.run_prompt`) after a warm-up run of each graph: "
        "checkpoint, CLIP encodings and adapter are cached by the executor; the sampler, the ControlNet, and in (a) "
        "VAE decode + PNG save are timed. NFE = UNet calls counted by a `set_model_unet_function_wrapper` on a clone "
        "of the MODEL (each preceded by one ControlNet call; cond+uncond batched in one call count once, the batch "
        "rows are given in brackets when they differ).",
        "",
        "## (a) 4x SR workflow vs stock ControlNet + KSampler",
        "",
        "| configuration | steps | NFE | median s | ratio vs stock-50 |",
        "|---|---:|---:|---:|---:|",
    ]
    rows_a = [("CoDi SR x4 workflow (`codi_sr_x4.json`: CoDiSample)", "codi_sr_4", CODI_STEPS),
              (f"stock ControlNetLoader + ControlNetApplyAdvanced + KSampler (euler, normal), cfg {CFG}",
               "stock_cn_euler_50", STOCK_STEPS),
              ("same stock graph at cfg 7.5 (usual SD1.5 setting; reference)", "stock_cn_euler_50_cfg7.5",
               STOCK_STEPS)]
    for label, name, steps in rows_a:
        if name in med:
            lines.append(f"| {label} | {steps} | {fmt_nfe(name)} | {med[name]:.3f} | {med[name] / base:.3f} |")
    lines += [
        "",
        f"Speed-up of the CoDi workflow over the stock 50-step graph (same cfg): **{base / med['codi_sr_4']:.1f}x** "
        f"wall-clock for {STOCK_STEPS / CODI_STEPS:.1f}x fewer model calls.",
        "",
        f"Both graphs also decode and save the image, a cost that does not depend on the steps: fitting "
        f"`time = NFE x c + d` to the two cfg-{CFG} rows gives c = {per_call:.3f} s per model call (UNet + "
        f"ControlNet) and d = {fixed:.2f} s fixed (VAE decode, PNG save, graph overhead): model calls are "
        f"~{100 * share_codi:.0f}% of the CoDi graph's time and ~{100 * share_stock:.0f}% of the stock graph's. "
        "With a full-size UNet the model calls dominate both, and the wall-clock ratio approaches the NFE ratio.",
        "",
        "## (b) CoDiSampler (ode) vs stock euler at equal steps",
        "",
        "Both in stock `SamplerCustom`, same CoDiModelPatch model, same CoDiScheduler sigmas, same conditioning; "
        "the graph ends in SaveLatent.",
        "",
        "| configuration | steps | NFE | median s | ratio vs stock euler (same steps) | ratio vs stock-50 (a) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for steps in args.sampler_steps:
        ours, stock = f"codi_ode_{steps}", f"stock_euler_{steps}"
        for label, name in (("CoDiSampler (ode) in SamplerCustom", ours),
                            ("KSamplerSelect euler in SamplerCustom", stock)):
            lines.append(f"| {label} | {steps} | {fmt_nfe(name)} | {med[name]:.3f} | {med[name] / med[stock]:.3f} "
                         f"| {med[name] / base:.3f} |")
    if not args.full:
        lines += [
            "",
            "## Full-size SD1.5 (`--full`)",
            "",
            "On the full-size model the model calls dominate both graphs and the wall-clock ratio approaches the NFE "
            "ratio. `python benchmarks/comfy_speed.py --full --reps 1 --no-cfg75 --out "
            "benchmarks/results/comfy_speed_full.md` measures it (about 40 minutes on 2 CPU cores: ~13 s per model "
            "call at 512x512 with one thread); the committed run is `comfy_speed_full.md` beside this file.",
        ]
    lines += [
        "",
        "All runs (seconds, in order):",
        "",
        "| graph | warm-up s | runs s |",
        "|---|---:|---|",
    ]
    for name, times in res["times"].items():
        lines.append(f"| {name} | {res['warm'][name][0]:.2f} | {', '.join(f'{t:.3f}' for t in times)} |")
    lines.append("")
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 architecture at 512x512 (slow on CPU)")
    parser.add_argument("--size", type=int, default=0, help="output size in pixels (default 128, --full 512)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per graph (median reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in ComfyUI (OMP_NUM_THREADS); 1 is steadiest on a shared 2-core "
                             "machine")
    parser.add_argument("--sampler-steps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--no-cfg75", action="store_true", help="skip the stock cfg 7.5 reference graph")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "comfy_speed.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers and ratios as JSON")
    parser.add_argument("--gpu", action="store_true", help="run ComfyUI on the GPU (default: --cpu)")
    args = parser.parse_args(argv)
    size = args.size or (512 if args.full else 128)
    if size % 32:
        parser.error("--size must be a multiple of 32 (4x SR of an image of a multiple of 8 pixels)")
    command = " ".join(["python benchmarks/comfy_speed.py", *(sys.argv[1:] if argv is None else argv)])
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    start = time.perf_counter()
    load_start = loadavg()
    from harness import run_inprocess

    workdir = args.workdir / ("full" if args.full else "micro")
    base = prepare(workdir, args.full, size)
    shutil.rmtree(base / "output", ignore_errors=True)
    (base / "output").mkdir()
    prompts = sr_prompts()
    if args.no_cfg75:
        prompts.pop("stock_cn_euler_50_cfg7.5")
    prompts.update(sampler_prompts(args.sampler_steps))
    spec = base / "bench_spec.json"
    spec.write_text(json.dumps({"prompts": prompts, "reps": args.reps, "seed": SEED, "seed_inputs": SEED_INPUTS}))
    print(f"running {len(prompts)} graphs x (1 warm-up + {args.reps}) in ComfyUI ...", flush=True)
    env = {"OMP_NUM_THREADS": str(args.threads), **({"CODI_COMFYUI_GPU": "1"} if args.gpu else {})}
    run = run_inprocess(f"SPEC_PATH = {str(spec)!r}\n" + INPROCESS, base, timeout=24 * 3600, env=env, check=False)
    for line in run.log.splitlines():
        if line.startswith("[bench]"):
            print(line)
    if run.returncode != 0 or run.result is None:
        sys.exit(f"benchmark run failed (exit {run.returncode}); log:\n{run.log[-10000:]}")
    text = write_report(args.out, run.result, args, size, time.perf_counter() - start, load_start, loadavg(),
                        command)
    print(text)
    print(f"wrote {args.out}")
    if args.json is not None:
        med, nfe = run.result["median"], run.result["nfe"]
        ratios = {"stock ControlNet + KSampler 50 steps / CoDi 4 steps (wall clock)":
                  round(med["stock_cn_euler_50"] / med["codi_sr_4"], 3),
                  "NFE CoDi / stock": f"{nfe['codi_sr_4'][0]} / {nfe['stock_cn_euler_50'][0]}"}
        table = text.split("## (a)", 1)[1].split("\n\n", 2)[1] if "## (a)" in text else ""
        args.json.write_text(json.dumps({**run.result, "ratios": ratios, "table": table, "command": command},
                                        indent=1))


if __name__ == "__main__":
    main()
