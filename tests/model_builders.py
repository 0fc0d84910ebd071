"""Random-weight Stable Diffusion checkpoints built at test time (layer B of ``docs/testing.md``), and their pytest
fixtures.

Every builder makes diffusers / transformers modules with a fixed torch seed (so every tensor is explicitly
initialised: ComfyUI leaves missing weights uninitialised), writes them in the original single-file ("ldm") layout
with its own diffusers -> ldm key mapping, and returns a :class:`BuiltCheckpoint` holding the path and the reference
modules (already rounded to the storage dtype, so a correct loader reproduces them exactly).

* :func:`build_micro_sd15` - SD1.5 layout that the real ComfyUI detects as SD15: UNet model_channels 320 / context 768
  with one level, full-size CLIP-L and full-size VAE (ComfyUI builds both with fixed sizes), stored in fp16.
* :func:`build_micro_sd15_webui` - the micro SD1.5 plus the ``<stem>.yaml`` config AUTOMATIC1111 needs to load it.
* :func:`build_small_sd2v` - SD2.x layout (linear projections, OpenCLIP ``cond_stage_model.model.*``), v-prediction.
* :func:`build_small_sdxl` - SDXL layout (``label_emb`` addition embedding, two text encoders).
* :func:`build_diffusers_folder` - a small SD1-like diffusers pipeline folder.

Session fixtures (register with ``pytest_plugins = ["model_builders"]`` or import them): ``sd1_tokenizer_dir``,
``micro_sd15``, ``micro_sd15_webui``, ``small_sd2v``, ``small_sdxl``, ``sd_diffusers_folder``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass
class BuiltCheckpoint:
    """A checkpoint written by a builder, with the reference modules it was made from."""

    path: Path
    architecture: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    metadata: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def size_mb(self) -> float:
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file()) / 2**20
        return self.path.stat().st_size / 2**20


def sd1_tokenizer_source() -> Path:
    """ComfyUI's ``comfy/sd1_tokenizer`` in the prepared test ComfyUI (``make comfyui``)."""
    from harness import comfyui_dir

    return comfyui_dir() / "comfy" / "sd1_tokenizer"


# ------------------------------------------------------------------------------------------ diffusers -> ldm keys


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's weights in single-file naming, through the trainer's own diffusers -> ldm table."""
    from trainer.models.ldm_keys import diffusers_unet_to_ldm

    return {UNET_PREFIX + k: v for k, v in diffusers_unet_to_ldm(unet.state_dict(), unet.config).items()}


_VAE_ATTENTION_TO_LDM = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL key in ldm (``Encoder``/``Decoder``) naming, without the prefix."""
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    parts = key.split(".")
    coder = parts[0]
    if len(parts) < 3 or parts[1] not in ("down_blocks", "up_blocks", "mid_block"):
        return key
    if parts[1] == "mid_block":
        kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"{coder}.mid.block_{j + 1}.{rest}"
        for old, new in _VAE_ATTENTION_TO_LDM.items():
            if rest.startswith(old):
                return f"{coder}.mid.attn_1.{new}{rest[len(old):]}"
        raise KeyError(key)
    level = int(parts[2]) if parts[1] == "down_blocks" else num_levels - 1 - int(parts[2])
    ldm_level = f"{coder}.{'down' if parts[1] == 'down_blocks' else 'up'}.{level}"
    kind = parts[3]
    if kind == "resnets":
        return f"{ldm_level}.block.{parts[4]}." + ".".join(parts[5:])
    name = "downsample" if kind == "downsamplers" else "upsample"
    return f"{ldm_level}.{name}.conv." + ".".join(parts[6:])


