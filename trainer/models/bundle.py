"""CoDi "base bundles": a small base diffusion model the trainer can distill from, kept as a plain folder.

A base bundle is a folder with ``codi_base.json`` (``load_base_model`` recognises it by that file) and diffusers
modules saved with ``save_pretrained`` (safetensors)::

    codi_base.json     {"format": "codi-base-bundle", "version": 1, "architecture": "mini-pixel",
                        "modelspec_architecture": "codi-mini-pixel-v1", "prediction_type": "epsilon",
                        "resolution": 64, "scheduler": {SD's schedule}, "unet": "unet", "vae": null,
                        "text_encoder": null, "vae_scaling_factor": 1.0, "cross_attention_tokens": 1, ...}
    unet/              UNet2DConditionModel (config.json + diffusion_pytorch_model.safetensors)
    vae/               optional AutoencoderKL; without one the base is pixel-space: latents = pixels in [-1, 1]
                       times vae_scaling_factor (1.0), decode = identity, hints at the latent (= image) size
    text_encoder/      optional transformers CLIPTextModel + tokenizer/ (last hidden state, as SD1); without one
                       the base is unconditional: captions are ignored and the UNet cross-attends to zeros
                       ``[B, cross_attention_tokens, cross_attention_dim]``
    split.json, ...    anything else (provenance: the train/test split, the pretraining log, a sample grid)

The pretraining script of the miniature reproduction (``benchmarks/mini/pretrain_base.py``) writes one.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.models.base import DEFAULT_SCHEDULER, BaseModel, CheckpointError
from trainer.models.tokenizers import load_clip_tokenizer

BUNDLE_FILE = "codi_base.json"
BUNDLE_FORMAT = "codi-base-bundle"
BUNDLE_VERSION = 1
PREDICTION_TYPES = ("epsilon", "v_prediction")


def is_bundle(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, BUNDLE_FILE))


@dataclass
class BundleBaseModel(BaseModel):
    """A :class:`BaseModel` from a bundle; conditioning comes from its optional text encoder or is all zeros."""

    cross_attention_tokens: int = 1

    @torch.no_grad()
    def encode_text(self, prompts, device=None, size=None) -> dict:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.text_encoders:  # unconditional base: fixed all-zero conditioning, the captions are ignored
            param = next(self.unet.parameters())
            dim = self.unet.config.cross_attention_dim
            return {"encoder_hidden_states": torch.zeros(len(prompts), self.cross_attention_tokens, dim,
                                                         device=device if device is not None else param.device,
                                                         dtype=param.dtype)}
        encoder, tokenizer = self.text_encoders[0], self.tokenizers[0]
        device = torch.device(device) if device is not None else next(encoder.parameters()).device
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return {"encoder_hidden_states": encoder(ids).last_hidden_state}


def write_bundle(folder, unet, *, architecture: str = "mini-pixel", modelspec_architecture: str = "codi-mini-pixel-v1",
                 prediction_type: str = "epsilon", resolution: int = 64, scheduler: dict | None = None,
                 vae=None, text_encoder=None, tokenizer=None, vae_scaling_factor: float | None = None,
                 extra: dict | None = None, unet_dtype: torch.dtype | None = None) -> Path:
    """Save ``unet`` (and an optional VAE / text encoder + tokenizer) as a base bundle in ``folder``.

    ``vae_scaling_factor``: latents = VAE latents (or, without a VAE, pixels in [-1, 1]) times this; default the
    VAE's own factor, 1.0 for a pixel-space bundle. ``unet_dtype`` stores the UNet's weights in that dtype (e.g.
    float16 for a small committed file; the loader casts them to the dtype it is asked for)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (unet if unet_dtype is None else copy.deepcopy(unet).to(unet_dtype)).save_pretrained(
        folder / "unet", safe_serialization=True)
    if vae is not None:
        vae.save_pretrained(folder / "vae", safe_serialization=True)
    if text_encoder is not None:
        if tokenizer is None:
            raise ValueError("a bundle text encoder needs its tokenizer")
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(folder / "tokenizer")
    manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "architecture": architecture,
                "modelspec_architecture": modelspec_architecture, "prediction_type": prediction_type,
                "resolution": int(resolution), "scheduler": dict(scheduler or DEFAULT_SCHEDULER), "unet": "unet",
                "vae": "vae" if vae is not None else None,
                "text_encoder": "text_encoder" if text_encoder is not None else None,
                "tokenizer": "tokenizer" if text_encoder is not None else None,
                "vae_scaling_factor": float(vae_scaling_factor if vae_scaling_factor is not None
                                            else vae.config.scaling_factor if vae is not None else 1.0),
                "cross_attention_tokens": 1, **(extra or {})}
    (folder / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def read_manifest(folder) -> dict:
    path = Path(folder) / BUNDLE_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"`{path}`: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"`{path}`: not a CoDi base bundle (format {manifest.get('format')!r}, expected "
                              f"{BUNDLE_FORMAT!r})" if isinstance(manifest, dict) else f"`{path}`: not a JSON object")
    if int(manifest.get("version", 0)) > BUNDLE_VERSION:
        raise CheckpointError(f"`{path}`: bundle version {manifest['version']} is newer than this trainer reads "
                              f"({BUNDLE_VERSION}); update the trainer")
    for key in ("architecture", "prediction_type", "resolution", "unet"):
        if key not in manifest:
            raise CheckpointError(f"`{path}`: missing `{key}`")
    if manifest["prediction_type"] not in PREDICTION_TYPES:
        raise CheckpointError(f"`{path}`: prediction_type {manifest['prediction_type']!r} is not one of "
                              f"{PREDICTION_TYPES}")
    return manifest


def load_bundle(folder, *, dtype: torch.dtype = torch.float32,
                v_parameterization: bool | None = None) -> BundleBaseModel:
    """The :class:`BundleBaseModel` of a bundle folder (offline; modules in eval mode, frozen)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = Path(folder)
    manifest = read_manifest(root)
    prediction = manifest["prediction_type"]
    if v_parameterization is not None and (prediction == "v_prediction") != bool(v_parameterization):
        raise CheckpointError(f"`{folder}`: the bundle was trained for {prediction}; --v_parameterization "
                              "cannot change that")

    def sub(key):
        name = manifest.get(key)
        if not name:
            return None
        path = root / name
        if not path.is_dir():
            raise CheckpointError(f"`{folder}`: `{key}` names `{name}`, which is not a folder in the bundle")
        return path

    try:
        unet = UNet2DConditionModel.from_pretrained(sub("unet"), local_files_only=True, torch_dtype=dtype)
        vae_dir = sub("vae")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, torch_dtype=dtype) if vae_dir else None
        text_encoders, tokenizers = [], []
        te_dir = sub("text_encoder")
        if te_dir is not None:
            from transformers import CLIPTextModel

            text_encoders = [CLIPTextModel.from_pretrained(te_dir, local_files_only=True, dtype=dtype)]
            tokenizers = [load_clip_tokenizer(sub("tokenizer") or root / "tokenizer")]
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"`{folder}`: cannot load the base bundle: {e}") from None
    if vae is None and unet.config.in_channels != 3:
        raise CheckpointError(f"`{folder}`: a bundle without a VAE is pixel-space and needs a 3-channel UNet, "
                              f"found in_channels={unet.config.in_channels}")
    scheduler = {k: manifest.get("scheduler", {}).get(k, v) for k, v in DEFAULT_SCHEDULER.items()}
    downscale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    return BundleBaseModel(
        unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
        architecture=str(manifest["architecture"]), prediction_type=prediction,
        modelspec_architecture=str(manifest.get("modelspec_architecture") or f"codi-{manifest['architecture']}"),
        source=os.fspath(folder), default_resolution=int(manifest["resolution"]), scheduler=scheduler,
        vae_scaling_factor=float(manifest.get("vae_scaling_factor", 1.0 if vae is None
                                              else vae.config.scaling_factor)),
        latent_downscale=downscale, cross_attention_tokens=int(manifest.get("cross_attention_tokens", 1)),
        detection={"prediction_type": "codi_base.json", "zero_terminal_snr": "codi_base.json"})
