"""The networks of a training run and the denoisers the loss calls.

A run holds the frozen base (its UNet may carry a trainable UNet LoRA), the online adapter (trainable), the target
adapter (the same architecture whose trainable weights *are* the EMA tensors), and for ``--ode_model teacher`` a frozen
teacher adapter. :meth:`Networks.denoiser` gives the four models of the CoDi step as callables
``fn(z_t, t, cond) -> model output``: ``online`` (base + adapter, with gradient), ``target`` (base + EMA adapter, and
the UNet LoRA's EMA weights), ``base`` (the frozen base alone, LoRA off) and ``teacher``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

import ccd_sampler as cs
from trainer.adapters.controlnet import Adapter, adapted_unet_output, build_adapter
from trainer.adapters.files import load_adapter
from trainer.adapters.lora import UNetLoRA, add_unet_lora
from trainer.models import BaseModel, load_base_model
from trainer.training.settings import AdapterSettings, ModelSettings

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class OnlineModel(torch.nn.Module):
    """base UNet (+ trainable UNet LoRA) + trainable adapter as one module, so DDP syncs every trainable weight."""

    def __init__(self, unet, adapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, sample, timestep, cond):
        return adapted_unet_output(self.unet, self.adapter, sample, timestep, cond)


@dataclass
class Networks:
    base: BaseModel
    adapter: Adapter                   # online adapter (trainable)
    target_adapter: Adapter            # same architecture, weights = the EMA shadow tensors
    unet_lora: UNetLoRA | None
    teacher_adapter: Adapter | None = None  # frozen, for --ode_model teacher
    trainable: dict = field(default_factory=dict)  # "adapter.<name>" / "unet_lora.<name>" -> Parameter
    adapter_type: str = "controlnet"
    online: torch.nn.Module | None = None  # OnlineModel, wrapped by accelerate.prepare

    def denoiser(self, kind: str, ema: cs.EMA | None = None):
        """The model ``kind`` (online | target | base | teacher) as ``fn(z_t, t, cond, w=None)``."""
        unet = self.base.unet
        if kind == "online":
            return lambda z, t, cond, w=None: self.online(z, t, cond)
        if kind == "target":
            def target(z, t, cond, w=None):
                with EmaUnetLora(self, ema):
                    return adapted_unet_output(unet, self.target_adapter, z, t, cond)
            return target
        adapter = {"base": None, "teacher": self.teacher_adapter}[kind]

        def frozen(z, t, cond, w=None):
            with UnetLoraDisabled(self):
                return adapted_unet_output(unet, adapter, z, t, cond)
        return frozen


def build_networks(model: ModelSettings, adapter_settings: AdapterSettings, device,
                   weight_dtype: torch.dtype) -> Networks:
    """Load the base, build the adapters (and UNet LoRA), freeze what is frozen and put everything on ``device``:
    frozen weights in ``weight_dtype``, trainable ones in float32 (half-precision weights would round small updates
    away)."""
    base = load_base_model(model.pretrained_model_name_or_path, v_parameterization=model.v_parameterization,
                           v2=model.v2, vae_path=model.vae, tokenizer_path=model.tokenizer_path,
                           clip_skip=model.clip_skip, zero_terminal_snr=model.zero_terminal_snr)
    unet = base.unet
    for module in [unet, base.vae, *base.text_encoders]:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    if model.xformers:
        unet.enable_xformers_memory_efficient_attention()
    adapter_type = adapter_settings.adapter_type or ("control-lora" if base.architecture == "sdxl" else "controlnet")

    def new_adapter():
        return build_adapter(unet, adapter_type, network_dim=adapter_settings.network_dim,
                             network_alpha=adapter_settings.network_alpha,
                             conditioning_embedding_out_channels=adapter_settings.conditioning_embedding_channels,
                             hint_downscale=base.latent_downscale)

    # Both adapters before the UNet LoRA: they copy (controlnet) or tie (control-lora) the plain UNet weights.
    adapter = new_adapter()
    target_adapter = new_adapter()
    target_adapter.requires_grad_(False)
    if adapter_settings.init_adapter:  # before the EMA is made from these weights, so the EMA starts there too
        load_adapter(base, adapter_settings.init_adapter, into=adapter, flag="--init_adapter")
    teacher_adapter = None
    if adapter_settings.teacher_adapter:
        teacher_adapter = new_adapter()
        load_adapter(base, adapter_settings.teacher_adapter, into=teacher_adapter, flag="--teacher_adapter")
        teacher_adapter.requires_grad_(False)
        teacher_adapter.eval()
    unet_lora = None
    if adapter_settings.unet_lora_dim:
        unet_lora = add_unet_lora(unet, adapter_settings.unet_lora_dim, adapter_settings.unet_lora_alpha)
    if model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        adapter.enable_gradient_checkpointing()

    for module in [unet, adapter, *base.text_encoders]:
        for p in module.parameters():
            p.data = p.data.to(device, torch.float32 if p.requires_grad else weight_dtype)
    if base.vae is not None:
        # SDXL's VAE overflows in fp16; its config says so (force_upcast), as diffusers' pipelines read it
        upcast = model.no_half_vae or bool(getattr(base.vae.config, "force_upcast", False))
        base.vae.to(device, torch.float32 if upcast else weight_dtype)

    trainable = {f"adapter.{n}": p for n, p in adapter.trainable_named_parameters()}
    if unet_lora is not None:
        trainable.update({f"unet_lora.{n}": p for n, p in unet_lora.trainable_named_parameters()})
    for p in target_adapter.parameters():  # its trainable-named weights become the EMA tensors later
        p.data = p.data.to(device, weight_dtype)
    if teacher_adapter is not None:
        teacher_adapter.to(device, weight_dtype)
    return Networks(base=base, adapter=adapter, target_adapter=target_adapter, unet_lora=unet_lora,
                    trainable=trainable, adapter_type=adapter_type, teacher_adapter=teacher_adapter)


def tie_target_to_ema(networks: Networks, ema: cs.EMA) -> None:
    """Make the target adapter's trainable weights *be* the EMA shadow tensors (no copy, no swapping)."""
    target = dict(networks.target_adapter.trainable_named_parameters())
    for name, param in target.items():
        param.data = ema.shadow[f"adapter.{name}"]  # the float32 master copy; autocast casts on use
    gc.collect()


class EmaUnetLora:
    """Within the block the UNet LoRA holds its EMA weights (it lives inside the shared UNet, so swap them in)."""

    def __init__(self, networks: Networks, ema: cs.EMA):
        self.networks, self.ema = networks, ema

    def __enter__(self):
        if self.networks.unet_lora is None:
            return
        self.params = {n: p for n, p in self.networks.trainable.items() if n.startswith("unet_lora.")}
        self.backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.ema.shadow[n])

    def __exit__(self, *exc):
        if self.networks.unet_lora is None:
            return
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.backup[n])


class UnetLoraDisabled:
    """Within the block the UNet is the frozen base: its LoRA is switched off."""

    def __init__(self, networks: Networks):
        self.lora = networks.unet_lora

    def __enter__(self):
        if self.lora is not None:
            self.lora.set_enabled(False)

    def __exit__(self, *exc):
        if self.lora is not None:
            self.lora.set_enabled(True)
