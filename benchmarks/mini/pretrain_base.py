#!/usr/bin/env python
"""Pretrain the miniature pixel-space base diffusion model of the paper reproduction and write it as a CoDi
base bundle (``trainer/models/bundle.py``) that the trainer loads like any checkpoint.

    .venv/bin/python benchmarks/mini/pretrain_base.py                 # defaults: ~1 hour on 2 CPU cores
    .venv/bin/python benchmarks/mini/pretrain_base.py --resume        # continue an interrupted run

The model: a diffusers ``UNet2DConditionModel`` (3 -> 3 channels, 64x64 pixels, block_out_channels (32, 64, 128),
one ResNet per level, self-attention at the 16x16 level and the middle only, ~3.8 M parameters, ~15 MB float32),
epsilon prediction on Stable Diffusion's noise schedule (1000 steps, scaled_linear 0.00085 .. 0.012). It is
*unconditional*: its cross-attention (dim 8) sees all-zero conditioning, the bundle has no text encoder, captions are
ignored. Data: random 64x64 crops (two-level pyramid, flips) of the real photos shipped with scikit-image and
scikit-learn, the train split only (``benchmarks/mini/photos.py``; the split is written to ``split.json``).
Training: plain diffusion loss (MSE on epsilon, t uniform in 0..999), AdamW, linear warm-up then constant LR, gradient
clipping 1.0, EMA of the weights (``ccd_sampler.EMA``, decay warm-up ``min(decay, (1+n)/(10+n))``); the bundle holds
the EMA weights. Every step draws its crops, noise and timesteps from generators seeded by ``(seed, step)``, and the
state (weights, EMA, optimizer, step, losses) is saved every ``--save_every`` steps and at the end, so ``--resume``
continues exactly as if the run had not stopped.

Outputs in ``--out`` (default ``benchmarks/mini/base``): the bundle (``codi_base.json``, ``unet/``), ``split.json``,
``pretrain_log.json`` (seed, steps, batch, seconds, seconds/step, losses, machine), ``samples.png`` (EMA model,
DDIM 50 steps: ``ccd_sampler.sample`` with ``boundary=False``). The resumable state lives in ``--state_dir`` (default
``<out>-state``; not part of the bundle, not committed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402
import photos  # noqa: E402
import torch  # noqa: E402

import ccd_sampler as cs  # noqa: E402

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": False}
RESOLUTION = 64
CROSS_ATTENTION_DIM = 8
STATE_FILE = "last.pt"


def unet_config(channels=(32, 64, 128)) -> dict:
    return dict(sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=CROSS_ATTENTION_DIM,
                attention_head_dim=4, norm_num_groups=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3600, help="optimizer steps in all (default 3600: ~1 h, 2 CPU cores)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0, help="model init, split, crops, noise and timesteps")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "mini" / "base")
    p.add_argument("--state_dir", type=Path, default=None, help="resumable state (default <out>-state)")
    p.add_argument("--save_every", type=int, default=200, help="save the resumable state every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the state in --state_dir")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", type=str, default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--channels", type=str, default="32,64,128", help="UNet block_out_channels")
    p.add_argument("--num_samples", type=int, default=16, help="images in the sample grid")
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps of the sample grid")
    p.add_argument("--no_grayscale", action="store_true", help="train on the colour photos only")
    p.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="what the UNet predicts (default epsilon, as SD1.x)")
    p.add_argument("--zero_terminal_snr", action="store_true",
                   help="Lin et al.'s rescaled schedule (alpha = 0 at t = 999); needs --prediction_type v_prediction")
    p.add_argument("--data_scale", type=float, default=1.0,
                   help="latents = pixels in [-1, 1] times this (the bundle's vae_scaling_factor); 2.0 gives the "
                        "photos unit variance, as SD's latent scaling factor does for its latents")
    p.add_argument("--modelspec_architecture", default="codi-mini-pixel-v1",
                   help="the bundle's name in adapters' modelspec.architecture")
    p.add_argument("--save_dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the bundle's UNet weights (float16 halves the committed file)")
    p.add_argument("--init_from", type=Path, default=None,
                   help="start from the UNet of this base bundle instead of random weights (a fine-tune)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.zero_terminal_snr and args.prediction_type == "epsilon":
        p.error("--zero_terminal_snr needs --prediction_type v_prediction (epsilon cannot predict x at alpha = 0)")
    args.state_dir = args.state_dir or args.out.with_name(args.out.name + "-state")
    args.channels = tuple(int(c) for c in args.channels.split(","))
    return args


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def unet_denoiser(unet):
    """The bundle's UNet as a ``ccd_sampler`` denoiser: it cross-attends to all-zero conditioning."""
    def denoise(z, t, cond=None):
        context = torch.zeros(z.shape[0], 1, CROSS_ATTENTION_DIM, device=z.device, dtype=z.dtype)
        return unet(z, t, context, return_dict=False)[0]
    return denoise


