"""The trainable CoDi adapters and the adapted UNet forward (``docs/algorithm.md``, "The trainable part";
``docs/adapter_format.md`` for the file layouts).

* ``controlnet`` (the paper's PE-CoDi): a full diffusers ``ControlNetModel`` copied from the base UNet's encoder, all
  of it trainable. Exported in the ldm ControlNet layout by default (``zero_convs.0.0.weight`` ...), which ComfyUI,
  sd-webui-controlnet and Forge load for any UNet shape; ``layout="diffusers"`` gives plain ``ControlNetModel`` keys
  (ComfyUI reads those only for the exact SD1.5/SD2/SDXL configs it knows).
* ``control-lora``: the same ControlNet, but its encoder (conv_in, embeddings, down blocks, mid block) holds the base
  UNet's own Parameter objects, frozen -- no second copy in memory. Trainable: LoRA factors on every nn.Linear /
  nn.Conv2d of that encoder, the hint embedding and the zero convs. Exported in the Control-LoRA layout ComfyUI reads
  (marker ``lora_controlnet``, ldm names, ``<layer>.up`` / ``<layer>.down``, full hint/zero-conv weights). ComfyUI adds
  ``up @ down`` without any alpha scaling, so ``alpha / rank`` is folded into ``up`` on export (and divided out again
  by :meth:`Adapter.load_exported`).

The hint is the condition image ``[B, 3, 8*h, 8*w]`` in ``[0, 1]`` for latents ``[B, C, h, w]``. At initialisation the
zero convs (and LoRA ups) are zero, so base + adapter == base exactly. ``hint_downscale`` (default 8, SD's VAE factor,
the only one ComfyUI's ControlNet knows) is the pixels-per-latent factor of the base: a pixel-space base
(``benchmarks/mini``, no VAE) uses 1, and then the hint embedding's stride-2 convs run at stride 1 (same weights, same
keys, the hint stays at the latent = image resolution).

Trainable weights are created in float32 (the loop keeps them float32 beside a half-precision base; run the forward
under ``torch.autocast`` when the base is half precision).
"""

from __future__ import annotations

import re

import weakref

import torch
from diffusers import ControlNetModel
from torch import nn

from trainer.adapters.lora import (LoRAModule, SharedLoRA, check_substitute_weights, find_lora_wrappers, inject_lora,
                                   replace_submodule, resolve_alpha)
from trainer.errors import CodiError
from trainer.models import ldm_keys

ADAPTER_TYPES = ("controlnet", "control-lora")
COMFY_HINT_CHANNELS = (16, 32, 96, 256)  # ComfyUI's cldm.ControlNet hard-codes input_hint_block with these
HINT_IMAGE_CHANNELS = 3
CONTROL_LORA_MARKER = "lora_controlnet"
ENCODER_PREFIXES = ("conv_in", "time_embedding", "add_embedding", "class_embedding", "down_blocks", "mid_block")
CONTROL_PART_PREFIXES = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
LDM_LAYOUT, DIFFUSERS_LAYOUT = "ldm", "diffusers"


class AdapterFileError(CodiError):
    """An adapter file does not fit the adapter it is loaded into (other type, other shape, missing keys)."""


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _unet_layer(unet: nn.Module, path: str) -> nn.Module:
    """The UNet module at ``path``; through a LoRA wrapper to its plain base layer."""
    try:
        module = unet.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the base UNet has no module {path!r} that the ControlNet encoder expects") from None
    return module.base_layer if isinstance(module, LoRAModule) else module


def _build_controlnet_skeleton(unet, conditioning_embedding_out_channels, hint_downscale: int = 8) -> ControlNetModel:
    """A ControlNetModel for ``unet``'s config with every weight on the meta device (allocates nothing)."""
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            load_weights_from_unet=False, conditioning_channels=HINT_IMAGE_CHANNELS)
    _set_hint_downscale(controlnet, hint_downscale)
    return controlnet


def _set_hint_downscale(controlnet: ControlNetModel, hint_downscale: int) -> None:
    """Make the hint embedding downsample by ``hint_downscale`` (a power of two): diffusers builds one stride-2 conv
    per channel step (3 for the default 4 channels: 8x); the first ones become stride 1 (the last, widest ones keep
    stride 2, so the expensive convs run at the lowest resolution)."""
    strided = [m for m in controlnet.controlnet_cond_embedding.blocks if tuple(m.stride) == (2, 2)]
    keep = int(hint_downscale).bit_length() - 1
    if hint_downscale < 1 or 2 ** keep != hint_downscale or keep > len(strided):
        raise ValueError(f"hint_downscale must be a power of two from 1 to {2 ** len(strided)} (the hint embedding "
                         f"has {len(strided)} stride-2 convs), got {hint_downscale}")
    for conv in strided[:len(strided) - keep]:
        conv.stride = (1, 1)


