"""LoRA wrappers for nn.Linear / nn.Conv2d, in-place injection, and the optional UNet LoRA with its kohya export.

Semantics follow kohya sd-scripts (what users know from ``--network_dim`` / ``--network_alpha``):

* ``lora_down`` maps the layer input to ``rank`` channels, ``lora_up`` maps back; the layer computes
  ``base(x) + lora_up(lora_down(x)) * alpha / rank``. ``alpha=None`` (or 0) means ``alpha = rank`` (scale 1).
* ``lora_down`` starts kaiming-uniform, ``lora_up`` starts at zero, so a freshly injected LoRA changes nothing.
* conv layers: ``lora_down`` is a conv with the base kernel/stride/padding/dilation and ``rank`` outputs,
  ``lora_up`` a 1x1 conv (kohya's "LoCon"-style factorisation; ComfyUI reads it as ``up.flatten(1) @ down.flatten(1)``).

UNet LoRA target set (kohya's default "LoRA-LierLa" target, ``Transformer2DModel`` blocks only): inside every
attention block (``*.attentions.N``) the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of
``attn1``/``attn2``, the feed-forward ``ff.net.0.proj`` and ``ff.net.2``, and ``proj_in`` / ``proj_out`` (1x1 convs in
SD1.x, linears in SD2.x/SDXL). Resnet 3x3 convs are not targeted (kohya does that only with ``conv_dim``).
Exported as ``lora_unet_<diffusers module path with '.'->'_'>.{lora_down.weight,lora_up.weight,alpha}``, names that
ComfyUI's ``comfy.lora.model_lora_keys_unet`` maps for SD1.x/SD2.x/SDXL (via ``comfy.utils.unet_to_diffusers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

UNET_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                     "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
KOHYA_UNET_PREFIX = "lora_unet_"


def resolve_alpha(rank: int, alpha: float | None) -> float:
    """kohya: no alpha (or 0) means alpha = rank, i.e. scale 1."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank (network_dim) must be a positive integer, got {rank!r}")
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


