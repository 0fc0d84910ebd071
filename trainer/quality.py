"""Quality report of a CoDi adapter on validation pairs (issue #4 item 6; reused by ``make demo``, issue #6).

:func:`evaluate_adapter` samples every validation pair with the adapter at 1, 2, 4 ... CoDi steps (the same seeded
noise per pair for every step count), optionally with plain DDIM at ``reference_steps`` (the same adapter, no boundary
scalings: the "base model at 50 steps" row), scores each output against the ground truth and scores the task's trivial
baseline the same way. :func:`write_report` writes ``report.md``, ``quality_vs_steps.png``, ``grid.png`` and
``metrics.json``.

Metrics (all on images in ``[0, 1]``, data range 1):

* **PSNR** ``10 log10(1 / MSE)`` per image over all pixels and channels, then averaged over images (the usual SR
  convention). :func:`psnr` returns ``inf`` for identical images; the report caps each image's PSNR at
  :data:`PSNR_CAP_DB` (100 dB) so that means and ``metrics.json`` stay finite.
* **SSIM** (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed per channel on the
  valid region (no padding) and averaged, as in the authors' reference code; equal to scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` (checked in the tests).
  torchmetrics 1.9 also averages over reflect-padded borders and differs in the third decimal.
* task metric: **edge F1** for ``canny`` (edge maps of the output and of the ground truth by the same detector used
  for the hints, ``ccd_sampler.hints.canny_hint``; where that module is absent, a Sobel-magnitude threshold, and the
  report says so), with a ``tolerance`` of 1 pixel (an edge pixel counts as matched when the other map has an edge
  within that Chebyshev distance, as in the BSDS benchmark); **masked-region PSNR** for ``inpaint`` (MSE over the
  ``mask == 1`` pixels only).

Trivial baselines (when an :class:`EvalPair` has no ``baseline``): ``sr`` bicubic upsampling of ``low_res`` (or the
hint, which by the ``sr`` convention *is* the bicubic-upsampled low-res image); ``inpaint`` mean fill (masked pixels
:= the per-channel mean of the known pixels); ``gray`` the grayscale input; ``blur`` / ``jpeg`` the degraded input;
``canny`` / ``depth`` / ``paired`` the dataset's mean colour (a flat image of the mean colour of the targets).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import ccd_sampler as cs
from trainer.adapters import adapted_unet_output, text_conditioning

logger = logging.getLogger("codi.quality")

PSNR_CAP_DB = 100.0
SSIM_KERNEL, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
EDGE_TOLERANCE = 1
SOBEL_THRESHOLD = 0.25  # fallback edge detector: Sobel magnitude (luma in [0, 1], kernel normalised by 4) above this
TASK_METRICS = {"canny": "edge F1", "inpaint": "masked PSNR (dB)"}
BASELINE_LABELS = {"sr": "bicubic", "inpaint": "mean fill", "gray": "grayscale input", "blur": "degraded input",
                   "jpeg": "degraded input", "canny": "mean colour", "depth": "mean colour", "paired": "mean colour"}
FIRST_COLUMN_LABELS = {"sr": "low-res input", "inpaint": "masked input", "gray": "gray input", "canny": "edges"}
GRID_MAX_PAIRS = 4
GRID_MIN_CELL = 128       # cells are upscaled (nearest, integer factor) until at least this wide
GRID_GAP = 2              # pixels between cells
GRID_HEADER = 16          # height of the text header row


# ================================================================================================== metrics


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         cap_db: float | None = None) -> torch.Tensor:
    """Per-image PSNR ``[B]`` in dB: ``10 log10(data_range^2 / MSE)`` over all pixels and channels. Identical images
    give ``inf`` (or ``cap_db`` when given; every value is clamped to at most ``cap_db``)."""
    pred, target = _as_batch(pred), _as_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (pred - target).pow(2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> inf
    return out if cap_db is None else out.clamp(max=cap_db)


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0,
                cap_db: float | None = None) -> torch.Tensor:
    """Per-image PSNR ``[B]`` over the pixels where ``mask == 1`` only (``mask`` ``[B, 1, H, W]`` / ``[1, H, W]``, all
    channels of a masked pixel count). ``nan`` for an image whose mask is empty."""
    pred, target, mask = _as_batch(pred), _as_batch(target), _as_batch(mask)
    if mask.shape[1] != 1 or mask.shape[-2:] != pred.shape[-2:] or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"masked_psnr: mask {tuple(mask.shape)} does not fit images {tuple(pred.shape)}")
    m = (mask > 0.5).to(pred.dtype).expand_as(pred)
    count = m.flatten(1).sum(1)
    mse = ((pred - target).pow(2) * m).flatten(1).sum(1) / count
    out = torch.where(count > 0, 10.0 * torch.log10(data_range ** 2 / mse), torch.full_like(count, float("nan")))
    return out if cap_db is None else out.clamp(max=cap_db)


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, kernel_size: int = SSIM_KERNEL,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM ``[B]`` (Gaussian window, computed per channel on the valid region and averaged). Images
    smaller than the window use the largest odd window that fits."""
    pred, target = _as_batch(pred), _as_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ {tuple(pred.shape)} vs {tuple(target.shape)}")
    size = min(kernel_size, min(pred.shape[-2:]))
    size -= (size + 1) % 2  # odd
    channels = pred.shape[1]
    window = _gaussian_window(size, sigma, pred.dtype).expand(channels, 1, size, size).contiguous()

    def blur(x):
        return F.conv2d(x, window, groups=channels)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(pred), blur(target)
    sxx = blur(pred * pred) - mu_x ** 2
    syy = blur(target * target) - mu_y ** 2
    sxy = blur(pred * target) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(1)


