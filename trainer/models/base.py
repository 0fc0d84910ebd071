"""The base model the trainer distills from, whatever file it came from, and the facts the trainer needs about it.

:class:`BaseModel` holds diffusers / transformers modules (``UNet2DConditionModel``, ``AutoencoderKL`` or none for a
pixel-space base, CLIP text encoders) with their tokenizers, plus the architecture, prediction type, default
resolution, noise schedule and VAE scaling factor. The loaders beside this module (single files, diffusers folders,
base bundles) all return one; :func:`trainer.models.load_base_model` picks the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import ccd_sampler as cs
from trainer.errors import CodiError

DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "rescale_betas_zero_snr": False}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
TOKEN_LENGTH = 77  # CLIP context length used by every SD text encoder
OPEN_CLIP_PAD = "!"  # OpenCLIP pads with token id 0 ("!"); OpenAI CLIP-L with <|endoftext|>

# The layer each architecture conditions on by default, counted from the end (1 = last): ComfyUI's defaults.
DEFAULT_CLIP_SKIP = {"sd1": 1, "sd2": 2, "sdxl": 2}

# How each architecture turns a prompt into UNet conditioning. One entry per text encoder:
#   layer: "last" = last_hidden_state (after the final layer norm), "penultimate" = hidden_states[-2];
#   final_norm: apply the final layer norm to a penultimate state (SD2 does, SDXL does not); pad: tokenizer pad token.
TEXT_ENCODING = {
    "sd1": [{"layer": "last", "final_norm": True, "pad": None}],
    "sd2": [{"layer": "penultimate", "final_norm": True, "pad": OPEN_CLIP_PAD}],
    "sdxl": [{"layer": "penultimate", "final_norm": False, "pad": None},
             {"layer": "penultimate", "final_norm": False, "pad": OPEN_CLIP_PAD}],  # + pooled text_embeds of #2
}


class CheckpointError(CodiError):
    """A checkpoint could not be read or is not a supported SD1.x / SD2.x / SDXL base model. The message names the
    file and what was found in it."""


@dataclass
class BaseModel:
    """The frozen base model the trainer distills from (diffusers / transformers modules, in eval mode)."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL | None
    text_encoders: list
    tokenizers: list
    architecture: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    modelspec_architecture: str
    source: str
    default_resolution: int
    scheduler: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    vae_scaling_factor: float = 0.18215
    latent_downscale: int = 8  # pixels per latent along a side: 8 for SD's VAE, 1 for a pixel-space base (no VAE)
    clip_skip: int | None = None  # text-encoder layer from the end (--clip_skip); None: the architecture's default
    detection: dict = field(default_factory=dict)  # how the prediction type and schedule were decided, for the log

    @property
    def effective_clip_skip(self) -> int:
        """The text-encoder layer from the end that conditions the UNet (ComfyUI's CLIPSetLastLayer = -this)."""
        return self.clip_skip or DEFAULT_CLIP_SKIP.get(self.architecture, 1)

    def noise_schedule(self) -> cs.NoiseSchedule:
        """The schedule the base was trained on: SD's, or its zero-terminal-SNR rescaling."""
        return cs.NoiseSchedule.from_config(self.scheduler)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents: the VAE decode, or (no VAE: a pixel-space base) the identity up to the
        scaling factor (1.0 in the mini bundle), the inverse of how the trainer encodes pixels then."""
        if self.vae is None:
            if self.latent_downscale != 1:
                raise ValueError(f"{self.source}: no VAE to decode the latents with (pass --vae)")
            return latents / self.vae_scaling_factor
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae_scaling_factor).sample

    @torch.no_grad()
    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1] (the VAE posterior's mean, scaled; a pixel-space base: the pixels times the
        scaling factor): where an img2img start comes from."""
        if self.vae is None:
            if self.latent_downscale != 1:
                raise ValueError(f"{self.source}: no VAE to encode the images with (pass --vae)")
            return images * self.vae_scaling_factor
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean * self.vae_scaling_factor

    @torch.no_grad()
    def encode_text(self, prompts: list[str] | str, device=None, size: int | tuple[int, int] | None = None) -> dict:
        """UNet conditioning for ``prompts``: ``{"encoder_hidden_states": [B, 77, D]}``, and for SDXL also
        ``"added_cond_kwargs": {"text_embeds": [B, P], "time_ids": [B, 6]}`` with time ids (original size, crop
        top-left, target size) = ``(h, w, 0, 0, h, w)`` for ``size`` (default: the default resolution)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = torch.device(device) if device is not None else _module_device(self.text_encoders[0])
        states, pooled = [], None
        for spec, tokenizer, encoder in zip(TEXT_ENCODING[self.architecture], self.tokenizers, self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=TOKEN_LENGTH, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            if self.clip_skip is None and spec["layer"] == "last":
                hidden = out.last_hidden_state
            else:
                hidden = out.hidden_states[-self.effective_clip_skip]
                if spec["final_norm"]:
                    hidden = _final_layer_norm(encoder)(hidden)
            states.append(hidden)
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds
        result: dict = {"encoder_hidden_states": torch.cat(states, dim=-1)}
        if self.architecture == "sdxl":
            h, w = _size_hw(size if size is not None else self.default_resolution)
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=pooled.dtype, device=device)
            result["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
        return result


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _module_device(module) -> torch.device:
    return next(module.parameters()).device


def _final_layer_norm(encoder):
    """The final LayerNorm of a transformers CLIP text model (``CLIPTextModel`` is flat since transformers 5.6,
    ``CLIPTextModelWithProjection`` still wraps a ``text_model``)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm
