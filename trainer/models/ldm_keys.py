"""One table between diffusers module names and the original ldm ("CompVis"/ComfyUI/A1111) names of an SD UNet and
its ControlNet.

Why here: single-file checkpoints, ldm-layout ControlNets and Control-LoRA files all use ldm names, while the trainer's
modules are diffusers modules. The table is built at *module* level from the UNet config (block types, layers per
block), and a key is renamed by its longest module prefix in the table, so the same table renames state-dict keys
(``...conv1.weight``) and module paths (``...attn1.to_q``) alike. Transformer blocks keep their inner names.

diffusers                                       ldm (L = layers_per_block of that level)
conv_in                                         input_blocks.0.0
time_embedding.linear_1 / linear_2              time_embed.0 / time_embed.2
add_embedding.linear_1 / linear_2 (SDXL)        label_emb.0.0 / label_emb.0.2
down_blocks.i.resnets.j                         input_blocks.n.0      (n counts 1, 2, ...: (L+1)i+j+1 for constant L)
down_blocks.i.attentions.j                      input_blocks.n.1
down_blocks.i.downsamplers.0.conv               input_blocks.n.0.op   (n = (L+1)(i+1))
mid_block.resnets.0 / attentions.0 / resnets.1  middle_block.0 / middle_block.1 / middle_block.2
up_blocks.i.resnets.j                           output_blocks.m.0     (m = (L+1)i+j)
up_blocks.i.attentions.j                        output_blocks.m.1
up_blocks.i.upsamplers.0.conv                   output_blocks.m.1.conv, or .2.conv when that block has attention
conv_norm_out / conv_out                        out.0 / out.2
resnet: norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut ->
        in_layers.0 in_layers.2 emb_layers.1 out_layers.0 out_layers.3 skip_connection
ControlNet: controlnet_cond_embedding.conv_in / blocks.k / conv_out -> input_hint_block.0 / .2(k+1) / .2(n+1)
            controlnet_down_blocks.n -> zero_convs.n.0;  controlnet_mid_block -> middle_block_out.0
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
SUPPORTED_MID_BLOCK = "UNetMidBlock2DCrossAttn"


def _cfg(config, name, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _layers_per_level(config) -> list[int]:
    levels = len(_cfg(config, "down_block_types"))
    layers = _cfg(config, "layers_per_block")
    if isinstance(layers, int):
        return [layers] * levels
    layers = list(layers)
    if len(layers) != levels:
        raise ValueError(f"layers_per_block {layers} does not match {levels} down blocks")
    return layers


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


def _add_resnet(table: dict[str, str], diffusers_prefix: str, ldm_prefix: str) -> None:
    for diffusers_name, ldm_name in RESNET_RENAMES.items():
        table[f"{diffusers_prefix}.{diffusers_name}"] = f"{ldm_prefix}.{ldm_name}"


def _encoder_table(config) -> dict[str, str]:
    """conv_in, embeddings, down blocks, mid block."""
    mid_type = _cfg(config, "mid_block_type", SUPPORTED_MID_BLOCK) or SUPPORTED_MID_BLOCK
    if mid_type != SUPPORTED_MID_BLOCK:
        raise ValueError(f"mid_block_type {mid_type!r} is not supported (only {SUPPORTED_MID_BLOCK}, as in SD1/2/XL)")
    table = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    down_types = list(_cfg(config, "down_block_types"))
    n = 1
    for i, (block_type, layers) in enumerate(zip(down_types, _layers_per_level(config))):
        for j in range(layers):
            _add_resnet(table, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            if _has_attention(block_type):
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if i < len(down_types) - 1:  # diffusers: every level but the last has a downsampler
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    _add_resnet(table, "mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    _add_resnet(table, "mid_block.resnets.1", "middle_block.2")
    return table


def _decoder_table(config) -> dict[str, str]:
    """up blocks and the output layers."""
    up_types = list(_cfg(config, "up_block_types"))
    layers_rev = list(reversed(_layers_per_level(config)))
    table = {"conv_norm_out": "out.0", "conv_out": "out.2"}
    m = 0
    for i, (block_type, layers) in enumerate(zip(up_types, layers_rev)):
        attn = _has_attention(block_type)
        for j in range(layers + 1):
            _add_resnet(table, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{m}.0")
            if attn:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{m}.1"
            if j == layers and i < len(up_types) - 1:  # every level but the last has an upsampler
                table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{m}.{2 if attn else 1}.conv"
            m += 1
    return table


def unet_table(config) -> dict[str, str]:
    """diffusers -> ldm module names for a whole ``UNet2DConditionModel`` with this config."""
    return {**_encoder_table(config), **_decoder_table(config)}


def num_down_residuals(config) -> int:
    """How many skip residuals the encoder produces (= ControlNet zero convs): conv_in + resnets + downsamplers."""
    layers = _layers_per_level(config)
    return 1 + sum(layers) + len(layers) - 1


def controlnet_table(config, num_hint_blocks: int = 6) -> dict[str, str]:
    """diffusers ``ControlNetModel`` -> ldm ControlNet module names (encoder, hint embedding, zero convs).
    ``num_hint_blocks`` = ``len(controlnet_cond_embedding.blocks)`` (6 for the standard (16, 32, 96, 256) embedding)."""
    table = _encoder_table(config)
    table["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
    for k in range(num_hint_blocks):
        table[f"controlnet_cond_embedding.blocks.{k}"] = f"input_hint_block.{2 * (k + 1)}"
    table["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * (num_hint_blocks + 1)}"
    for n in range(num_down_residuals(config)):
        table[f"controlnet_down_blocks.{n}"] = f"zero_convs.{n}.0"
    table["controlnet_mid_block"] = "middle_block_out.0"
    return table


def invert(table: Mapping[str, str]) -> dict[str, str]:
    inverse = {v: k for k, v in table.items()}
    if len(inverse) != len(table):
        raise ValueError("key table is not one-to-one")
    return inverse


def rename(name: str, table: Mapping[str, str]) -> str:
    """Rename a module path or state-dict key by its longest module prefix found in ``table``; ValueError if none."""
    head, tail = name, ""
    while True:
        if head in table:
            return table[head] + tail
        cut = head.rfind(".")
        if cut < 0:
            raise ValueError(f"no ldm/diffusers name known for {name!r}")
        head, tail = head[:cut], head[cut:] + tail


def rename_state_dict(state_dict: Mapping[str, torch.Tensor], table: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Rename every key; raises ValueError listing the keys the table does not cover."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        try:
            out[rename(key, table)] = value
        except ValueError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys have no mapping, e.g. {unknown[:5]}")
    return out


def diffusers_unet_to_ldm(state_dict, config) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in ldm names (without the ``model.diffusion_model.`` prefix)."""
    return rename_state_dict(state_dict, unet_table(config))


def ldm_unet_to_diffusers(state_dict, config) -> dict[str, torch.Tensor]:
    """Inverse of :func:`diffusers_unet_to_ldm`."""
    return rename_state_dict(state_dict, invert(unet_table(config)))