def _dilate(edges: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return edges
    return F.max_pool2d(edges.float().unsqueeze(1), 2 * radius + 1, stride=1, padding=radius).squeeze(1) > 0.5


def edge_f1(pred_edges: torch.Tensor, target_edges: torch.Tensor, tolerance: int = EDGE_TOLERANCE) -> torch.Tensor:
    """Per-image F1 ``[B]`` of binary edge maps ``[B, H, W]`` (or ``[H, W]``). Precision: the share of predicted
    edge pixels with a target edge within ``tolerance`` pixels (Chebyshev distance); recall the other way round.
    Two empty maps agree perfectly (F1 = 1); one empty map gives 0."""
    p, t = torch.as_tensor(pred_edges).bool(), torch.as_tensor(target_edges).bool()
    if p.ndim == 2:
        p, t = p.unsqueeze(0), t.unsqueeze(0)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"edge_f1: expected two [B, H, W] maps of one shape, got {tuple(p.shape)} / {tuple(t.shape)}")
    n_p, n_t = p.flatten(1).sum(1).double(), t.flatten(1).sum(1).double()
    precision = (p & _dilate(t, tolerance)).flatten(1).sum(1).double() / n_p.clamp(min=1)
    recall = (t & _dilate(p, tolerance)).flatten(1).sum(1).double() / n_t.clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    both_empty = (n_p == 0) & (n_t == 0)
    return torch.where(both_empty, torch.ones_like(f1), f1)


def sobel_edges(images: torch.Tensor, threshold: float = SOBEL_THRESHOLD) -> torch.Tensor:
    """Fallback edge detector: ``[B, 3, H, W]`` in [0, 1] -> bool ``[B, H, W]``, Sobel magnitude of the luma (3x3
    kernels normalised by 4, replicate padding) above ``threshold``."""
    x = _as_batch(images).float()
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1) if x.shape[1] == 3 else x[:, :1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx.view(1, 1, 3, 3))
    gy = F.conv2d(padded, kx.t().contiguous().view(1, 1, 3, 3))
    return (gx.pow(2) + gy.pow(2)).sqrt().squeeze(1) > threshold


def _edge_map_from_output(out, batch: int, hw) -> torch.Tensor:
    """Normalise an edge detector's output to bool ``[B, H, W]`` (accepts [B,C,H,W], [B,H,W,C], [B,H,W], numpy)."""
    out = torch.as_tensor(out)
    if out.dtype == torch.uint8:
        out = out.float() / 255.0
    out = out.float()
    if out.ndim == 4 and tuple(out.shape[1:3]) == tuple(hw) and out.shape[-1] in (1, 3):
        out = out.permute(0, 3, 1, 2)
    if out.ndim == 4:
        out = out.amax(1)
    if out.ndim != 3 or out.shape[0] != batch or tuple(out.shape[-2:]) != tuple(hw):
        raise ValueError(f"unexpected edge map shape {tuple(out.shape)}")
    return out > 0.5


