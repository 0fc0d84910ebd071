"""What a run renders as it goes: the ``--sample_prompts`` images and, at the end, the ``--quality_report``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

import ccd_sampler as cs
from trainer.adapters.controlnet import text_conditioning
from trainer.data.prompts import SamplePrompt, load_condition
from trainer.evaluation.evaluate import evaluate_adapter, validation_pairs
from trainer.evaluation.report import write_report
from trainer.training.networks import EmaUnetLora, Networks
from trainer.training.settings import CodiSettings, ReportSettings


def save_image_grid(images: torch.Tensor, path: Path) -> None:
    """Save ``[B, 3, H, W]`` images in [0, 1] side by side."""
    row = torch.cat(list(images.clamp(0, 1)), dim=-1)
    array = (row.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@torch.no_grad()
def generate_samples(networks: Networks, ema: cs.EMA, codi: CodiSettings, prompts: list[SamplePrompt], step: int,
                     resolution, device, text_cache, *, seed: int, out_dir: Path, name: str) -> list[Path]:
    """Render the sample prompts with the EMA adapter and the CoDi sampler at the recommended steps, into
    ``<out_dir>/sample/<name>_stepNNNNNNNN_KK.png`` (condition | sample)."""
    base = networks.base
    if base.vae is None and base.latent_downscale != 1:  # an SD checkpoint without its VAE: nothing to decode with
        return []
    schedule = base.noise_schedule()
    target = networks.denoiser("target", ema)
    dtype = base.unet.dtype  # the frozen base's; the EMA adapter is float32: autocast makes them meet
    autocast = torch.autocast(torch.device(device).type, dtype=dtype,
                              enabled=dtype in (torch.float16, torch.bfloat16))
    out = []
    for number, sample in enumerate(prompts):
        hint = load_condition(sample, resolution).to(device, base.unet.dtype)
        text = (text_cache.get([sample.prompt], device) if text_cache and sample.prompt in text_cache.outputs
                else base.encode_text([sample.prompt], device=device))
        cfg = sample.cfg if sample.cfg is not None else recommended_cfg(codi)
        uncond = None
        if cfg != 1.0:
            neg = (text_cache.get([sample.negative], device)
                   if text_cache and sample.negative in text_cache.outputs
                   else base.encode_text([sample.negative], device=device))
            uncond = text_conditioning(neg, hint)
        generator = torch.Generator().manual_seed(sample.seed if sample.seed is not None else seed + number)
        h, w = hint.shape[-2] // base.latent_downscale, hint.shape[-1] // base.latent_downscale
        noise = torch.randn((1, base.unet.config.in_channels, h, w), generator=generator).to(device, base.unet.dtype)
        steps = sample.steps or min(codi.recommended_steps, 8)
        with autocast:
            latents = cs.sample(target, noise, cs.codi_timesteps(steps, grid=codi.distill_grid),
                                base.prediction_type, schedule=schedule, mode=codi.sample_sampler,
                                cond=text_conditioning(text, hint), uncond=uncond, cfg=cfg, generator=generator,
                                boundary=codi.boundary, sigma_data=codi.sigma_data,
                                timestep_scaling=codi.timestep_scaling)
        image = base.decode_latents(latents)  # in the VAE's own dtype: SDXL's overflows under fp16 autocast
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        path = Path(out_dir) / "sample" / f"{name}_step{step:08d}_{number:02d}.png"
        save_image_grid(torch.cat([hint.float().cpu(), image.cpu()]), path)
        out.append(path)
    return out


def recommended_cfg(codi: CodiSettings) -> float:
    """The guidance scale an adapter is sampled with: the bottom of its trained range for a CFG-aware adapter (the
    nodes' default too), else 1 (no guidance)."""
    return float(codi.cfg_range[0]) if codi.cfg_range else 1.0


def run_quality_report(networks: Networks, ema: cs.EMA, codi: CodiSettings, report: ReportSettings,
                       validation_dataset, text_cache, device, *, seed: int, out_dir: Path, name: str) -> dict:
    """Score the EMA adapter on the validation pairs and write ``<out_dir>/<name>-report/``."""
    pairs = validation_pairs(validation_dataset, report.quality_max_pairs)
    # with --cache_text_encoder_outputs the text encoders are freed by now: read the cached outputs instead
    encode_text = None if text_cache is None else (lambda prompts, device=None, size=None:
                                                   text_cache.get(prompts, device))
    with EmaUnetLora(networks, ema):
        result = evaluate_adapter(networks.base, networks.target_adapter, pairs, task=codi.task,
                                  steps=report.quality_report_steps, grid=codi.distill_grid,
                                  sampler_mode=codi.sample_sampler, boundary=codi.boundary,
                                  sigma_data=codi.sigma_data, timestep_scaling=codi.timestep_scaling, seed=seed,
                                  reference_steps=report.quality_reference_steps, device=device,
                                  encode_text=encode_text, cfg=recommended_cfg(codi),
                                  hint_start=report.quality_hint_start)
    return write_report(result, Path(out_dir) / f"{name}-report",
                        title=f"CoDi quality report: {name} ({codi.task}, step {ema.num_updates})")