def vae_to_ldm(vae, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The VAE's weights (or ``sd``, e.g. the same weights cast for storage) in ldm layout."""
    num_levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in (sd if sd is not None else vae.state_dict()).items():
        ldm_key = vae_key_to_ldm(key, num_levels)
        if ".mid.attn_1." in ldm_key and value.ndim == 2:  # ldm attention uses 1x1 convolutions
            value = value[:, :, None, None]
        out[VAE_PREFIX + ldm_key] = value
    return out


def clip_to_ldm(text_model, prefix: str, sd: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights (or ``sd``) in the HF-in-ldm layout (``<prefix>text_model.*``) SD1/SDXL use."""
    sd = sd if sd is not None else text_model.state_dict()
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()
            if not k.endswith("position_ids") and not k.startswith("text_projection")}


_TO_OPEN_CLIP = [(".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".self_attn.out_proj.", ".attn.out_proj."),
                 (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]


def clip_to_open_clip(text_model, prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text weights in OpenCLIP layout (``<prefix>transformer.resblocks.N...``): q/k/v fused into
    ``in_proj``, ``text_projection`` as a ``[width, dim]`` matrix; a ``logit_scale`` as real OpenCLIP files have."""
    sd = {k.removeprefix("text_model."): v for k, v in text_model.state_dict().items()
          if not k.endswith("position_ids")}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "logit_scale": torch.tensor(4.6052)}
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").t().contiguous()
    for key in [k for k in sd if k.startswith("final_layer_norm.")]:
        out[prefix + "ln_final." + key.split(".", 1)[1]] = sd.pop(key)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        base = f"encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            fused = torch.cat([sd.pop(f"{base}{n}_proj.{kind}") for n in ("q", "k", "v")], dim=0)
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = fused
    for key, value in sd.items():
        new = "transformer.resblocks." + key[len("encoder.layers."):]
        for old, replacement in _TO_OPEN_CLIP:
            new = new.replace(old, replacement)
        out[prefix + new] = value
    return out


# --------------------------------------------------------------------------------------------- module factories


def make_unet(seed: int, **config):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(norm_num_groups=32, **config).eval()


def make_vae(seed: int, block_out_channels, layers_per_block: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(block_out_channels),
                         layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=32,
                         scaling_factor=scaling_factor).eval()


def make_clip(seed: int, *, hidden: int, layers: int, intermediate: int, open_clip: bool,
              projection_dim: int | None = None):
    """A CLIP text encoder with the full 49408-token vocabulary (the real tokenizer's ids index it)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), intermediate_size=intermediate,
                            max_position_embeddings=77, hidden_act="gelu" if open_clip else "quick_gelu",
                            layer_norm_eps=1e-5, projection_dim=projection_dim or hidden,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def stored_as(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's state dict cast to ``dtype`` (what the file stores); the module's own fp32 weights are set to
    the same rounded values, so it stays an exact reference for what a loader reads back."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in module.state_dict().items()}
    module.load_state_dict(sd)
    return sd


def _write(path, tensors: dict[str, torch.Tensor], metadata: dict | None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path


# ---------------------------------------------------------------------------------------------------- builders


def build_micro_sd15(path, seed: int = 0, *, text_dtype: torch.dtype = torch.float16) -> BuiltCheckpoint:
    """Micro SD1.5: one-level UNet (320 channels, context 768, 1 res block, attention depth 1, 8 heads), full-size
    CLIP-L and full-size VAE (ComfyUI builds these with fixed shapes). UNet stored fp32, CLIP + VAE in
    ``text_dtype``."""
    start = time.perf_counter()
    unet = make_unet(seed, sample_size=64, in_channels=4, out_channels=4, down_block_types=["CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D"], block_out_channels=[320], layers_per_block=1,
                     cross_attention_dim=768, attention_head_dim=8, transformer_layers_per_block=1)
    clip = make_clip(seed + 1, hidden=768, layers=12, intermediate=3072, open_clip=False)
    vae = make_vae(seed + 2, [128, 256, 512, 512], 2, 0.18215)
    tensors = {**unet_to_ldm(unet), **clip_to_ldm(clip, "cond_stage_model.transformer.", stored_as(clip, text_dtype)),
               **vae_to_ldm(vae, stored_as(vae, text_dtype))}
    path = _write(path, tensors, None)
    return BuiltCheckpoint(path, "sd1", unet, vae, [clip], {}, time.perf_counter() - start)


# AUTOMATIC1111 builds SD1.x models from an ldm YAML config (its configs/v1-inference.yaml for every SD1.5 checkpoint)
# and loads the weights with strict=False, so a smaller UNet needs its own config: a ``<checkpoint stem>.yaml`` beside
# the checkpoint, which A1111 prefers over its own (modules/sd_models_config.find_checkpoint_config_near_filename).
# Only unet_config differs from v1-inference.yaml; a wrong value there leaves weights silently uninitialised.
SD15_LDM_YAML = """\
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: {model_channels}
        attention_resolutions: {attention_resolutions}
        num_res_blocks: {num_res_blocks}
        channel_mult: {channel_mult}
        num_heads: {num_heads}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def build_micro_sd15_webui(path, seed: int = 0) -> BuiltCheckpoint:
    """:func:`build_micro_sd15` plus ``<stem>.yaml`` beside it: the smallest SD1.5 both web UIs load (layer F).

    Forge detects the micro UNet from its weights (``huggingface_guess``, like ComfyUI) and ignores the YAML;
    AUTOMATIC1111 would build the full-size UNet of ``v1-inference.yaml`` and fail on the shapes, so the YAML gives it
    the micro UNet (one level, 320 channels, one res block, attention depth 1, 8 heads). A1111 ControlNets
    (Mikubill's fixed SD1.5 configs) need the full-size UNet: use :func:`build_full_sd15` for those."""
    built = build_micro_sd15(path, seed)
    yaml = SD15_LDM_YAML.format(model_channels=320, attention_resolutions="[1]", num_res_blocks=1,
                                channel_mult="[1]", num_heads=8)
    built.path.with_suffix(".yaml").write_text(yaml, encoding="utf-8")
    return built


def build_full_sd15(path, seed: int = 0, *, dtype: torch.dtype = torch.float16) -> BuiltCheckpoint:
    """Full-size SD1.5 architecture (UNet 859.5M, CLIP-L, VAE) with random weights, stored in ``dtype`` (for
    benchmarks: memory and speed do not depend on the weights' values)."""
    from trainer.models.single_file import standard_unet_config

    start = time.perf_counter()
    config = dict(standard_unet_config("sd1"))
    config.pop("norm_num_groups", None)
    unet = make_unet(seed, **config)
    clip = make_clip(seed + 1, hidden=768, layers=12, intermediate=3072, open_clip=False)
    vae = make_vae(seed + 2, [128, 256, 512, 512], 2, 0.18215)
    tensors = {**{k: v.to(dtype) for k, v in unet_to_ldm(unet).items()},
               **clip_to_ldm(clip, "cond_stage_model.transformer.", stored_as(clip, dtype)),
               **vae_to_ldm(vae, stored_as(vae, dtype))}
    path = _write(path, tensors, None)
    return BuiltCheckpoint(path, "sd1", unet, vae, [clip], {}, time.perf_counter() - start)


def build_full_sdxl(path, seed: int = 0, *, dtype: torch.dtype = torch.float16) -> BuiltCheckpoint:
    """Full-size SDXL base architecture (UNet 2.57B, CLIP-L + OpenCLIP-bigG, VAE) with random weights, stored in
    ``dtype`` (for benchmarks: memory and speed do not depend on the weights' values)."""
    from trainer.models.single_file import standard_unet_config

    start = time.perf_counter()
    config = dict(standard_unet_config("sdxl"))
    config.pop("norm_num_groups", None)
    unet = make_unet(seed, **config)
    clip_l = make_clip(seed + 1, hidden=768, layers=12, intermediate=3072, open_clip=False)
    clip_g = make_clip(seed + 2, hidden=1280, layers=32, intermediate=5120, open_clip=True, projection_dim=1280)
    vae = make_vae(seed + 3, [128, 256, 512, 512], 2, 0.13025)
    tensors = {**{k: v.to(dtype) for k, v in unet_to_ldm(unet).items()},
               **clip_to_ldm(clip_l, "conditioner.embedders.0.transformer.", stored_as(clip_l, dtype)),
               **{k: v.to(dtype) if v.is_floating_point() else v
                  for k, v in clip_to_open_clip(clip_g, "conditioner.embedders.1.model.").items()},
               **vae_to_ldm(vae, stored_as(vae, dtype))}
    metadata = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "modelspec.resolution": "1024x1024"}
    path = _write(path, tensors, metadata)
    return BuiltCheckpoint(path, "sdxl", unet, vae, [clip_l, clip_g], metadata, time.perf_counter() - start)