def default_edge_detector(**kwargs) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``(detector, description)``: ``ccd_sampler.hints.canny_hint`` (the hint builder) when present, with the
    keyword arguments it accepts from ``kwargs`` (e.g. the adapter's ``hint_preprocessing`` thresholds); else the
    Sobel fallback."""
    try:
        from ccd_sampler.hints import canny_hint
    except ImportError:
        return sobel_edges, (f"Sobel-magnitude threshold {SOBEL_THRESHOLD} (fallback: ccd_sampler.hints.canny_hint is "
                             "not available)")
    try:
        params = inspect.signature(canny_hint).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        used = {k: v for k, v in kwargs.items() if takes_any or k in params}
    except (TypeError, ValueError):
        used = {}

    def detect(images: torch.Tensor) -> torch.Tensor:
        images = images.float().clamp(0, 1)
        hw = images.shape[-2:]
        try:  # batched call convention ([B, 3, H, W])
            return _edge_map_from_output(canny_hint(images, **used), images.shape[0], hw)
        except Exception:  # per-image call convention ([3, H, W])
            return torch.cat([_edge_map_from_output(canny_hint(im, **used), 1, hw) for im in images])

    args = ", ".join(f"{k}={v}" for k, v in used.items())
    return detect, f"ccd_sampler.hints.canny_hint({args})"


# ================================================================================================== data types


@dataclass
class EvalPair:
    """One validation example. ``hint`` is the adapter's condition (``[3, H, W]``, range per task: [0, 1]; the
    inpaint hint may hold -1 at masked pixels). ``mask`` ``[1, H, W]`` (1 = inpaint here) for inpainting (derived
    from ``hint < 0`` when None). ``low_res`` ``[3, h, w]`` for sr (first grid column). ``baseline``: the trivial
    baseline's output; None computes the task default (module docstring)."""

    target: torch.Tensor
    hint: torch.Tensor
    caption: str = ""
    mask: torch.Tensor | None = None
    low_res: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    name: str = ""


@dataclass
class MethodRow:
    method: str                 # "CoDi 1 step", "bicubic", "DDIM 50 steps"
    kind: str                   # "codi" | "baseline" | "reference"
    steps: int | None           # sampling steps (None for the baseline)
    psnr: float
    ssim: float
    task_metric: float | None   # edge F1 / masked PSNR; None when the task has none
    nfe: float                  # network evaluations per image
    seconds_per_image: float
    timesteps: list[int] = field(default_factory=list)
    per_image: dict = field(default_factory=dict)  # {"psnr": [...], "ssim": [...], "task_metric": [...]}


@dataclass
class QualityResult:
    task: str
    task_metric_name: str | None
    rows: list[MethodRow]
    settings: dict
    machine: dict
    pair_names: list[str]
    grid_columns: list[str]                  # header labels
    grid_images: list[list[torch.Tensor]]    # [pair][column] -> [3, H, W] in [0, 1] (first GRID_MAX_PAIRS pairs)

    def row(self, method: str) -> MethodRow:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def to_dict(self) -> dict:
        return {"task": self.task, "task_metric": self.task_metric_name, "settings": self.settings,
                "machine": self.machine, "pairs": self.pair_names,
                "rows": [_finite(asdict(r)) for r in self.rows]}


def _finite(obj):
    """JSON-safe: nan/inf -> None (metrics.json must parse with any JSON reader)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ================================================================================================== baselines


def validation_pairs(dataset, max_pairs: int | None = None) -> list[EvalPair]:
    """The quality report's pairs from a validation ``ControlDataset`` (``trainer.data``): fixed crops and conditions
    (its validation seed and the item index), targets in [0, 1]."""
    count = len(dataset) if max_pairs is None else min(len(dataset), max_pairs)
    pairs = []
    for index in range(count):
        sample = dataset.get(index)
        pairs.append(EvalPair(target=(sample["pixel_values"] + 1) / 2, hint=sample["hint"], caption=sample["caption"],
                              mask=sample.get("mask"), name=dataset.items[index].image_path.stem))
    return pairs


def mask_of(pair: EvalPair) -> torch.Tensor | None:
    """The pair's inpainting mask ``[1, H, W]`` (1 = inpaint): given, or ``hint < 0`` in any channel."""
    if pair.mask is not None:
        return (torch.as_tensor(pair.mask).float() > 0.5).float().reshape(1, *pair.target.shape[-2:])
    if (pair.hint < 0).any():
        return (pair.hint < 0).any(0, keepdim=True).float()
    return None