@torch.no_grad()
def sample_grid(unet, schedule, num: int, steps: int, seed: int, prediction_type: str = "epsilon",
                data_scale: float = 1.0) -> torch.Tensor:
    """``num`` images in [0, 1] from the (EMA) UNet: deterministic DDIM on the CoDi grid, no boundary scalings."""
    generator = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    noise = torch.randn((num, 3, RESOLUTION, RESOLUTION), generator=generator).to(device)
    timesteps = cs.codi_timesteps(steps, grid=50) if steps <= 50 else cs.even_timesteps(steps)
    x = cs.sample(unet_denoiser(unet), noise, timesteps, prediction_type, schedule=schedule, mode="ode",
                  boundary=False)
    return (x.float().cpu() / data_scale / 2 + 0.5).clamp(0, 1)


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    canvas = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        canvas[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = \
            (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def save_state(path: Path, unet, ema, optimizer, step, losses, seconds) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "losses": losses, "seconds": seconds}, tmp)
    os.replace(tmp, path)  # a run killed while saving keeps the previous state


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel
    from tqdm.auto import tqdm

    from trainer.models.bundle import write_bundle

    split = photos.make_split(args.seed, grayscale=not args.no_grayscale)
    images = photos.load_images(split["train"])
    scheduler = {**SD_SCHEDULER, "rescale_betas_zero_snr": bool(args.zero_terminal_snr)}
    schedule = cs.NoiseSchedule.from_config(scheduler)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if args.init_from is not None:
        unet = UNet2DConditionModel.from_pretrained(args.init_from / "unet", local_files_only=True).to(device)
    else:
        unet = UNet2DConditionModel(**unet_config(args.channels)).to(device)
    unet.train()
    ema = cs.EMA(unet, decay=args.ema_decay, warmup=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    step, losses, seconds_before = 0, [], 0.0
    state_path = args.state_dir / STATE_FILE
    if args.resume:
        if not state_path.is_file():
            raise SystemExit(f"pretrain_base: --resume but no state at {state_path}")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, seconds_before = int(state["step"]), list(state["losses"]), float(state["seconds"])
        print(f"pretrain_base: resumed from {state_path} at step {step}", flush=True)
    params = sum(p.numel() for p in unet.parameters())
    print(f"pretrain_base: UNet {params:,} parameters ({params * 4 / 1e6:.1f} MB float32), batch {args.batch_size}, "
          f"{len(split['train'])} train images, test {split['test']}, device {device}, "
          f"{torch.get_num_threads()} threads", flush=True)

    bar = tqdm(total=args.steps, initial=step, desc="pretrain", dynamic_ncols=True, disable=args.no_progress)
    start, start_step = time.time(), step
    while step < args.steps:
        rng = np.random.default_rng(step_seed(args.seed, step))
        x0 = torch.from_numpy(photos.random_crops(images, args.batch_size, RESOLUTION, rng)).to(device)
        generator = torch.Generator().manual_seed(step_seed(args.seed, step))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        loss, _ = cs.diffusion_loss(unet_denoiser(unet), x0 * args.data_scale, None, schedule,
                                    args.prediction_type, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema.update(unet)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save_state(state_path, unet, ema, optimizer, step, losses, seconds_before + time.time() - start)
    bar.close()
    seconds = seconds_before + time.time() - start
    run_seconds = time.time() - start
    save_state(state_path, unet, ema, optimizer, step, losses, seconds)

    ema_unet = copy.deepcopy(unet).eval()
    ema.copy_to(ema_unet)
    out = args.out
    write_bundle(out, ema_unet, architecture="mini-pixel", modelspec_architecture=args.modelspec_architecture,
                 prediction_type=args.prediction_type, resolution=RESOLUTION, scheduler=scheduler,
                 vae_scaling_factor=args.data_scale, unet_dtype=getattr(torch, args.save_dtype),
                 extra={"conditioning": "none: unconditional base; the UNet cross-attends to zeros, captions are "
                                        "ignored",
                        "split": "split.json", "pretrain_log": "pretrain_log.json", "samples": "samples.png",
                        "made_by": "benchmarks/mini/pretrain_base.py"})
    (out / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    sample_seconds = time.time()
    grid = sample_grid(ema_unet, schedule, args.num_samples, args.sample_steps, args.seed, args.prediction_type,
                       args.data_scale)
    sample_seconds = time.time() - sample_seconds
    save_grid(grid, out / "samples.png")
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    window = max(1, min(100, len(losses) // 10))
    log = {"seed": args.seed, "steps": step, "prediction_type": args.prediction_type,
           "zero_terminal_snr": bool(args.zero_terminal_snr), "data_scale": args.data_scale,
           "init_from": None if args.init_from is None else args.init_from.name, "batch_size": args.batch_size,
           "lr": args.lr,
           "warmup_steps": args.warmup_steps, "ema_decay": args.ema_decay, "channels": list(args.channels),
           "parameters": params, "weights_bytes": weights.stat().st_size, "seconds": round(seconds, 1),
           "seconds_per_step_this_run": round(run_seconds / max(1, step - start_step), 4),
           "sample_grid": {"images": args.num_samples, "ddim_steps": args.sample_steps,
                           "seconds": round(sample_seconds, 1)},
           "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
           "threads": torch.get_num_threads(), "machine": f"{platform.processor() or platform.machine()}, "
                                                           f"{os.cpu_count()} CPUs", "torch": torch.__version__,
           "loss_first": losses[0] if losses else None,
           "loss_last_window": float(np.mean(losses[-window:])) if losses else None,
           "losses_per_window": {"window": window, "means": [float(np.mean(losses[i:i + window]))
                                                             for i in range(0, len(losses), window)]},
           "losses": [round(v, 5) for v in losses]}
    (out / "pretrain_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"pretrain_base: {step} steps, {seconds:.0f} s in all ({log['seconds_per_step_this_run']:.3f} s/step this "
          f"run); bundle {out} ({weights.stat().st_size / 1e6:.1f} MB weights), samples {out / 'samples.png'}",
          flush=True)
    return log


if __name__ == "__main__":
    main()