def build_small_sd2v(path, seed: int = 0, *, v_marker: str | None = "key") -> BuiltCheckpoint:
    """Small SD2.x: UNet 64/128 channels (heads = channels / 64, linear projections), 2-layer OpenCLIP text encoder
    (width 64) in ``cond_stage_model.model.*``, small VAE. ``v_marker``: ``"key"`` (a ``v_pred`` tensor, as ComfyUI
    and kohya write), ``"metadata"`` (``modelspec.prediction_type = v`` + ``768-v`` architecture) or None."""
    start = time.perf_counter()
    unet = make_unet(seed, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[64, 128],
                     layers_per_block=1, cross_attention_dim=64, attention_head_dim=[1, 2],
                     use_linear_projection=True, transformer_layers_per_block=[1, 1], upcast_attention=True)
    clip = make_clip(seed + 1, hidden=64, layers=2, intermediate=128, open_clip=True)
    vae = make_vae(seed + 2, [32, 32, 32, 32], 1, 0.18215)  # 8x down: hints are 8x the latents
    tensors = {**unet_to_ldm(unet), **clip_to_open_clip(clip, "cond_stage_model.model."), **vae_to_ldm(vae)}
    metadata = {}
    if v_marker == "key":
        tensors["v_pred"] = torch.zeros(0)
    elif v_marker == "metadata":
        metadata = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v2-768-v",
                    "modelspec.prediction_type": "v"}
    path = _write(path, tensors, metadata)
    return BuiltCheckpoint(path, "sd2", unet, vae, [clip], metadata, time.perf_counter() - start)