def bicubic_upsample(low_res: torch.Tensor, size) -> torch.Tensor:
    """Bicubic (a = -0.75, pixel centres, no antialias, clamped): the filter of ``ccd_sampler.hints.upscale_to``."""
    return F.interpolate(low_res.float().unsqueeze(0), size=tuple(size), mode="bicubic",
                         align_corners=False)[0].clamp(0, 1)


def default_baseline(pair: EvalPair, task: str, mean_colour: torch.Tensor | None = None) -> torch.Tensor:
    """The task's trivial baseline for one pair (see the module docstring)."""
    target = pair.target.float()
    hw = target.shape[-2:]
    if task == "sr":
        if pair.low_res is not None:
            return bicubic_upsample(pair.low_res, hw)
        return pair.hint.float().clamp(0, 1)
    if task == "inpaint":
        mask = mask_of(pair)
        if mask is None:
            return pair.hint.float().clamp(0, 1)
        known = 1.0 - mask
        count = known.sum().clamp(min=1)
        mean = (target * known).flatten(1).sum(1) / count
        return target * known + mean.view(3, 1, 1) * mask
    if task in ("gray", "blur", "jpeg"):
        hint = pair.hint.float().clamp(0, 1)
        return hint.expand(3, *hw).clone() if hint.shape[0] == 1 else hint
    colour = mean_colour if mean_colour is not None else target.flatten(1).mean(1)
    return colour.view(3, 1, 1).expand(3, *hw).clone()


def first_column_image(pair: EvalPair, task: str) -> torch.Tensor:
    """Grid column 0: the low-res input nearest-upscaled to full size (sr with ``low_res``), else the hint shown in
    [0, 1] (inpaint: masked pixels grey)."""
    hw = pair.target.shape[-2:]
    if pair.low_res is not None:
        return F.interpolate(pair.low_res.float().unsqueeze(0), size=tuple(hw), mode="nearest")[0].clamp(0, 1)
    hint = pair.hint.float()
    if task == "inpaint":
        mask = mask_of(pair)
        if mask is not None:
            return (hint.clamp(0, 1) * (1 - mask) + 0.5 * mask)
    return hint.clamp(0, 1)


# ================================================================================================== evaluation


def step_label(steps: int, prefix: str = "CoDi") -> str:
    return f"{prefix} {steps} step" + ("" if steps == 1 else "s")


