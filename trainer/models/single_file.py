"""Single-file Stable Diffusion checkpoints (the original "ldm" layout) as diffusers / transformers modules, offline.

``.safetensors`` files are header-checked before anything is read; ``.ckpt`` / ``.pt`` / ``.pth`` only go through
``torch.load(weights_only=True)``, so a pickle is never executed. The architecture (SD1.x / SD2.x / SDXL base) is
detected from the key layout; the UNet, VAE and text-encoder configs are inferred from tensor shapes, so full-size
models and the tiny test models go through the same code. Weights are converted with diffusers' own ldm converters
(UNet, VAE, CLIP-L) and a small OpenCLIP -> transformers mapping written here, then loaded with strict key and shape
checks: a file that does not fit gives a :class:`CheckpointError` naming what is missing or mis-shaped.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch

from ccd_sampler.metadata import read_safetensors_header
from trainer.models.base import DEFAULT_SCHEDULER, VAE_SCALING, BaseModel, CheckpointError
from trainer.models.tokenizers import load_tokenizers

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

BOS_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407

# Keys present in real checkpoints that no trainer module uses.
IGNORED_KEY_PATTERNS = (
    r"^v_pred$", r"^ztsnr$", r"^alphas_cumprod", r"^alphas_cumprod_prev$", r"^betas$",
    r"^log_one_minus_alphas_cumprod$",
    r"^posterior_", r"^sqrt_", r"^model_ema\.", r"^logvar$", r"^lvlb_weights$", r"^first_stage_model\.loss\.",
    r"\.position_ids$", r"^cond_stage_model\.model\.logit_scale$", r"^conditioner\.embedders\.1\.model\.logit_scale$",
    r"^cond_stage_model\.model\.text_projection$",  # SD2 uses hidden states, not the projected embedding
)


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a single-file checkpoint. Safetensors are header-checked first; pickles are
    only opened with ``torch.load(weights_only=True)`` (never executed) and unwrapped from ``state_dict``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"`{path}`: file not found")
    if path.lower().endswith(PICKLE_SUFFIXES):
        return _read_pickle_checkpoint(path), {}
    if not path.lower().endswith(".safetensors"):
        raise CheckpointError(f"`{path}`: unsupported file type (expected .safetensors, .ckpt, .pt or .pth, or a "
                              "diffusers folder)")
    header, metadata = read_header(path)
    if not header:
        raise CheckpointError(f"`{path}`: the safetensors file contains no tensors")
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu"), metadata
    except Exception as e:  # safetensors_rust.SafetensorError and friends
        raise CheckpointError(f"`{path}`: corrupt safetensors file ({e})") from None


def read_header(path) -> tuple[dict, dict[str, str]]:
    """Tensor index + metadata of a safetensors file, as :class:`CheckpointError` on failure."""
    try:
        return read_safetensors_header(path)
    except ValueError as e:
        message = str(e)
        prefix = f"{os.fspath(path)}: "
        raise CheckpointError(f"`{path}`: {message.removeprefix(prefix)}") from None


def _read_pickle_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"`{path}`: empty file (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"`{path}`: a pickle .ckpt that torch.load(weights_only=True) refuses: "
                              f"{_unpickler_reason(e)}. Nothing in it was executed; convert it to .safetensors "
                              "with a tool you trust, or use the .safetensors release of the model.") from None
    except Exception as e:  # truncated zip, random bytes, ...
        raise CheckpointError(f"`{path}`: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"`{path}`: expected a state dict, found a {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"`{path}`: the checkpoint contains no tensors")
    return tensors


def _unpickler_reason(error: Exception) -> str:
    """The one informative line of torch's weights-only refusal (e.g. "Unsupported global: GLOBAL x.Y ...")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0]
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


# ------------------------------------------------------------------------------------------------------- detection