def _fill_encoder_from_unet(controlnet: ControlNetModel, unet: nn.Module, *, share: bool) -> None:
    """Encoder weights of the ControlNet := the UNet's. ``share`` ties the very Parameter objects (frozen);
    otherwise they are float32 copies (trainable)."""
    for path, module in controlnet.named_modules():
        if not _under(path, ENCODER_PREFIXES):
            continue
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        source = _unet_layer(unet, path)
        for name, meta_param in own:
            base_param = getattr(source, name, None)
            if not isinstance(base_param, nn.Parameter) or base_param.shape != meta_param.shape:
                raise ValueError(f"UNet parameter {path}.{name} is missing or has another shape than the ControlNet "
                                 "built from the same config expects")
            if share:
                base_param.requires_grad_(False)
                module._parameters[name] = base_param
            else:
                module._parameters[name] = nn.Parameter(base_param.detach().to(torch.float32).clone())


def _init_control_parts(controlnet: ControlNetModel, device) -> None:
    """Hint embedding: default conv init with the last conv zeroed; zero convs: zeros (diffusers' ControlNet init)."""
    for prefix in CONTROL_PART_PREFIXES:
        getattr(controlnet, prefix).to_empty(device=device)
    for conv in controlnet.controlnet_cond_embedding.modules():
        if isinstance(conv, nn.Conv2d):
            conv.reset_parameters()
    zero = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
            *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zero:
            conv.weight.zero_()
            conv.bias.zero_()


def _check_materialised(module: nn.Module) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"ControlNet weights left unset (meta): {left[:5]}")


def _unet_device(unet: nn.Module) -> torch.device:
    return next(unet.parameters()).device


class Adapter(nn.Module):
    """Base of the adapters: wraps a diffusers ``ControlNetModel`` (``self.controlnet``) and returns its residuals."""

    adapter_type: str = ""

    def __init__(self, controlnet: ControlNetModel, hint_downscale: int = 8):
        super().__init__()
        self.controlnet = controlnet
        self.hint_downscale = int(hint_downscale)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, sample, timestep, encoder_hidden_states, hint, added_cond_kwargs=None,
                conditioning_scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(down_block_res_samples, mid_block_res_sample)`` for the UNet's ``down_block_additional_residuals`` /
        ``mid_block_additional_residual``."""
        self._check_hint(sample, hint)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=hint,
                                    conditioning_scale=conditioning_scale, added_cond_kwargs=added_cond_kwargs,
                                    return_dict=False)
        return list(down), mid

    def _check_hint(self, sample: torch.Tensor, hint: torch.Tensor) -> None:
        if hint.ndim != 4 or hint.shape[1] != HINT_IMAGE_CHANNELS:
            raise ValueError(f"hint must be a condition image [B, {HINT_IMAGE_CHANNELS}, H, W] in [0, 1], got shape "
                             f"{tuple(hint.shape)}")
        k = self.hint_downscale
        want = (sample.shape[-2] * k, sample.shape[-1] * k)
        if tuple(hint.shape[-2:]) != want:
            raise ValueError(f"hint is {tuple(hint.shape[-2:])} pixels but latents {tuple(sample.shape[-2:])} need a "
                             f"pixel-resolution hint of {want} ({k}x the latent size)")
        if hint.shape[0] != sample.shape[0]:
            raise ValueError(f"hint batch {hint.shape[0]} != latent batch {sample.shape[0]}")

    # ---------------------------------------------------------------------------------------------- training
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        self.controlnet.enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    # ------------------------------------------------------------------------------------------------ export
    def export_state_dict(self, weights: dict[str, torch.Tensor] | None = None,
                          layout: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter file's tensors; ``weights`` (e.g. EMA, keyed like :meth:`trainable_named_parameters`)
        replace the live trainable weights."""
        raise NotImplementedError

    def load_exported(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _tensors(self, weights):
        """Trainable tensors by name, from ``weights`` (e.g. EMA) where given, detached float32 CPU copies."""
        live = dict(self.trainable_named_parameters())
        check_substitute_weights(weights, live)
        src = live if weights is None else weights
        return {k: src[k].detach().to("cpu", torch.float32).contiguous().clone() for k in live}

    def _num_hint_blocks(self) -> int:
        return len(self.controlnet.controlnet_cond_embedding.blocks)

    def ldm_table(self) -> dict[str, str]:
        return ldm_keys.controlnet_table(self.controlnet.config, self._num_hint_blocks())

    def _refuse_foreign_file(self, tensors) -> None:
        if any(k.startswith("lora_unet_") for k in tensors):
            raise AdapterFileError("this is a UNet LoRA file (lora_unet_* keys), not a CoDi ControlNet adapter")
        is_control_lora = CONTROL_LORA_MARKER in tensors
        if is_control_lora and self.adapter_type != "control-lora":
            raise AdapterFileError(f"this file is a control-lora adapter ('{CONTROL_LORA_MARKER}' marker) but the "
                                   f"adapter is {self.adapter_type!r}")
        if not is_control_lora and self.adapter_type == "control-lora":
            raise AdapterFileError(f"this file has no '{CONTROL_LORA_MARKER}' marker: it is not a control-lora "
                                   "adapter (a full controlnet?)")


def _load_into(named: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(named) - set(tensors))
    unexpected = sorted(set(tensors) - set(named))
    if missing or unexpected:
        raise AdapterFileError(f"{what} does not fit this adapter: {len(missing)} missing keys {missing[:3]}, "
                               f"{len(unexpected)} unexpected keys {unexpected[:3]} (other base model or settings?)")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs adapter {tuple(p.shape)}" for k, p in named.items()
           if tuple(tensors[k].shape) != tuple(p.shape)]
    if bad:
        raise AdapterFileError(f"{what} has {len(bad)} tensors of another shape (other base model, rank or hint "
                               f"channels?): {bad[:3]}")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[k].to(p.dtype))