def machine_info(device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def reference_timesteps(steps: int, grid: int) -> list[int]:
    """The reference (plain DDIM) schedule: the CoDi grid's timesteps at ``steps`` steps where the grid splits that
    way, else ``steps`` evenly spaced timesteps from the grid's top timestep down to 0."""
    try:
        return cs.codi_timesteps(steps, grid=grid)
    except ValueError:
        return cs.even_timesteps(steps, t_max=cs.distill_grid(grid)[0])


def _schedule_of(base) -> cs.NoiseSchedule:
    return cs.NoiseSchedule.from_config(getattr(base, "scheduler", None))


def _groups(pairs: Sequence[EvalPair], batch_size: int) -> list[list[int]]:
    """Pair indices batched by equal target/hint size, in order of first appearance, at most ``batch_size`` each."""
    by_shape: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        by_shape.setdefault((tuple(p.target.shape), tuple(p.hint.shape)), []).append(i)
    out = []
    for idx in by_shape.values():
        out.extend(idx[j:j + batch_size] for j in range(0, len(idx), batch_size))
    return out


def _validate(pairs: Sequence[EvalPair], task: str) -> None:
    if not pairs:
        raise ValueError("evaluate_adapter: no validation pairs")
    for i, p in enumerate(pairs):
        t, h = p.target, p.hint
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"pair {i}: target must be [3, H, W], got {tuple(t.shape)}")
        if tuple(h.shape) != tuple(t.shape):
            raise ValueError(f"pair {i}: hint {tuple(h.shape)} must have the target's shape {tuple(t.shape)}")
        if t.shape[-1] % 8 or t.shape[-2] % 8:
            raise ValueError(f"pair {i}: size {tuple(t.shape[-2:])} is not a multiple of 8 (the VAE's factor)")
        if p.baseline is not None and tuple(p.baseline.shape) != tuple(t.shape):
            raise ValueError(f"pair {i}: baseline {tuple(p.baseline.shape)} must have the target's shape")
        if task == "inpaint" and mask_of(p) is None:
            logger.warning("pair %d: inpaint task without a mask (and no negative hint pixels): masked-region PSNR "
                           "is undefined for it", i)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_adapter(base, adapter, pairs: Sequence[EvalPair], *, task: str, steps: Sequence[int] = (1, 2, 4),
                     grid: int = 50, sampler_mode: str = "ode", boundary: bool = True, sigma_data: float = 0.5,
                     timestep_scaling: float = 10.0, seed: int = 0, cfg: float = 1.0,
                     reference_steps: int | None = None, device=None, progress: bool = True,
                     batch_size: int = 8, baseline_label: str | None = None,
                     edge_detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     edge_kwargs: dict | None = None, negative_prompt: str = "",
                     encode_text: Callable | None = None) -> QualityResult:
    """Score ``adapter`` (over ``base``, a ``trainer.checkpoints.BaseModel``) on ``pairs``.

    Every pair is sampled at each of ``steps`` CoDi steps (``codi_timesteps(steps, grid)``, boundary scalings as
    given) from the same noise (drawn from ``seed + pair index``), and with plain DDIM (no boundary, ODE) at
    ``reference_steps`` when given; outputs are decoded with the VAE and scored against the targets together with
    the trivial baseline. Pairs of one size are batched (``batch_size`` at most). Wall time per image covers
    sampling + VAE decode (a warm-up call runs first, untimed). ``cfg != 1`` runs classifier-free guidance with
    ``negative_prompt``; NFE counts both branches then. ``sampler_mode="consistency"`` draws its fresh noise per
    batch (seeded), so there the numbers also depend on ``batch_size``.

    The models must already be on ``device`` (default: the UNet's device) and in their compute dtype; a half
    precision UNet runs under autocast. With a jointly trained UNet LoRA, put its EMA weights in place first (the
    trainer's ``ema_unet_lora``). Call it on the main process only. ``encode_text`` replaces ``base.encode_text``
    (e.g. the trainer's text-encoder output cache once the encoders are freed)."""
    from tqdm.auto import tqdm

    if base.vae is None and getattr(base, "latent_downscale", 8) != 1:  # pixel-space bases decode with the identity
        raise ValueError("the base model has no VAE: the quality report needs one to decode the samples")
    encode_text = encode_text or base.encode_text
    _validate(pairs, task)
    steps = [int(s) for s in steps]
    unet = base.unet
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    dtype = unet.dtype
    schedule = _schedule_of(base)
    prediction_type = base.prediction_type
    task_metric_name = TASK_METRICS.get(task)
    edge_description = None
    if task == "canny":
        if edge_detector is None:
            edge_detector, edge_description = default_edge_detector(**(edge_kwargs or {}))
        else:
            edge_description = getattr(edge_detector, "__name__", "custom edge detector")

    methods = []  # (label, kind, steps, timesteps, boundary)
    for n in steps:
        methods.append((step_label(n), "codi", n, cs.codi_timesteps(n, grid=grid), boundary, sampler_mode))
    if reference_steps:
        methods.append((step_label(int(reference_steps), "DDIM"), "reference", int(reference_steps),
                        reference_timesteps(int(reference_steps), grid), False, "ode"))

    mean_colour = torch.stack([p.target.float().flatten(1).mean(1) for p in pairs]).mean(0)
    baseline_label = baseline_label or BASELINE_LABELS.get(task, "baseline")
    targets = [p.target.float().clamp(0, 1).cpu() for p in pairs]
    baselines = [(p.baseline.float() if p.baseline is not None else default_baseline(p, task, mean_colour)).clamp(0, 1)
                 for p in pairs]
    masks = [mask_of(p) for p in pairs]
    outputs: dict[str, list[torch.Tensor | None]] = {m[0]: [None] * len(pairs) for m in methods}
    seconds = {m[0]: 0.0 for m in methods}
    evals = {m[0]: 0 for m in methods}

    for module in (unet, adapter, base.vae):
        if module is not None:  # no VAE: a pixel-space base, decode = identity
            module.eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    calls = {"images": 0}

    def denoise(z, t, cond):
        calls["images"] += z.shape[0]
        return adapted_unet_output(unet, adapter, z, t, cond)

    groups = _groups(pairs, batch_size)
    bar = tqdm(total=len(pairs) * len(methods), desc="quality report", disable=not progress, dynamic_ncols=True)
    warmed = False
    for group in groups:
        hint = torch.stack([pairs[i].hint.float() for i in group]).to(device, dtype)
        downscale = getattr(base, "latent_downscale", 8)  # 1 for a pixel-space base
        h, w = hint.shape[-2] // downscale, hint.shape[-1] // downscale
        size = tuple(hint.shape[-2:])  # SDXL time ids: the size actually sampled
        text = encode_text([pairs[i].caption for i in group], device=device, size=size)
        cond = text_conditioning(text, hint)
        uncond = None
        if cfg != 1.0:
            uncond = text_conditioning(encode_text([negative_prompt] * len(group), device=device, size=size),
                                        hint)
        noise = torch.stack([torch.randn((unet.config.in_channels, h, w),
                                         generator=torch.Generator().manual_seed(seed + i)) for i in group])
        noise = noise.to(device, dtype)

        def run(timesteps, use_boundary, mode):
            generator = torch.Generator().manual_seed(seed + 7919 * (group[0] + 1))
            with autocast:
                latents = cs.sample(denoise, noise, timesteps, prediction_type, schedule=schedule, mode=mode,
                                    cond=cond, uncond=uncond, cfg=cfg, generator=generator, boundary=use_boundary,
                                    sigma_data=sigma_data, timestep_scaling=timestep_scaling)
                image = base.decode_latents(latents)
            return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

        if not warmed:  # first calls pay one-off costs (allocator, kernels): keep them out of the timings
            run(methods[0][3][:1], methods[0][4], "ode")
            warmed = True
        for label, _kind, _n, timesteps, use_boundary, mode in methods:
            calls["images"] = 0
            _sync(device)
            start = time.perf_counter()
            images = run(timesteps, use_boundary, mode)
            _sync(device)
            seconds[label] += time.perf_counter() - start
            evals[label] += calls["images"]
            for k, i in enumerate(group):
                outputs[label][i] = images[k]
            bar.update(len(group))
    bar.close()

    def score_group(images: list[torch.Tensor], group: list[int]) -> dict[str, list[float]]:
        pred = torch.stack([images[i] for i in group])
        tgt = torch.stack([targets[i] for i in group])
        out = {"psnr": psnr(pred, tgt, cap_db=PSNR_CAP_DB).tolist(), "ssim": ssim(pred, tgt).tolist()}
        if task == "canny":
            out["task_metric"] = edge_f1(edge_detector(pred), edge_detector(tgt)).tolist()
        elif task == "inpaint":
            out["task_metric"] = [float("nan") if masks[i] is None else
                                  float(masked_psnr(images[i], targets[i], masks[i], cap_db=PSNR_CAP_DB)[0])
                                  for i in group]
        return out

    def score_all(images: list[torch.Tensor]) -> dict[str, list[float]]:
        """Per-image metrics in pair order (scored per size group: the images of different groups differ in size)."""
        per: dict[str, list[float]] = {}
        for group in groups:
            for key, values in score_group(images, group).items():
                column = per.setdefault(key, [float("nan")] * len(pairs))
                for i, v in zip(group, values):
                    column[i] = v
        return per

    def mean(values) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    rows = []
    base_scores = score_all(baselines)
    rows.append(MethodRow(baseline_label, "baseline", None, mean(base_scores["psnr"]), mean(base_scores["ssim"]),
                          mean(base_scores["task_metric"]) if "task_metric" in base_scores else None, 0.0, 0.0,
                          [], base_scores))
    for label, kind, n, timesteps, _b, _m in methods:
        s = score_all(outputs[label])
        rows.append(MethodRow(label, kind, n, mean(s["psnr"]), mean(s["ssim"]),
                              mean(s["task_metric"]) if "task_metric" in s else None, evals[label] / len(pairs),
                              seconds[label] / len(pairs), list(timesteps), s))

    shown = list(range(min(GRID_MAX_PAIRS, len(pairs))))
    first = FIRST_COLUMN_LABELS.get(task, "hint")
    if pairs[0].low_res is not None:
        first = "low-res input"
    columns = [first, baseline_label, *[m[0] for m in methods], "ground truth"]
    grid_images = [[first_column_image(pairs[i], task), baselines[i], *[outputs[m[0]][i] for m in methods],
                    targets[i]] for i in shown]
    sizes = sorted({f"{p.target.shape[-1]}x{p.target.shape[-2]}" for p in pairs})
    settings = {"task": task, "num_pairs": len(pairs), "resolution": sizes, "steps": steps, "grid": grid,
                "sampler_mode": sampler_mode, "boundary": boundary, "sigma_data": sigma_data,
                "timestep_scaling": timestep_scaling, "seed": seed, "cfg": cfg, "reference_steps": reference_steps,
                "prediction_type": prediction_type, "architecture": getattr(base, "architecture", None),
                "base_model": getattr(base, "source", None), "adapter_type": getattr(adapter, "adapter_type", None),
                "dtype": str(dtype).replace("torch.", ""), "batch_size": batch_size,
                "psnr_cap_db": PSNR_CAP_DB, "baseline": baseline_label}
    if edge_description:
        settings["edge_detector"] = edge_description
        settings["edge_tolerance_px"] = EDGE_TOLERANCE
    return QualityResult(task=task, task_metric_name=task_metric_name, rows=rows, settings=settings,
                         machine=machine_info(device), pair_names=[p.name or f"pair {i}" for i, p in enumerate(pairs)],
                         grid_columns=columns, grid_images=grid_images)


