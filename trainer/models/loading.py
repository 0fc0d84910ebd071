"""``load_base_model``: any base the trainer accepts -- a single-file checkpoint, a diffusers folder or a CoDi base
bundle -- as a frozen :class:`BaseModel`, offline (``HF_HUB_OFFLINE=1``, every ``from_pretrained`` local only)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from trainer.models.base import BaseModel, CheckpointError
from trainer.models.bundle import is_bundle, load_bundle
from trainer.models.diffusers_folder import load_diffusers_folder
from trainer.models.single_file import load_single_file, load_vae

logger = logging.getLogger(__name__)


def load_base_model(path, *, v_parameterization: bool | None = None, v2: bool = False, vae_path=None,
                    tokenizer_path=None, dtype: torch.dtype = torch.float32, clip_skip: int | None = None,
                    zero_terminal_snr: bool | None = None) -> BaseModel:
    """Load a base model from a single-file checkpoint, a diffusers folder or a base bundle, offline.

    ``v_parameterization`` (kohya ``--v_parameterization``) overrides the detected prediction type both ways;
    ``v2`` (kohya ``--v2``) is only checked against detection; ``vae_path`` replaces the checkpoint's VAE (single
    file in ldm or diffusers layout, or a diffusers VAE folder); ``tokenizer_path`` is a folder with ``vocab.json`` +
    ``merges.txt``; ``clip_skip`` (kohya ``--clip_skip``) conditions on the text encoder's layer ``-clip_skip``;
    ``zero_terminal_snr`` overrides the detected schedule. Raises :class:`CheckpointError` naming the file on
    anything unreadable or unsupported."""
    source = os.fspath(path)
    if is_bundle(source):  # a CoDi "base bundle" folder (codi_base.json), e.g. the benchmarks/mini base
        if vae_path is not None:
            raise CheckpointError(f"`{source}`: --vae cannot replace the VAE of a base bundle (its UNet was trained "
                                  "for the bundle's own latent space)")
        model = load_bundle(source, dtype=dtype, v_parameterization=v_parameterization)
        if zero_terminal_snr is not None and zero_terminal_snr != model.scheduler["rescale_betas_zero_snr"]:
            raise CheckpointError(f"`{source}`: the bundle was trained with rescale_betas_zero_snr = "
                                  f"{model.scheduler['rescale_betas_zero_snr']}; --zero_terminal_snr cannot change it")
    elif os.path.isdir(source):
        model = load_diffusers_folder(source, v_parameterization, tokenizer_path, dtype, zero_terminal_snr)
    else:
        model = load_single_file(source, v_parameterization, tokenizer_path, dtype, zero_terminal_snr)
    if model.scheduler.get("rescale_betas_zero_snr") and model.prediction_type == "epsilon":
        raise CheckpointError(f"`{source}`: a zero-terminal-SNR schedule needs a v-prediction model (epsilon cannot "
                              "predict anything at alpha = 0): add --v_parameterization, or drop --zero_terminal_snr")
    if clip_skip is not None:
        if not model.text_encoders:
            raise CheckpointError(f"`{source}`: --clip_skip needs a text encoder; this base has none")
        layers = min(te.config.num_hidden_layers for te in model.text_encoders)
        if not 1 <= clip_skip <= layers:
            raise CheckpointError(f"--clip_skip {clip_skip}: the text encoder of `{source}` has {layers} layers")
        model.clip_skip = clip_skip
    if v2 and model.architecture != "sd2":
        logger.warning("%s: --v2 was given but the file is %s (detected from its keys); using the detected "
                       "architecture.", source, model.architecture)
    if vae_path is not None:
        model.vae = load_vae(vae_path, architecture=model.architecture, dtype=dtype)
        model.vae_scaling_factor = float(model.vae.config.scaling_factor)
    for module in [model.unet, model.vae, *model.text_encoders]:
        if module is not None:
            module.eval().requires_grad_(False)
    return model


def model_hash(path) -> str:
    """SHA-256 (hex) of a checkpoint file, read in chunks; for a diffusers folder, of its UNet weights file."""
    path = Path(path)
    if path.is_dir():
        path = _diffusers_weights_file(path / "unet")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _diffusers_weights_file(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"`{folder}`: no diffusers weights file (diffusion_pytorch_model.safetensors) found")