class LoRAModule(nn.Module):
    """Shared logic of the wrappers: frozen ``base`` (a layer, or another LoRA wrapper when LoRAs stack), trainable
    ``lora_down`` / ``lora_up`` and ``scale = alpha / rank``."""

    lora_down: nn.Module
    lora_up: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: float | None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.alpha = resolve_alpha(rank, alpha)
        self.scale = self.alpha / rank
        for p in self.base_layer.parameters():  # only the plain layer: a stacked LoRA below keeps its own state
            p.requires_grad_(False)

    @property
    def base_layer(self) -> nn.Module:
        """The innermost plain nn.Linear / nn.Conv2d (its ``weight`` is the frozen base weight)."""
        layer = self.base
        while isinstance(layer, LoRAModule):
            layer = layer.base
        return layer

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` weights as stored (up NOT scaled)."""
        return self.lora_down.weight, self.lora_up.weight

    def delta_weight(self) -> torch.Tensor:
        """The dense weight update ``scale * up @ down`` in the base weight's shape."""
        down, up = self.factors()
        shape = self.base_layer.weight.shape
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * self.scale

    enabled = True  # False: the wrapper is its base layer (used to evaluate the frozen base model)

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        return out + _lora_branch(self.lora_down, self.lora_up, x, out.dtype) * self.scale


class LoRALinear(LoRAModule):
    """``base(x) + up(down(x)) * alpha/rank`` around a frozen nn.Linear."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__(base, rank, alpha)
        layer = self.base_layer
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(layer).__name__}")
        device, dtype = layer.weight.device, _factor_dtype(layer.weight)
        self.lora_down = nn.Linear(layer.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(rank, layer.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()


class LoRAConv2d(LoRAModule):
    """``base(x) + up(down(x)) * alpha/rank`` around a frozen nn.Conv2d; down has the base kernel/stride/padding,
    up is 1x1."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__(base, rank, alpha)
        layer = self.base_layer
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError("LoRA on grouped or non-zero-padded convolutions is not supported")
        device, dtype = layer.weight.device, _factor_dtype(layer.weight)
        self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, stride=layer.stride,
                                   padding=layer.padding, dilation=layer.dilation, bias=False,
                                   device=device, dtype=dtype)
        self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()


class SharedLoRA(LoRAModule):
    """A LoRA whose factors belong to another wrapper (same Parameter objects), applied on top of a different
    base. Used so that a Control-LoRA encoder copy sees the UNet LoRA exactly as ComfyUI's does (ComfyUI builds the
    Control-LoRA encoder from the already LoRA-patched UNet weights)."""

    def __init__(self, base: nn.Module, source: LoRAModule):
        nn.Module.__init__(self)
        self.base = base
        self.rank, self.alpha, self.scale = source.rank, source.alpha, source.scale
        # kept out of this module's parameters: the owner (the UNet LoRA) trains and exports them
        object.__setattr__(self, "_source", source)

    def factors(self):
        return self._source.factors()

    def forward(self, x):
        out = self.base(x)
        if not self._source.enabled:
            return out
        return out + _lora_branch(self._source.lora_down, self._source.lora_up, x, out.dtype) * self.scale


def _lora_branch(down: nn.Module, up: nn.Module, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``up(down(x))`` computed in the factors' dtype and returned in the base layer's output dtype, so a wrapper is
    a drop-in for its layer (fp32 factors beside a half-precision base; under autocast the casts are no-ops)."""
    return up(down(x.to(down.weight.dtype))).to(out_dtype)



def _factor_dtype(weight: torch.Tensor) -> torch.dtype:
    # trainable factors stay fp32 beside a half-precision frozen base unless the caller casts them
    return weight.dtype if weight.dtype == torch.float64 else torch.float32


def _wrap(layer: nn.Module, rank: int, alpha: float | None) -> LoRAModule:
    inner = layer.base_layer if isinstance(layer, LoRAModule) else layer
    if isinstance(inner, nn.Linear):
        return LoRALinear(layer, rank, alpha)
    if isinstance(inner, nn.Conv2d):
        return LoRAConv2d(layer, rank, alpha)
    raise TypeError(f"cannot put a LoRA on {type(inner).__name__}")


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def inject_lora(module: nn.Module, target_filter: Callable[[str, nn.Module], bool], rank: int,
                alpha: float | None) -> dict[str, LoRAModule]:
    """Replace every nn.Linear / nn.Conv2d child of ``module`` for which ``target_filter(qualified_name, layer)``
    is true by a LoRA wrapper around it, in place. Returns the wrappers by the qualified name of the layer they
    replaced. Layers already inside a LoRA wrapper (its base or factors) are never wrapped again."""
    alpha = resolve_alpha(rank, alpha)
    targets = []
    skip_prefixes: list[str] = []
    for name, layer in module.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(layer, LoRAModule):
            skip_prefixes.append(name + ".")
            continue
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and name and target_filter(name, layer):
            targets.append((name, layer))
    wrappers = {}
    for name, layer in targets:
        wrapper = _wrap(layer, rank, alpha)
        replace_submodule(module, name, wrapper)
        wrappers[name] = wrapper
    return wrappers


def is_unet_lora_target(name: str, layer: nn.Module) -> bool:
    """The kohya-like UNet LoRA target set (see the module docstring)."""
    if ".attentions." not in f".{name}":
        return False
    return any(name.endswith("." + t) for t in UNET_LORA_TARGETS)


class UNetLoRA:
    """The LoRA wrappers injected into a base UNet, by diffusers module path. They are registered inside the UNet
    (moving/casting the UNet moves them); this object only lists them for training and export."""

    def __init__(self, wrappers: dict[str, LoRAModule], rank: int, alpha: float):
        self.rank, self.alpha = rank, alpha
        self.wrappers = dict(wrappers)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(<diffusers module path>.lora_down.weight | .lora_up.weight, Parameter)``."""
        out = []
        for path, w in self.wrappers.items():
            out.append((f"{path}.lora_down.weight", w.lora_down.weight))
            out.append((f"{path}.lora_up.weight", w.lora_up.weight))
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def set_enabled(self, enabled: bool) -> None:
        """Switch the LoRA on/off everywhere it applies (the UNet and Control-LoRA encoder copies sharing it)."""
        for wrapper in self.wrappers.values():
            wrapper.enabled = enabled

    def export_kohya_state_dict(self, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """kohya ``lora_unet_*`` tensors (``lora_down.weight``, ``lora_up.weight``, ``alpha``). ``weights`` (e.g. the
        EMA copy, keyed like :meth:`trainable_named_parameters`) replaces the live factors."""
        live = dict(self.trainable_named_parameters())
        check_substitute_weights(weights, live)
        out = {}
        for path, w in self.wrappers.items():
            kohya = KOHYA_UNET_PREFIX + path.replace(".", "_")
            for part in ("lora_down", "lora_up"):
                key = f"{path}.{part}.weight"
                src = weights[key] if weights is not None else live[key]
                out[f"{kohya}.{part}.weight"] = src.detach().to("cpu", torch.float32).contiguous().clone()
            out[f"{kohya}.alpha"] = torch.tensor(float(w.alpha))
        return out

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_kohya_state_dict` (raises naming missing/unexpected/mis-shaped keys)."""
        expected = set()
        with torch.no_grad():
            for path, w in self.wrappers.items():
                kohya = KOHYA_UNET_PREFIX + path.replace(".", "_")
                for part, param in (("lora_down", w.lora_down.weight), ("lora_up", w.lora_up.weight)):
                    key = f"{kohya}.{part}.weight"
                    expected.add(key)
                    if key not in tensors:
                        raise ValueError(f"UNet LoRA file lacks {key}")
                    if tuple(tensors[key].shape) != tuple(param.shape):
                        raise ValueError(f"UNet LoRA {key}: file has shape {tuple(tensors[key].shape)}, this "
                                         f"network has {tuple(param.shape)} (different rank or base model?)")
                    param.copy_(tensors[key])
                alpha_key = f"{kohya}.alpha"
                expected.add(alpha_key)
                if alpha_key in tensors and abs(float(tensors[alpha_key]) - w.alpha) > 1e-6 * max(1.0, w.alpha):
                    raise ValueError(f"UNet LoRA {alpha_key}: file has alpha {float(tensors[alpha_key])}, this "
                                     f"network has {w.alpha}")
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise ValueError(f"UNet LoRA file has {len(unexpected)} keys this network does not have, e.g. "
                             f"{unexpected[:3]}")


def add_unet_lora(unet: nn.Module, rank: int, alpha: float | None = None) -> UNetLoRA:
    """Inject LoRA (rank, kohya alpha) into the base UNet's attention blocks (target set in the module docstring).

    Control-LoRA adapters built on this UNet (before or after) apply the same LoRA in their encoder copy, as ComfyUI
    does (it builds the Control-LoRA encoder from the LoRA-patched UNet); a full ``controlnet`` adapter copied the
    plain weights and is unaffected, as in ComfyUI."""
    if any(isinstance(m, LoRAModule) for m in unet.modules()):
        raise RuntimeError("this UNet already has LoRA layers; add_unet_lora was called twice?")
    alpha = resolve_alpha(rank, alpha)
    wrappers = inject_lora(unet, is_unet_lora_target, rank, alpha)
    if not wrappers:
        raise ValueError("the UNet has no attention layers to put a LoRA on (no '*.attentions.*' modules)")
    for ref in unet.__dict__.get("_codi_control_lora_adapters", []):  # Control-LoRA adapters built before
        adapter = ref()
        if adapter is not None:
            adapter.attach_unet_lora(wrappers)
    return UNetLoRA(wrappers, rank, alpha)


def find_lora_wrappers(module: nn.Module) -> dict[str, LoRAModule]:
    """Outermost LoRA wrappers inside ``module`` by qualified name."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, LoRAModule) and not any(name.startswith(k + ".") for k in out):
            out[name] = m
    return out


def check_substitute_weights(weights: dict[str, torch.Tensor] | None, live: dict[str, torch.Tensor]) -> None:
    """Substitute (e.g. EMA) weights must cover every trainable tensor with its shape."""
    if weights is None:
        return
    missing = sorted(set(live) - set(weights))
    if missing:
        raise KeyError(f"substitute weights lack {len(missing)} trainable tensors, e.g. {missing[:3]}")
    for k, t in live.items():
        if tuple(weights[k].shape) != tuple(t.shape):
            raise ValueError(f"substitute weight {k} has shape {tuple(weights[k].shape)}, expected {tuple(t.shape)}")