def shapes_of(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` from a state dict or a safetensors header index."""
    out = {}
    for key, value in state_dict.items():
        out[key] = tuple(value["shape"]) if isinstance(value, Mapping) else tuple(value.shape)
    return out


def detect_architecture(shapes: Mapping[str, tuple], path: str) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the ldm key layout, or :class:`CheckpointError` saying what the file
    looks like instead."""
    if not shapes:
        raise CheckpointError(f"`{path}`: the file contains no tensors")
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET_PREFIX + "input_blocks.0.0."):
        raise CheckpointError(f"`{path}`: unsupported checkpoint: found {len(shapes)} tensors, no UNet keys "
                              f"(`{UNET_PREFIX}*`); {describe_keys(keys)}")
    if has(SDXL_CLIP_G_PREFIX) and has(SDXL_CLIP_L_PREFIX):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise CheckpointError(f"`{path}`: this is an SDXL refiner (one OpenCLIP-bigG text encoder); only SDXL base "
                              "checkpoints are supported")
    if has(SD2_CLIP_PREFIX):
        return "sd2"
    if has(SD1_CLIP_PREFIX):
        return "sd1"
    context = _first_shape(shapes, "attn2.to_k.weight")
    guess = {768: "an SD1.x", 1024: "an SD2.x", 2048: "an SDXL"}.get(context[1] if context else None, "a")
    raise CheckpointError(f"`{path}`: found the UNet of {guess} model but no text encoder (`{SD1_CLIP_PREFIX}*`, "
                          f"`{SD2_CLIP_PREFIX}*` or `conditioner.embedders.*`); a UNet-only file cannot be "
                          "trained from — use the full checkpoint")


def describe_keys(keys: Iterable[str]) -> str:
    """A short human description of what a non-checkpoint state dict seems to be."""
    keys = list(keys)
    if not keys:
        return "the file is empty"
    probes = [
        (lambda k: k.startswith(("lora_unet_", "lora_te")), "this looks like a LoRA (lora_unet_* keys)"),
        (lambda k: "lora_controlnet" in k, "this looks like a Control-LoRA"),
        (lambda k: ".lora_A." in k or ".lora_down." in k or "lora_layer" in k, "this looks like a LoRA"),
        (lambda k: k.startswith(("control_model.", "controlnet_cond_embedding.")) or "zero_convs.0" in k,
         "this looks like a ControlNet"),
        (lambda k: k.startswith(("down_blocks.", "conv_in.weight", "mid_block.")) and "resnets" in k,
         "this looks like a diffusers UNet or VAE file (use the diffusers folder instead)"),
        (lambda k: k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")),
         "this looks like a VAE (pass it with --vae)"),
        (lambda k: k in ("emb_params", "string_to_param") or k.startswith("string_to_param"),
         "this looks like a textual-inversion embedding"),
        (lambda k: k.startswith(("double_blocks.", "joint_blocks.", "model.diffusion_model.joint_blocks.",
                                 "model.diffusion_model.double_blocks.", "transformer_blocks.")),
         "this looks like a transformer (DiT/MMDiT) model, not SD1/SD2/SDXL"),
    ]
    for probe, text in probes:
        if any(probe(k) for k in keys):
            return text
    sample = ", ".join(f"`{k}`" for k in sorted(keys)[:3])
    return f"unknown architecture (first keys: {sample})"


def _first_shape(shapes: Mapping[str, tuple], suffix: str) -> tuple | None:
    for key in sorted(shapes):
        if key.startswith(UNET_PREFIX) and key.endswith(suffix):
            return shapes[key]
    return None


# ComfyUI's evidence for an SD2 v-prediction model without a marker (supported_models.SD20.model_type): the spread
# of one LayerNorm bias deep in the decoder is larger in the 768-v models than in the 512 epsilon ones.
SD2_V_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_PROBE_STD = 0.09


def detect_prediction_type(architecture: str, state_dict: Mapping[str, Any], metadata: Mapping[str, str],
                           v_parameterization: bool | None, path: str) -> tuple[str, str]:
    """``(prediction type, why)``: ``--v_parameterization`` > a ``v_pred`` key > safetensors metadata
    (``modelspec.prediction_type``, ``modelspec.architecture`` containing ``768-v``) > for SD2, the weights (as
    ComfyUI decides) > epsilon, with a warning for an SD2 file none of these settle."""
    if v_parameterization is not None:
        return ("v_prediction" if v_parameterization else "epsilon"), "--v_parameterization"
    if "v_pred" in state_dict:
        return "v_prediction", "the file's `v_pred` key"
    declared = str(metadata.get("modelspec.prediction_type", "")).strip().lower().replace("-", "_")
    if declared in ("v", "v_prediction", "vpred", "v_pred"):
        return "v_prediction", "modelspec.prediction_type metadata"
    if "768-v" in str(metadata.get("modelspec.architecture", "")):
        return "v_prediction", "modelspec.architecture metadata (768-v)"
    if declared in ("epsilon", "eps"):
        return "epsilon", "modelspec.prediction_type metadata"
    if architecture == "sd2":
        probe = state_dict.get(SD2_V_PROBE_KEY)
        if probe is not None and hasattr(probe, "float"):
            spread = float(probe.float().std(unbiased=False))
            kind = "v_prediction" if spread > SD2_V_PROBE_STD else "epsilon"
            return kind, (f"the weights: std of `{SD2_V_PROBE_KEY}` = {spread:.3f} "
                          f"{'>' if kind == 'v_prediction' else '<='} {SD2_V_PROBE_STD} (ComfyUI's test)")
        logger.warning("%s: SD2.x checkpoint without a prediction-type marker; assuming epsilon (SD2 512-base). "
                       "SD2-768 checkpoints are v-prediction: pass --v_parameterization for them.", path)
        return "epsilon", "default (SD2 without a marker: pass --v_parameterization for a 768-v model)"
    return "epsilon", "default"


def detect_zero_terminal_snr(state_dict: Mapping[str, Any], zero_terminal_snr: bool | None) -> tuple[bool, str]:
    """``(zero terminal SNR?, why)``: ``--zero_terminal_snr`` > a ``ztsnr`` key (written by the tools that make such
    checkpoints; ComfyUI reads it the same way) > no."""
    if zero_terminal_snr is not None:
        return bool(zero_terminal_snr), "--zero_terminal_snr"
    if "ztsnr" in state_dict:
        return True, "the file's `ztsnr` key"
    return False, "default"


def modelspec_architecture(architecture: str, prediction_type: str) -> str:
    if architecture == "sd1":
        return "stable-diffusion-v1"
    if architecture == "sd2":
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return "stable-diffusion-xl-v1-base"


def default_resolution(architecture: str, prediction_type: str, metadata: Mapping[str, str] | None = None) -> int:
    declared = re.match(r"^\s*(\d+)", str((metadata or {}).get("modelspec.resolution", "")))
    if declared:
        return int(declared.group(1))
    if architecture == "sdxl":
        return 1024
    return 768 if architecture == "sd2" and prediction_type == "v_prediction" else 512


# ------------------------------------------------------------------------------------------- config from shapes


def standard_unet_config(architecture: str) -> dict:
    """The diffusers UNet config of the full-size SD1.5 / SD2.x / SDXL base models — exactly what
    :func:`infer_unet_config` derives from their checkpoints (a test checks this); for benchmarks and dry runs."""
    sd1 = {"sample_size": 64, "in_channels": 4, "out_channels": 4,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
           "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
           "attention_head_dim": 8, "use_linear_projection": False, "transformer_layers_per_block": [1, 1, 1, 1],
           "norm_num_groups": 32}
    if architecture == "sd1":
        return sd1
    if architecture == "sd2":
        return {**sd1, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                "use_linear_projection": True, "upcast_attention": True}
    if architecture == "sdxl":
        return {**sd1, "sample_size": 128, "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                "up_block_types": ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], "block_out_channels": [320, 640, 1280],
                "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
                "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
    raise ValueError(f"unknown architecture {architecture!r} (expected sd1, sd2 or sdxl)")


def _block_indices(shapes: Mapping[str, tuple], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _transformer_depth(shapes: Mapping[str, tuple], prefix: str) -> int:
    return len(_block_indices(shapes, prefix + "transformer_blocks."))


def infer_unet_config(shapes: Mapping[str, tuple], architecture: str, *, pooled_dim: int | None = None,
                      resolution: int = 512, path: str = "") -> dict:
    """A diffusers ``UNet2DConditionModel`` config from the shapes of an ldm UNet (``model.diffusion_model.*``)."""
    p = UNET_PREFIX
    model_channels, in_channels = shapes[p + "input_blocks.0.0.weight"][:2]
    levels = [{"channels": None, "res_blocks": 0, "depth": 0}]
    for i in _block_indices(shapes, p + "input_blocks.")[1:]:
        block = f"{p}input_blocks.{i}."
        if block + "0.op.weight" in shapes:  # a downsampler closes the level
            levels.append({"channels": None, "res_blocks": 0, "depth": 0})
            continue
        level = levels[-1]
        level["res_blocks"] += 1
        level["channels"] = shapes[block + "0.out_layers.3.weight"][0]
        level["depth"] = max(level["depth"], _transformer_depth(shapes, block + "1."))
    res_blocks = {lv["res_blocks"] for lv in levels}
    if len(res_blocks) != 1 or None in [lv["channels"] for lv in levels]:
        raise CheckpointError(f"`{path}`: unsupported UNet layout: residual blocks per level "
                              f"{[lv['res_blocks'] for lv in levels]} (diffusers needs the same number per level)")
    mid_depth = _transformer_depth(shapes, p + "middle_block.1.")
    if mid_depth == 0:
        raise CheckpointError(f"`{path}`: unsupported UNet layout: no attention in the middle block")
    context = _first_shape(shapes, "attn2.to_k.weight")
    proj_in = _first_shape(shapes, "proj_in.weight")
    channels = [lv["channels"] for lv in levels]
    depths = [lv["depth"] for lv in levels]
    # diffusers' mid block takes its depth and heads from the last level's entry.
    layers_per_level = [d if d else 1 for d in depths[:-1]] + [depths[-1] or mid_depth]
    if layers_per_level[-1] != mid_depth:
        raise CheckpointError(f"`{path}`: unsupported UNet layout: last level transformer depth {depths[-1]} != "
                              f"middle block depth {mid_depth}")
    heads = 8 if architecture == "sd1" else [max(1, c // 64) for c in channels]  # SD1: 8 heads; SD2/SDXL: 64/head
    config = {
        "sample_size": resolution // 8,
        "in_channels": in_channels,
        "out_channels": shapes[p + "out.2.weight"][0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "block_out_channels": channels,
        "layers_per_block": res_blocks.pop(),
        "cross_attention_dim": context[1],
        "attention_head_dim": heads,
        "use_linear_projection": len(proj_in) == 2,
        "transformer_layers_per_block": layers_per_level,
        "norm_num_groups": 32,
    }
    if architecture == "sd2":
        config["upcast_attention"] = True  # as diffusers' SD2 configs (matters in fp16 only)
    label = p + "label_emb.0.0.weight"
    if label in shapes:
        adm_in = shapes[label][1]
        pooled = pooled_dim if pooled_dim is not None else 1280
        config.update({"addition_embed_type": "text_time", "addition_time_embed_dim": (adm_in - pooled) // 6,
                       "projection_class_embeddings_input_dim": adm_in})
    return config


def infer_ldm_vae_config(shapes: Mapping[str, tuple], *, scaling_factor: float, resolution: int = 512) -> dict:
    """A diffusers ``AutoencoderKL`` config from the shapes of an ldm VAE (``encoder.down.*``, no prefix)."""
    levels = _block_indices(shapes, "encoder.down.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(_block_indices(shapes, "encoder.down.0.block.")),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "norm_num_groups": 32,
        "sample_size": resolution,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


def infer_diffusers_vae_config(shapes: Mapping[str, tuple], *, scaling_factor: float) -> dict:
    """A diffusers ``AutoencoderKL`` config from the shapes of a diffusers-layout VAE state dict."""
    levels = _block_indices(shapes, "encoder.down_blocks.")
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in levels],
        "layers_per_block": len(_block_indices(shapes, "encoder.down_blocks.0.resnets.")),
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "norm_num_groups": 32,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in shapes),
    }


def infer_clip_config(shapes: Mapping[str, tuple], *, open_clip: bool, projection_dim: int | None = None):
    """A ``transformers.CLIPTextConfig`` from transformers-layout CLIP text weights (no ``text_model.`` prefix).
    OpenAI CLIP-L uses quick-GELU, OpenCLIP (SD2's ViT-H, SDXL's bigG) exact GELU; heads are ``hidden / 64``."""
    from transformers import CLIPTextConfig

    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(_block_indices(shapes, "encoder.layers.")),
        num_attention_heads=max(1, hidden // 64), intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
        hidden_act="gelu" if open_clip else "quick_gelu", layer_norm_eps=1e-5,
        projection_dim=projection_dim or hidden, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=1,
    )


# ---------------------------------------------------------------------------------------------- weight conversion


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def clip_l_to_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ldm CLIP-L weights (prefix stripped; ``text_model.*`` or older bare ``embeddings.*``) to transformers keys
    without the ``text_model.`` prefix; ``position_ids`` buffers are dropped."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("text_model.")
        if not key.endswith("position_ids"):
            out[key] = value
    return out


_OPEN_CLIP_RENAMES = [  # (OpenCLIP, transformers) substrings inside a resblock
    (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".attn.out_proj.", ".self_attn.out_proj."),
    (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
]


def open_clip_to_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower weights (prefix stripped) to transformers CLIP keys without ``text_model.``: fused
    ``in_proj`` split into q/k/v, ``text_projection`` transposed into a Linear weight; ``logit_scale`` dropped."""
    out = {}
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key[len("ln_final."):]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            new = "encoder.layers." + key[len("transformer.resblocks."):]
            if new.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
                base, kind = new.rsplit(".attn.in_proj_", 1)
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{base}.self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for old, replacement in _OPEN_CLIP_RENAMES:
                new = new.replace(old, replacement)
            out[new] = value
        elif key != "logit_scale" and key != "attn_mask":
            out[key] = value  # left for the strict check to report
    return out


def _fit_text_model_prefix(sd: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Add ``text_model.`` where the transformers class still nests it (CLIPTextModelWithProjection)."""
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}


def load_weights_strict(module, sd: Mapping[str, torch.Tensor | None], *, what: str, path: str,
                        dtype: torch.dtype) -> None:
    """Load ``sd`` into ``module`` (built on the meta device) checking keys and shapes; the error lists what is
    missing, unexpected or mis-shaped."""
    expected = module.state_dict()
    given = {k: v for k, v in sd.items() if v is not None}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(given) & set(expected) if tuple(given[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                sample = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {label} ({sample})")
        raise CheckpointError(f"`{path}`: the {what} weights do not match the architecture inferred from the file: "
                              + "; ".join(parts))
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in given.items()}
    module.load_state_dict(cast, strict=True, assign=True)


def _empty_weights():
    """Build modules without allocating/initialising parameters (they are replaced by the checkpoint's)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a trainer requirement
        return nullcontext()
    return init_empty_weights(include_buffers=False)


def build_unet(sd: Mapping[str, torch.Tensor], config: dict, *, path: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(sd, config)
    with _empty_weights():
        unet = UNet2DConditionModel(**config)
    load_weights_strict(unet, converted, what="UNet", path=path, dtype=dtype)
    return unet


def build_vae_from_ldm(vae_sd: Mapping[str, torch.Tensor], *, scaling_factor: float, path: str, dtype: torch.dtype,
                       resolution: int = 512):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = infer_ldm_vae_config(shapes_of(vae_sd), scaling_factor=scaling_factor, resolution=resolution)
    converted = convert_ldm_vae_checkpoint(dict(vae_sd), config)
    with _empty_weights():
        vae = AutoencoderKL(**config)
    load_weights_strict(vae, converted, what="VAE", path=path, dtype=dtype)
    return vae


def build_text_encoder(sd: dict[str, torch.Tensor], *, open_clip: bool, with_projection: bool, what: str,
                       path: str, dtype: torch.dtype):
    """A transformers CLIP text model from transformers-layout weights (without ``text_model.``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shapes = shapes_of(sd)
    projection = shapes.get("text_projection.weight")
    config = infer_clip_config(shapes, open_clip=open_clip, projection_dim=projection[0] if projection else None)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _empty_weights():
        model = cls(config)
    load_weights_strict(model, _fit_text_model_prefix(sd, model), what=what, path=path, dtype=dtype)
    return model


def _text_encoders_from_ldm(sd: Mapping[str, torch.Tensor], architecture: str, *, path: str, dtype: torch.dtype):
    if architecture == "sd1":
        clip = clip_l_to_transformers(strip_prefix(sd, SD1_CLIP_PREFIX))
        return [build_text_encoder(clip, open_clip=False, with_projection=False, what="CLIP-L text encoder",
                                   path=path, dtype=dtype)]
    if architecture == "sd2":
        clip = open_clip_to_transformers(strip_prefix(sd, SD2_CLIP_PREFIX))
        clip.pop("text_projection.weight", None)  # SD2 conditions on hidden states only
        return [build_text_encoder(clip, open_clip=True, with_projection=False, what="OpenCLIP text encoder",
                                   path=path, dtype=dtype)]
    clip_l = clip_l_to_transformers(strip_prefix(sd, SDXL_CLIP_L_PREFIX))
    clip_g = open_clip_to_transformers(strip_prefix(sd, SDXL_CLIP_G_PREFIX))
    return [build_text_encoder(clip_l, open_clip=False, with_projection=False, what="SDXL CLIP-L text encoder",
                               path=path, dtype=dtype),
            build_text_encoder(clip_g, open_clip=True, with_projection=True, what="SDXL OpenCLIP-G text encoder",
                               path=path, dtype=dtype)]


def _check_unused_keys(sd: Mapping[str, torch.Tensor], architecture: str, path: str) -> None:
    prefixes = {"sd1": (UNET_PREFIX, VAE_PREFIX, SD1_CLIP_PREFIX), "sd2": (UNET_PREFIX, VAE_PREFIX, SD2_CLIP_PREFIX),
                "sdxl": (UNET_PREFIX, VAE_PREFIX, SDXL_CLIP_L_PREFIX, SDXL_CLIP_G_PREFIX)}[architecture]
    ignored = [re.compile(p) for p in IGNORED_KEY_PATTERNS]
    leftover = sorted(k for k in sd if not k.startswith(prefixes) and not any(p.search(k) for p in ignored))
    if leftover:
        logger.warning("%s: %d keys not used by the %s loader (e.g. %s)", path, len(leftover), architecture,
                       ", ".join(leftover[:4]))


# ---------------------------------------------------------------------------------------------- single-file path


def load_single_file(path: str, v_parameterization, tokenizer_path, dtype,
                     zero_terminal_snr: bool | None = None) -> BaseModel:
    if path.lower().endswith(".safetensors"):  # detect from the header before reading gigabytes
        header, metadata = read_header(path)
        detect_architecture(shapes_of(header), path)
    sd, metadata = read_checkpoint(path)
    shapes = shapes_of(sd)
    architecture = detect_architecture(shapes, path)
    prediction, prediction_source = detect_prediction_type(architecture, sd, metadata, v_parameterization, path)
    zsnr, zsnr_source = detect_zero_terminal_snr(sd, zero_terminal_snr)
    resolution = default_resolution(architecture, prediction, metadata)
    _check_unused_keys(sd, architecture, path)

    text_encoders = _text_encoders_from_ldm(sd, architecture, path=path, dtype=dtype)
    pooled_dim = text_encoders[-1].config.projection_dim if architecture == "sdxl" else None
    unet_config = infer_unet_config(shapes, architecture, pooled_dim=pooled_dim, resolution=resolution, path=path)
    _check_context_dim(unet_config, text_encoders, path)
    unet = build_unet(sd, unet_config, path=path, dtype=dtype)
    vae_sd = strip_prefix(sd, VAE_PREFIX)
    vae = None
    if vae_sd:
        vae = build_vae_from_ldm(vae_sd, scaling_factor=VAE_SCALING[architecture], path=path, dtype=dtype,
                                 resolution=resolution)
    else:
        logger.warning("%s: no VAE in the checkpoint (`%s*`); pass --vae", path, VAE_PREFIX)
    tokenizers = load_tokenizers(architecture, tokenizer_path=tokenizer_path, search_from=[path])
    return BaseModel(unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                     architecture=architecture, prediction_type=prediction,
                     modelspec_architecture=modelspec_architecture(architecture, prediction), source=path,
                     default_resolution=resolution,
                     scheduler={**DEFAULT_SCHEDULER, "rescale_betas_zero_snr": zsnr},
                     vae_scaling_factor=float(vae.config.scaling_factor) if vae is not None
                     else VAE_SCALING[architecture],
                     detection={"prediction_type": prediction_source, "zero_terminal_snr": zsnr_source})


def _check_context_dim(unet_config: dict, text_encoders: list, path: str) -> None:
    width = sum(te.config.hidden_size for te in text_encoders)
    if width != unet_config["cross_attention_dim"]:
        raise CheckpointError(f"`{path}`: the text encoder(s) give {width}-wide states but the UNet cross-attends "
                              f"to {unet_config['cross_attention_dim']}")


# -------------------------------------------------------------------------------------------------------- the VAE


def load_vae(path, *, architecture: str = "sd1", dtype: torch.dtype = torch.float32):
    """A VAE from ``--vae``: a diffusers VAE folder (``config.json``), or a single file with ldm keys
    (``encoder.*``/``decoder.*`` or ``first_stage_model.*``) or diffusers keys (``encoder.down_blocks.*``)."""
    from diffusers import AutoencoderKL

    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"`{path}`: a VAE folder needs a diffusers config.json")
        return AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    sd, _ = read_checkpoint(path)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = strip_prefix(sd, VAE_PREFIX)
    scaling = VAE_SCALING.get(architecture, 0.18215)
    if "encoder.down.0.block.0.conv1.weight" in sd:
        sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
        return build_vae_from_ldm(sd, scaling_factor=scaling, path=path, dtype=dtype)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        config = infer_diffusers_vae_config(shapes_of(sd), scaling_factor=scaling)
        sd = {k: (v[:, :, 0, 0] if v.ndim == 4 and ".attentions." in k and "group_norm" not in k else v)
              for k, v in sd.items()}
        with _empty_weights():
            vae = AutoencoderKL(**config)
        load_weights_strict(vae, sd, what="VAE", path=path, dtype=dtype)
        return vae
    raise CheckpointError(f"`{path}`: not a VAE: found {len(sd)} tensors without `encoder.down.*` or "
                          f"`encoder.down_blocks.*` keys; {describe_keys(sd)}")