class ControlNetAdapter(Adapter):
    """PE-CoDi: a full, trainable ControlNet initialised from the base UNet's encoder."""

    adapter_type = "controlnet"

    def __init__(self, unet: nn.Module, conditioning_embedding_out_channels=COMFY_HINT_CHANNELS,
                 hint_downscale: int = 8):
        controlnet = _build_controlnet_skeleton(unet, conditioning_embedding_out_channels, hint_downscale)
        device = _unet_device(unet)
        controlnet.to_empty(device=device)
        _fill_encoder_from_unet(controlnet, unet, share=False)
        _init_control_parts(controlnet, device)
        _check_materialised(controlnet)
        controlnet.requires_grad_(True)
        super().__init__(controlnet, hint_downscale)

    def trainable_named_parameters(self):
        return list(self.controlnet.named_parameters())

    def export_state_dict(self, weights=None, layout: str | None = LDM_LAYOUT):
        """The ControlNet in the ldm layout (default; ``input_hint_block.*``, ``zero_convs.N.0.*``,
        ``middle_block_out.0.*``, ``input_blocks.*``, ``middle_block.*``, ``time_embed.*``, ``label_emb.*``) or the
        diffusers ``ControlNetModel`` layout."""
        tensors = self._tensors(weights)
        layout = layout or LDM_LAYOUT
        if layout == DIFFUSERS_LAYOUT:
            return tensors
        if layout != LDM_LAYOUT:
            raise ValueError(f"unknown controlnet layout {layout!r}; use {LDM_LAYOUT!r} or {DIFFUSERS_LAYOUT!r}")
        return ldm_keys.rename_state_dict(tensors, self.ldm_table())

    def load_exported(self, tensors):
        """Inverse of :meth:`export_state_dict` for either layout (detected from the keys)."""
        self._refuse_foreign_file(tensors)
        if "zero_convs.0.0.weight" in tensors:
            try:
                tensors = ldm_keys.rename_state_dict(tensors, ldm_keys.invert(self.ldm_table()))
            except ValueError as e:
                raise AdapterFileError(f"ldm ControlNet file does not fit this adapter: {e}") from None
        elif "controlnet_cond_embedding.conv_in.weight" not in tensors:
            raise AdapterFileError("not a ControlNet file (neither 'zero_convs.0.0.weight' nor "
                                   "'controlnet_cond_embedding.conv_in.weight' present)")
        _load_into(dict(self.trainable_named_parameters()), tensors, "ControlNet file")


