"""``--dry_run``: parameter counts and a memory prediction for the chosen settings.

weights, gradients, optimizer state and EMA are exact byte counts; activations are measured, not guessed: one
forward of the online model at two small probe resolutions records the bytes autograd saves for the backward pass
(``saved_tensors_hooks``), and a line through the two probes is extrapolated to the training resolution (activation
memory grows with the latent area; the probe is an estimate for attention, whose memory grows faster).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.adapters.controlnet import adapted_unet_output, text_conditioning
from trainer.training.optim import optimizer_state_bytes_per_param

GIB = 1024**3


def count_parameters(modules) -> tuple[int, int]:
    """(trainable, frozen) element counts over unique parameters (tied weights count once)."""
    seen, trainable, frozen = set(), 0, 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    return trainable, frozen


def frozen_bytes(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.requires_grad or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def saved_activation_bytes(forward, dtype_bytes: int | None = None) -> int:
    """Bytes autograd keeps for backward during ``forward()`` (each saved tensor storage counted once)."""
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(key)
            size = tensor.untyped_storage().nbytes()
            if dtype_bytes is not None and tensor.is_floating_point():
                size = size // tensor.element_size() * dtype_bytes
            total += size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return total


@dataclass
class MemoryPrediction:
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    ema: int
    activations: int

    @property
    def total(self) -> int:
        return (self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_state + self.ema
                + self.activations)

    def report(self) -> str:
        rows = [("frozen weights", self.frozen_weights), ("trainable weights", self.trainable_weights),
                ("gradients", self.gradients), ("optimizer state", self.optimizer_state),
                ("EMA copy", self.ema), ("activations (estimate)", self.activations)]
        lines = [f"  {name:<24}{size / GIB:8.2f} GiB" for name, size in rows]
        lines.append(f"  {'total':<24}{self.total / GIB:8.2f} GiB")
        return "\n".join(lines)


def extrapolate_activations(probe, resolution: tuple[int, int], probe_sizes=(16, 32), downscale: int = 8) -> int:
    """Fit ``a + b * latent_area`` through ``probe(h, w)`` at two small latent sizes, evaluate at ``resolution``
    (pixels; latent = pixels / ``downscale``: 8 for SD's VAE, 1 for a pixel-space base)."""
    (s1, s2) = probe_sizes
    a1, a2 = probe(s1, s1), probe(s2, s2)
    slope = (a2 - a1) / (s2 * s2 - s1 * s1)
    area = (resolution[0] // downscale) * (resolution[1] // downscale)
    return int(max(a2, a1 + slope * (area - s1 * s1)))


def predict_memory(networks, *, batch_size: int, optimizer_type: str, resolution, weight_dtype: torch.dtype,
                   device) -> MemoryPrediction:
    """The ``--dry_run`` prediction for one training step of ``networks`` (a ``networks.Networks``)."""
    base = networks.base
    trainable_count = sum(p.numel() for p in networks.trainable.values())
    train_bytes = 4  # trainable weights and their gradients stay float32
    frozen = frozen_bytes([base.unet, networks.adapter, base.vae, *base.text_encoders])
    compute_bytes = torch.tensor([], dtype=weight_dtype).element_size()
    text = base.encode_text([""] * batch_size, device=device)

    def probe(h, w):
        z = torch.randn(batch_size, base.unet.config.in_channels, h, w, device=device, dtype=weight_dtype)
        down = base.latent_downscale  # 1 for a pixel-space base bundle
        hint = torch.rand(batch_size, 3, h * down, w * down, device=device, dtype=weight_dtype)
        t = torch.full((batch_size,), 500, device=device)
        cond = text_conditioning(text, hint)
        return saved_activation_bytes(lambda: adapted_unet_output(base.unet, networks.adapter, z, t, cond),
                                      compute_bytes)

    activations = extrapolate_activations(probe, resolution, downscale=base.latent_downscale)
    return MemoryPrediction(
        frozen_weights=frozen, trainable_weights=trainable_count * train_bytes,
        gradients=trainable_count * train_bytes,
        optimizer_state=int(trainable_count * optimizer_state_bytes_per_param(optimizer_type)),
        ema=trainable_count * 4, activations=activations)


def reset_peak_memory(device) -> None:
    """Start measuring the peak from here: CUDA's allocator peak, or (CPU) the process's peak RSS, which Linux resets
    when ``5`` is written to ``/proc/self/clear_refs``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # not Linux: the peak then covers model loading too


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