# ================================================================================================== report


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(result: QualityResult) -> str:
    task_col = result.task_metric_name
    head = ["Steps", "Method", "PSNR (dB) ↑", "SSIM ↑"] + ([f"{task_col} ↑"] if task_col else []) + ["NFE", "s/img"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in result.rows:
        cells = ["–" if r.steps is None else str(r.steps), r.method, _fmt(r.psnr, 2), _fmt(r.ssim, 4)]
        if task_col:
            cells.append(_fmt(r.task_metric, 2 if result.task == "inpaint" else 4))
        cells += [_fmt(r.nfe, 0) if r.nfe else "0", _fmt(r.seconds_per_image, 3) if r.kind != "baseline" else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell_size(image: torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a grid cell for images like ``image``: upscaled by the smallest integer factor that makes
    it at least :data:`GRID_MIN_CELL` wide."""
    h, w = image.shape[-2:]
    factor = max(1, math.ceil(GRID_MIN_CELL / w))
    return w * factor, h * factor


def grid_cell_size(result: QualityResult) -> tuple[int, int]:
    """``(width, height)`` of one cell of ``grid.png`` (from the first pair's size)."""
    return _cell_size(result.grid_images[0][0])


def _grid_size(cell: tuple[int, int], cols: int, rows: int, header_lines: int = 1) -> tuple[int, int]:
    cw, ch = cell
    return cols * cw + (cols - 1) * GRID_GAP, GRID_HEADER * header_lines + rows * ch + (rows - 1) * GRID_GAP


def grid_size(result: QualityResult) -> tuple[int, int]:
    """``(width, height)`` of ``grid.png``."""
    return _grid_size(grid_cell_size(result), len(result.grid_columns), len(result.grid_images))


def _to_pil(image: torch.Tensor, size):
    from PIL import Image

    array = (image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    pil = Image.fromarray(array)
    return pil if pil.size == tuple(size) else pil.resize(tuple(size), Image.NEAREST)


def _label_lines(draw, font, label: str, width: int, lines: int) -> list[str]:
    """``label`` word-wrapped into at most ``lines`` lines of ``width`` pixels (the last one cut to fit)."""
    out, words = [], label.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and len(out) < lines - 1 and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        if len(out) == lines - 1 and words:
            line = " ".join([line, *words])
            words = []
        while len(line) > 1 and draw.textlength(line, font=font) > width:
            line = line[:-1]
        out.append(line)
    return out


def write_image_grid(labels: Sequence[str], rows: Sequence[Sequence[torch.Tensor]], path, header_lines: int = 1
                     ) -> Path:
    """A labelled grid PNG: ``rows[r][c]`` (``[3, H, W]`` in [0, 1], all of one size) under the column ``labels``,
    cells upscaled (nearest) to at least :data:`GRID_MIN_CELL` wide; labels wrap over ``header_lines`` lines."""
    from PIL import Image, ImageDraw, ImageFont

    cw, ch = cell = _cell_size(rows[0][0])
    canvas = Image.new("RGB", _grid_size(cell, len(labels), len(rows), header_lines), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, label in enumerate(labels):
        for k, line in enumerate(_label_lines(draw, font, label, cw - 4, header_lines)):
            draw.text((c * (cw + GRID_GAP) + 2, 2 + k * GRID_HEADER), line, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        y = GRID_HEADER * header_lines + r * (ch + GRID_GAP)
        for c, image in enumerate(row):
            canvas.paste(_to_pil(image, (cw, ch)), (c * (cw + GRID_GAP), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_grid(result: QualityResult, path) -> Path:
    return write_image_grid(result.grid_columns, result.grid_images, path)


def write_plot(result: QualityResult, path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    codi = [r for r in result.rows if r.kind == "codi"]
    extra = [r for r in result.rows if r.kind != "codi"]
    metrics = [("psnr", "PSNR (dB)"), ("ssim", "SSIM")]
    if result.task_metric_name:
        metrics.append(("task_metric", result.task_metric_name))
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(metrics))
    styles = {"baseline": ("tab:gray", "--"), "reference": ("tab:red", ":")}
    xs = [r.steps for r in codi]
    for ax, (key, name) in zip(axes, metrics):
        ax.plot(xs, [getattr(r, key) for r in codi], "o-", color="tab:blue", label="CoDi")
        for r in extra:
            value = getattr(r, key)
            if value is not None and math.isfinite(value):
                colour, style = styles[r.kind]
                ax.axhline(value, color=colour, linestyle=style, label=r.method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result.task}: quality vs steps ({result.settings['num_pairs']} pairs)", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def write_report(result: QualityResult, out_dir, *, title: str = "CoDi quality report",
                 extra_lines: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``quality_vs_steps.png``, ``grid.png`` and ``metrics.json`` into ``out_dir``; returns
    ``{"report", "plot", "grid", "metrics"}`` -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plot": write_plot(result, out / "quality_vs_steps.png"), "grid": write_grid(result, out / "grid.png")}
    s, m = result.settings, result.machine
    metrics = result.to_dict()
    metrics["files"] = {"report": "report.md", "plot": paths["plot"].name, "grid": paths["grid"].name}
    paths["metrics"] = out / "metrics.json"
    paths["metrics"].write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    machine = f"{m['device']}" + (f" ({m['gpu']})" if "gpu" in m else f" ({m['cpu']}, {m['torch_threads']} torch threads)")
    lines = [
        f"# {title}", "",
        f"Task **{result.task}**, {s['num_pairs']} validation pairs at {', '.join(s['resolution'])}; "
        f"adapter `{s['adapter_type']}` on a {s['architecture']} base ({s['prediction_type']}).", "",
        markdown_table(result), "",
        f"- CoDi rows: `codi_timesteps(steps, grid={s['grid']})`, sampler `{s['sampler_mode']}`, boundary scalings "
        f"{'on' if s['boundary'] else 'off'} (sigma_data {s['sigma_data']}, timestep scaling {s['timestep_scaling']}), "
        f"cfg {s['cfg']}, the same noise per pair for every row (seed {s['seed']} + pair index).",
    ]
    ref = next((r for r in result.rows if r.kind == "reference"), None)
    if ref is not None:
        ts = ref.timesteps
        shown = ", ".join(map(str, ts)) if len(ts) <= 6 else f"{ts[0]}, {ts[1]}, {ts[2]}, …, {ts[-1]}"
        lines.append(f"- {ref.method}: the same adapter sampled with plain DDIM (ODE, no boundary scalings) at "
                     f"timesteps {shown}.")
    lines.append(f"- {s['baseline']}: the trivial baseline (no network). PSNR/SSIM on [0, 1] images (data range 1), "
                 f"averaged per image; per-image PSNR capped at {s['psnr_cap_db']:.0f} dB. SSIM: 11×11 Gaussian "
                 "window, σ 1.5.")
    if result.task == "canny":
        lines.append(f"- Edge F1: edges of output and ground truth by {s['edge_detector']}, tolerance "
                     f"{s['edge_tolerance_px']} px.")
    if result.task == "inpaint":
        lines.append("- Masked PSNR: PSNR over the pixels to inpaint (mask = 1) only.")
    lines += [f"- NFE: UNet+adapter evaluations per image; s/img: wall time per image for sampling + VAE decode "
              f"(batches of up to {s['batch_size']}, {s['dtype']}, after an untimed warm-up).",
              f"- Machine: {machine}; torch {m['torch']}, Python {m['python']}, {m['platform']}.", "",
              "![quality vs steps](quality_vs_steps.png)", "",
              f"![grid]({paths['grid'].name})", "",
              "Grid rows: " + ", ".join(result.pair_names[:len(result.grid_images)]) + "; columns: "
              + " | ".join(result.grid_columns) + "."]
    if extra_lines:
        lines += ["", *extra_lines]
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {k: paths[k] for k in ("report", "plot", "grid", "metrics")}