def build_small_sdxl(path, seed: int = 0) -> BuiltCheckpoint:
    """Small SDXL: UNet 64/128 channels (level 0 without attention, level 1 depth 2, linear projections, heads =
    channels / 64) with the ``text_time`` addition embedding, CLIP-L-like (width 64) + OpenCLIP-G-like (width 64,
    projection 32) text encoders, small VAE, SDXL modelspec metadata."""
    start = time.perf_counter()
    pooled_dim, time_dim = 32, 16
    unet = make_unet(seed, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[64, 128],
                     layers_per_block=1, cross_attention_dim=128, attention_head_dim=[1, 2],
                     use_linear_projection=True, transformer_layers_per_block=[1, 2],
                     addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                     projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim)
    clip_l = make_clip(seed + 1, hidden=64, layers=2, intermediate=128, open_clip=False)
    clip_g = make_clip(seed + 2, hidden=64, layers=2, intermediate=128, open_clip=True, projection_dim=pooled_dim)
    vae = make_vae(seed + 3, [32, 32, 32, 32], 1, 0.13025)
    tensors = {**unet_to_ldm(unet), **clip_to_ldm(clip_l, "conditioner.embedders.0.transformer."),
               **clip_to_open_clip(clip_g, "conditioner.embedders.1.model."), **vae_to_ldm(vae)}
    metadata = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "modelspec.resolution": "1024x1024"}
    path = _write(path, tensors, metadata)
    return BuiltCheckpoint(path, "sdxl", unet, vae, [clip_l, clip_g], metadata, time.perf_counter() - start)


def build_diffusers_folder(path, seed: int = 0, *, tokenizer_dir=None) -> BuiltCheckpoint:
    """A small SD1-like diffusers pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json)
    written with ``save_pretrained``; the tokenizer files come from ComfyUI's ``comfy/sd1_tokenizer``."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    start = time.perf_counter()
    unet = make_unet(seed, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64],
                     layers_per_block=1, cross_attention_dim=64, attention_head_dim=8)
    clip = make_clip(seed + 1, hidden=64, layers=2, intermediate=128, open_clip=False)
    vae = make_vae(seed + 2, [32, 32, 32, 32], 1, 0.18215)  # 8x down: hints are 8x the latents
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir or sd1_tokenizer_source()), local_files_only=True)
    tokenizer.model_max_length = 77
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # Hub SD folders ship vocab.json + merges.txt (transformers 5 would write tokenizer.json only): copy the originals.
    shutil.rmtree(path / "tokenizer")
    shutil.copytree(tokenizer_dir or sd1_tokenizer_source(), path / "tokenizer")
    return BuiltCheckpoint(path, "sd1", unet, vae, [clip], {}, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def sd1_tokenizer_dir() -> Path:
    folder = sd1_tokenizer_source()
    if not (folder / "vocab.json").is_file():
        pytest.fail(f"ComfyUI's sd1_tokenizer is missing at {folder}: run `make comfyui`", pytrace=False)
    return folder


@pytest.fixture(scope="session")
def micro_sd15(tmp_path_factory) -> BuiltCheckpoint:
    return build_micro_sd15(tmp_path_factory.mktemp("ckpt") / "micro_sd15.safetensors")


@pytest.fixture(scope="session")
def micro_sd15_webui(tmp_path_factory) -> BuiltCheckpoint:
    """The micro SD1.5 with its A1111 config beside it (``micro_sd15_webui.yaml``), for both web UIs."""
    return build_micro_sd15_webui(tmp_path_factory.mktemp("ckpt") / "micro_sd15_webui.safetensors")


@pytest.fixture(scope="session")
def small_sd2v(tmp_path_factory) -> BuiltCheckpoint:
    return build_small_sd2v(tmp_path_factory.mktemp("ckpt") / "small_sd2v.safetensors")


@pytest.fixture(scope="session")
def small_sdxl(tmp_path_factory) -> BuiltCheckpoint:
    return build_small_sdxl(tmp_path_factory.mktemp("ckpt") / "small_sdxl.safetensors")


@pytest.fixture(scope="session")
def sd_diffusers_folder(tmp_path_factory, sd1_tokenizer_dir) -> BuiltCheckpoint:
    return build_diffusers_folder(tmp_path_factory.mktemp("ckpt") / "sd_diffusers", tokenizer_dir=sd1_tokenizer_dir)