class ControlLoraAdapter(Adapter):
    """Control-LoRA: the encoder copy shares the base UNet's (frozen) weights; LoRA + hint embedding + zero convs
    are trained. A UNet LoRA added to the same UNet (``add_unet_lora``, before or after) is applied in the encoder
    copy too, exactly as ComfyUI builds the Control-LoRA encoder from the LoRA-patched model.

    Note: ``state_dict()`` / ``parameters()`` of this module include the shared (frozen) UNet tensors; save and
    optimise through :meth:`trainable_named_parameters` / :meth:`export_state_dict`."""

    adapter_type = "control-lora"

    def __init__(self, unet: nn.Module, rank: int = 16, alpha: float | None = None,
                 conditioning_embedding_out_channels=COMFY_HINT_CHANNELS, hint_downscale: int = 8):
        alpha = resolve_alpha(rank, alpha)
        controlnet = _build_controlnet_skeleton(unet, conditioning_embedding_out_channels, hint_downscale)
        _fill_encoder_from_unet(controlnet, unet, share=True)
        _init_control_parts(controlnet, _unet_device(unet))
        _check_materialised(controlnet)
        super().__init__(controlnet, hint_downscale)
        self.rank, self.alpha = rank, alpha
        wrappers = inject_lora(controlnet, lambda name, _: _under(name, ENCODER_PREFIXES), rank, alpha)
        object.__setattr__(self, "lora_layers", wrappers)  # already registered inside self.controlnet
        self.attach_unet_lora(find_lora_wrappers(unet))
        # add_unet_lora(unet) called later finds this adapter here and attaches its LoRA too (any order works)
        registry = unet.__dict__.setdefault("_codi_control_lora_adapters", [])
        registry.append(weakref.ref(self))

    def attach_unet_lora(self, unet_wrappers: dict[str, LoRAModule]) -> None:
        """Apply the UNet LoRA layers (by diffusers path) to the matching encoder-copy layers too, sharing their
        factors: ComfyUI builds the Control-LoRA encoder from the LoRA-patched UNet, so training must see the same."""
        for path, unet_lora in unet_wrappers.items():
            if _under(path, ENCODER_PREFIXES):
                replace_submodule(self.controlnet, path, SharedLoRA(self.controlnet.get_submodule(path), unet_lora))

    def trainable_named_parameters(self):
        out = []
        for path, w in self.lora_layers.items():
            out.append((f"{path}.lora_down.weight", w.lora_down.weight))
            out.append((f"{path}.lora_up.weight", w.lora_up.weight))
        for prefix in CONTROL_PART_PREFIXES:
            out.extend((f"{prefix}.{n}", p) for n, p in getattr(self.controlnet, prefix).named_parameters())
        return out

    def export_state_dict(self, weights=None, layout=None):
        """Control-LoRA layout: ``lora_controlnet`` marker, ``<ldm layer>.down`` / ``.up`` (up pre-multiplied by
        alpha/rank), full ``input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``, and the encoder copy's
        biases and normalisation parameters as they are in the base (:meth:`frozen_encoder_tensors`). It is the only
        layout a Control-LoRA has; ``layout`` (the controlnet's ldm/diffusers choice) is accepted and ignored."""
        tensors = self._tensors(weights)
        table = self.ldm_table()
        out = {CONTROL_LORA_MARKER: torch.tensor([])}
        for path, w in self.lora_layers.items():
            ldm = ldm_keys.rename(path, table)
            out[f"{ldm}.down"] = tensors.pop(f"{path}.lora_down.weight")
            out[f"{ldm}.up"] = tensors.pop(f"{path}.lora_up.weight") * w.scale
        out.update(ldm_keys.rename_state_dict(tensors, table))
        out.update(ldm_keys.rename_state_dict(self.frozen_encoder_tensors(), table))
        return out

    def frozen_encoder_tensors(self) -> dict[str, torch.Tensor]:
        """The encoder copy's tensors that no LoRA covers -- biases and normalisation weights -- by diffusers path,
        as float32 CPU copies of the base's values. Stability's Control-LoRA files carry them and
        sd-webui-controlnet (A1111) builds the encoder from the file alone: without them its layers would have no
        bias and default norms (and it tells SD1.5 from SDXL by ``input_blocks.11.0.in_layers.0.weight``). ComfyUI
        and Forge take the same values from the model."""
        return {name: param.detach().to("cpu", torch.float32).contiguous().clone()
                for name, param in self._frozen_encoder_parameters()}

    def _frozen_encoder_parameters(self):
        covered = {f"{path}.weight" for path in self.lora_layers}
        for name, param in self.controlnet.named_parameters():
            plain = re.sub(r"\.base(?=\.)", "", name)  # through (stacked) LoRA wrappers to the layer's own name
            if _under(plain, ENCODER_PREFIXES) and ".lora_" not in plain and plain not in covered:
                yield plain, param

    def load_exported(self, tensors):
        """Inverse of :meth:`export_state_dict` (divides alpha/rank back out of ``up``; bit-exact when alpha/rank is
        a power of two)."""
        self._refuse_foreign_file(tensors)
        table = self.ldm_table()
        inverse = ldm_keys.invert(table)
        named = {}
        for key, value in tensors.items():
            if key == CONTROL_LORA_MARKER:
                continue
            stem, _, part = key.rpartition(".")
            if part in ("up", "down"):
                try:
                    path = ldm_keys.rename(stem, inverse)
                except ValueError:
                    raise AdapterFileError(f"Control-LoRA key {key!r} names no layer of this adapter") from None
                w = self.lora_layers.get(path)
                if w is None:
                    raise AdapterFileError(f"Control-LoRA key {key!r}: layer {path} has no LoRA in this adapter")
                named[f"{path}.lora_{part}.weight"] = value / w.scale if part == "up" else value
            else:
                try:
                    named[ldm_keys.rename(key, inverse)] = value
                except ValueError:
                    raise AdapterFileError(f"Control-LoRA key {key!r} names no tensor of this adapter") from None
        # the base's biases and norms (see frozen_encoder_tensors): the encoder copy shares them with the UNet here
        frozen = {name for name, _ in self._frozen_encoder_parameters()}
        named = {k: v for k, v in named.items() if k not in frozen}
        _load_into(dict(self.trainable_named_parameters()), named, "Control-LoRA file")


