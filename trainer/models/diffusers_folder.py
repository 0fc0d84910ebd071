"""Diffusers pipeline folders (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` ...) as a
:class:`BaseModel`, offline; the prediction type and schedule come from ``scheduler/scheduler_config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.models.base import DEFAULT_SCHEDULER, TEXT_ENCODING, VAE_SCALING, BaseModel, CheckpointError
from trainer.models.single_file import default_resolution, detect_prediction_type, modelspec_architecture
from trainer.models.tokenizers import is_tokenizer_dir, load_clip_tokenizer, load_tokenizers


def _diffusers_architecture(model_index: dict, unet_config: dict, text_config: dict) -> str:
    if "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if text_config.get("hidden_act") == "gelu" or unet_config.get("cross_attention_dim") == 1024:
        return "sd2"  # OpenCLIP text tower (exact GELU); OpenAI CLIP-L uses quick_gelu
    return "sd1"


def _read_json(path: Path, folder: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"`{folder}`: diffusers folder without `{path.relative_to(folder)}`") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"`{folder}`: `{path.relative_to(folder)}` is not valid JSON ({e})") from None


def load_diffusers_folder(folder: str, v_parameterization, tokenizer_path, dtype,
                          zero_terminal_snr: bool | None = None) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder)
    if not (root / "model_index.json").is_file():
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"`{folder}`: a folder but not a diffusers pipeline (no model_index.json; found "
                              f"{found})")
    model_index = _read_json(root / "model_index.json", folder)
    unet_config = _read_json(root / "unet" / "config.json", folder)
    text_config = _read_json(root / "text_encoder" / "config.json", folder)
    architecture = _diffusers_architecture(model_index, unet_config, text_config)
    scheduler_config = {}
    if (root / "scheduler" / "scheduler_config.json").is_file():
        scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json", folder)
    if v_parameterization is None and scheduler_config.get("prediction_type") in ("v_prediction", "epsilon"):
        prediction, prediction_source = scheduler_config["prediction_type"], "scheduler/scheduler_config.json"
    else:
        prediction, prediction_source = detect_prediction_type(architecture, {}, {}, v_parameterization, folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True, torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True, torch_dtype=dtype) \
            if (root / "vae").is_dir() else None
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True,
                                                  dtype=dtype)]
        if architecture == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", local_files_only=True, dtype=dtype))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"`{folder}`: cannot load the diffusers folder: {e}") from None
    tokenizers = _folder_tokenizers(root, architecture, tokenizer_path)
    resolution = default_resolution(architecture, prediction)
    scheduler = {k: scheduler_config.get(k, v) for k, v in DEFAULT_SCHEDULER.items()}
    zsnr_source = "scheduler/scheduler_config.json" if scheduler["rescale_betas_zero_snr"] else "default"
    if zero_terminal_snr is not None:
        scheduler["rescale_betas_zero_snr"], zsnr_source = bool(zero_terminal_snr), "--zero_terminal_snr"
    return BaseModel(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, architecture=architecture,
                     prediction_type=prediction,
                     modelspec_architecture=modelspec_architecture(architecture, prediction),
                     source=folder, default_resolution=resolution, scheduler=scheduler,
                     vae_scaling_factor=float(vae.config.scaling_factor) if vae is not None
                     else VAE_SCALING[architecture],
                     detection={"prediction_type": prediction_source, "zero_terminal_snr": zsnr_source})


def _folder_tokenizers(root: Path, architecture: str, tokenizer_path) -> list:
    subfolders = ["tokenizer", "tokenizer_2"][: len(TEXT_ENCODING[architecture])]
    if tokenizer_path is None and all(is_tokenizer_dir(root / s) for s in subfolders):
        return [load_clip_tokenizer(root / s) for s in subfolders]
    return load_tokenizers(architecture, tokenizer_path=tokenizer_path, search_from=[root])