def build_adapter(unet: nn.Module, adapter_type: str, *, network_dim: int = 16, network_alpha: float | None = None,
                  conditioning_embedding_out_channels=COMFY_HINT_CHANNELS, hint_downscale: int = 8) -> Adapter:
    """Build the adapter for ``unet`` (a diffusers ``UNet2DConditionModel``); base + adapter == base at init.
    ``hint_downscale``: pixels per latent of the base (``BaseModel.latent_downscale``): 8 for SD, 1 in pixel space."""
    if adapter_type not in ADAPTER_TYPES:
        raise ValueError(f"unknown adapter type {adapter_type!r}; choose one of {ADAPTER_TYPES}")
    channels = tuple(int(c) for c in conditioning_embedding_out_channels)
    # Other hint CNNs only where no stock loader could read the adapter anyway (a pixel-space base, hint_downscale 1).
    if channels != COMFY_HINT_CHANNELS and hint_downscale == 8:
        raise ValueError(f"conditioning embedding channels {channels} are not supported: ComfyUI's ControlNet "
                         f"(and sd-webui-controlnet / Forge) hard-code the hint CNN as {COMFY_HINT_CHANNELS}, so "
                         "they could not load this adapter")
    if adapter_type == "controlnet":
        return ControlNetAdapter(unet, channels, hint_downscale)
    return ControlLoraAdapter(unet, network_dim, network_alpha, channels, hint_downscale)


def text_conditioning(text: dict, hint: torch.Tensor) -> dict:
    """The ``cond`` dict of :func:`adapted_unet_output` from ``BaseModel.encode_text`` output and a hint batch."""
    cond = {"encoder_hidden_states": text["encoder_hidden_states"], "hint": hint}
    if "added_cond_kwargs" in text:
        cond["added_cond_kwargs"] = text["added_cond_kwargs"]
    return cond


def _cast(tree, dtype: torch.dtype):
    """Floating tensors of a (nested) dict cast to ``dtype``; everything else unchanged."""
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return tree


def adapted_unet_output(unet: nn.Module, adapter: Adapter | None, sample, timestep, cond: dict) -> torch.Tensor:
    """``unet(...).sample`` with the adapter's residuals added (``adapter=None``: the plain base UNet).
    ``cond``: ``encoder_hidden_states``, ``hint``, optional ``added_cond_kwargs`` and ``conditioning_scale``.

    Each network gets its inputs in its own dtype (a half-precision base beside a float32 adapter under mixed
    precision, float32 sampler states), so the call works with and without autocast."""
    dtype = unet.dtype
    ehs = cond["encoder_hidden_states"]
    added = cond.get("added_cond_kwargs")
    residuals = {}
    if adapter is not None:
        own = next(adapter.parameters()).dtype
        down, mid = adapter(sample.to(own), timestep, ehs.to(own), cond["hint"].to(own),
                            added_cond_kwargs=_cast(added, own),
                            conditioning_scale=cond.get("conditioning_scale", 1.0))
        residuals = {"down_block_additional_residuals": [d.to(dtype) for d in down],
                     "mid_block_additional_residual": mid.to(dtype)}
    return unet(sample.to(dtype), timestep, ehs.to(dtype), added_cond_kwargs=_cast(added, dtype), return_dict=False,
                **residuals)[0]
