"""Scoring an adapter on validation pairs: the numbers of the quality report (``train.py --quality_report``,
``quality_report.py``, the benchmarks and ``make demo``).

:func:`evaluate_adapter` samples every validation pair with the adapter at 1, 2, 4 ... CoDi steps (the same seeded
noise per pair for every step count), optionally with plain DDIM at ``reference_steps`` (the same adapter, no boundary
scalings: the "base model at 50 steps" row), scores each output against the ground truth (``metrics``) and scores the
task's trivial baseline the same way; :mod:`trainer.evaluation.report` writes the files.

Per image: PSNR (capped at :data:`PSNR_CAP_DB` so means stay finite), SSIM, and the task metric: edge F1 for
``canny``, masked-region PSNR for ``inpaint``. Trivial baselines (when an :class:`EvalPair` has no ``baseline``):
``sr`` bicubic upsampling of ``low_res`` (or the hint, which by the ``sr`` convention *is* the bicubic-upsampled
low-res image); ``inpaint`` mean fill (masked pixels := the per-channel mean of the known pixels); ``gray`` the
grayscale input; ``blur`` / ``jpeg`` the degraded input; ``canny`` / ``depth`` / ``paired`` the dataset's mean colour.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import ccd_sampler as cs
from trainer.adapters.controlnet import adapted_unet_output, text_conditioning
from trainer.evaluation.metrics import EDGE_TOLERANCE, canny_edge_detector, edge_f1, masked_psnr, psnr, ssim

logger = logging.getLogger("codi.quality")

PSNR_CAP_DB = 100.0
TASK_METRICS = {"canny": "edge F1", "inpaint": "masked PSNR (dB)"}
BASELINE_LABELS = {"sr": "bicubic", "inpaint": "mean fill", "gray": "grayscale input", "blur": "degraded input",
                   "jpeg": "degraded input", "canny": "mean colour", "depth": "mean colour", "paired": "mean colour"}
FIRST_COLUMN_LABELS = {"sr": "low-res input", "inpaint": "masked input", "gray": "gray input", "canny": "edges"}
GRID_MAX_PAIRS = 4


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
    kind: str                   # "codi" | "baseline" | "reference" | "hint_start"
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
    # every row's images ([3, H, W] in [0, 1], pair order) by method, and the targets: for metrics over the whole
    # set (the benchmarks' FD-patch); not written to metrics.json
    images: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    targets: list[torch.Tensor] = field(default_factory=list, repr=False)

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


def validation_pairs(dataset, max_pairs: int | None = None) -> list[EvalPair]:
    """The quality report's pairs from a validation ``trainer.data.dataset.ControlDataset``: fixed crops and conditions
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


@dataclass
class _Method:
    label: str
    kind: str              # "codi" | "reference" | "hint_start"
    steps: int
    timesteps: list[int]
    boundary: bool
    mode: str
    start: float | None = None  # img2img strength from the condition image (SR: the bicubic upsample); None: noise


# tasks whose hint is an image of the target, so sampling can start from it
HINT_START_TASKS = ("sr",)


def hint_start_label(steps: int, strength: float) -> str:
    """``CoDi 4, bicubic start 0.5``: short enough for a grid column."""
    return f"CoDi {steps}, bicubic start {strength:g}"


@torch.no_grad()
def evaluate_adapter(base, adapter, pairs: Sequence[EvalPair], *, task: str, steps: Sequence[int] = (1, 2, 4),
                     grid: int = 50, sampler_mode: str = "ode", boundary: bool = True, sigma_data: float = 0.5,
                     timestep_scaling: float = 10.0, seed: int = 0, cfg: float = 1.0,
                     reference_steps: int | None = None, device=None, progress: bool = True,
                     batch_size: int = 8, baseline_label: str | None = None,
                     edge_detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     edge_kwargs: dict | None = None, negative_prompt: str = "",
                     encode_text: Callable | None = None, hint_start: Sequence[float] = ()) -> QualityResult:
    """Score ``adapter`` (over ``base``, a ``trainer.models.BaseModel``) on ``pairs``.

    Every pair is sampled at each of ``steps`` CoDi steps (``codi_timesteps(steps, grid)``, boundary scalings as
    given) from the same noise (drawn from ``seed + pair index``), and with plain DDIM (no boundary, ODE) at
    ``reference_steps`` when given; outputs are decoded with the VAE and scored against the targets together with
    the trivial baseline. Pairs of one size are batched (``batch_size`` at most). Wall time per image covers
    sampling + VAE decode (a warm-up call runs first, untimed). ``cfg != 1`` runs classifier-free guidance with
    ``negative_prompt``; NFE counts both branches then. ``sampler_mode="consistency"`` draws its fresh noise per
    batch (seeded), so there the numbers also depend on ``batch_size``.

    The models must already be on ``device`` (default: the UNet's device) and in their compute dtype; a half
    precision UNet runs under autocast. With a jointly trained UNet LoRA, put its EMA weights in place first (the
    trainer's ``EmaUnetLora``). Call it on the main process only. ``encode_text`` replaces ``base.encode_text``
    (e.g. the trainer's text-encoder output cache once the encoders are freed).

    ``hint_start`` (SR only): extra rows that start the largest of ``steps`` from the condition instead of pure
    noise, one per strength s: ``z = alpha_t * encode(bicubic) + sigma_t * noise`` at the first of the last
    ``round(s * steps)`` grid timesteps, which are the only ones run (``ccd_sampler.sample``'s img2img)."""
    if base.vae is None and getattr(base, "latent_downscale", 8) != 1:  # pixel-space bases decode with the identity
        raise ValueError("the base model has no VAE: the quality report needs one to decode the samples")
    _validate(pairs, task)
    steps = [int(s) for s in steps]
    device = torch.device(device) if device is not None else next(base.unet.parameters()).device
    edge_description = None
    if task == "canny":
        if edge_detector is None:
            edge_detector, edge_description = canny_edge_detector(**(edge_kwargs or {}))
        else:
            edge_description = getattr(edge_detector, "__name__", "custom edge detector")
    methods = [_Method(step_label(n), "codi", n, cs.codi_timesteps(n, grid=grid), boundary, sampler_mode)
               for n in steps]
    if hint_start:
        if task not in HINT_START_TASKS:
            raise ValueError(f"starting from the condition needs a hint that is an image of the target "
                             f"({', '.join(HINT_START_TASKS)}), not task {task!r}")
        n = max(steps)
        for strength in hint_start:
            if not 0.0 < float(strength) <= 1.0:
                raise ValueError(f"a start strength must be in (0, 1], got {strength}")
            methods.append(_Method(hint_start_label(n, float(strength)), "hint_start", n,
                                   cs.codi_timesteps(n, grid=grid), boundary, sampler_mode, start=float(strength)))
    if reference_steps:
        methods.append(_Method(step_label(int(reference_steps), "DDIM"), "reference", int(reference_steps),
                               reference_timesteps(int(reference_steps), grid), False, "ode"))

    mean_colour = torch.stack([p.target.float().flatten(1).mean(1) for p in pairs]).mean(0)
    baseline_label = baseline_label or BASELINE_LABELS.get(task, "baseline")
    targets = [p.target.float().clamp(0, 1).cpu() for p in pairs]
    baselines = [(p.baseline.float() if p.baseline is not None else default_baseline(p, task, mean_colour)).clamp(0, 1)
                 for p in pairs]
    groups = _groups(pairs, batch_size)
    outputs, seconds, evals = _sample_methods(
        base, adapter, pairs, groups, methods, device=device, seed=seed, cfg=cfg, negative_prompt=negative_prompt,
        sigma_data=sigma_data, timestep_scaling=timestep_scaling, encode_text=encode_text or base.encode_text,
        progress=progress)

    scorer = _Scorer(task, targets, [mask_of(p) for p in pairs], groups, edge_detector)
    base_scores = scorer.per_image(baselines)
    rows = [MethodRow(baseline_label, "baseline", None, _mean(base_scores["psnr"]), _mean(base_scores["ssim"]),
                      _mean(base_scores["task_metric"]) if "task_metric" in base_scores else None, 0.0, 0.0, [],
                      base_scores)]
    for m in methods:
        scores = scorer.per_image(outputs[m.label])
        rows.append(MethodRow(m.label, m.kind, m.steps, _mean(scores["psnr"]), _mean(scores["ssim"]),
                              _mean(scores["task_metric"]) if "task_metric" in scores else None,
                              evals[m.label] / len(pairs), seconds[m.label] / len(pairs),
                              cs.img2img_timesteps(m.timesteps, m.start) if m.start else list(m.timesteps), scores))

    shown = list(range(min(GRID_MAX_PAIRS, len(pairs))))
    first = "low-res input" if pairs[0].low_res is not None else FIRST_COLUMN_LABELS.get(task, "hint")
    columns = [first, baseline_label, *[m.label for m in methods], "ground truth"]
    grid_images = [[first_column_image(pairs[i], task), baselines[i], *[outputs[m.label][i] for m in methods],
                    targets[i]] for i in shown]
    sizes = sorted({f"{p.target.shape[-1]}x{p.target.shape[-2]}" for p in pairs})
    settings = {"task": task, "num_pairs": len(pairs), "resolution": sizes, "steps": steps, "grid": grid,
                "sampler_mode": sampler_mode, "boundary": boundary, "sigma_data": sigma_data,
                "timestep_scaling": timestep_scaling, "seed": seed, "cfg": cfg, "reference_steps": reference_steps,
                "prediction_type": base.prediction_type, "architecture": getattr(base, "architecture", None),
                "base_model": getattr(base, "source", None), "adapter_type": getattr(adapter, "adapter_type", None),
                "dtype": str(base.unet.dtype).replace("torch.", ""), "batch_size": batch_size,
                "psnr_cap_db": PSNR_CAP_DB, "baseline": baseline_label, "hint_start": [float(x) for x in hint_start]}
    if edge_description:
        settings["edge_detector"] = edge_description
        settings["edge_tolerance_px"] = EDGE_TOLERANCE
    return QualityResult(task=task, task_metric_name=TASK_METRICS.get(task), rows=rows, settings=settings,
                         machine=machine_info(device), pair_names=[p.name or f"pair {i}" for i, p in enumerate(pairs)],
                         grid_columns=columns, grid_images=grid_images,
                         images={baseline_label: baselines, **outputs}, targets=targets)


def _sample_methods(base, adapter, pairs, groups, methods: list[_Method], *, device, seed: int, cfg: float,
                    negative_prompt: str, sigma_data: float, timestep_scaling: float, encode_text: Callable,
                    progress: bool) -> tuple[dict, dict, dict]:
    """Every pair sampled with every method: ``(images per method, seconds per method, network evaluations per
    method)``; images ``[3, H, W]`` in [0, 1] on the CPU, in pair order."""
    from tqdm.auto import tqdm

    unet = base.unet
    dtype = unet.dtype
    schedule = base.noise_schedule()
    outputs: dict[str, list[torch.Tensor | None]] = {m.label: [None] * len(pairs) for m in methods}
    seconds = {m.label: 0.0 for m in methods}
    evals = {m.label: 0 for m in methods}
    for module in (unet, adapter, base.vae):
        if module is not None:  # no VAE: a pixel-space base, decode = identity
            module.eval()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    calls = {"images": 0}

    def denoise(z, t, cond):
        calls["images"] += z.shape[0]
        return adapted_unet_output(unet, adapter, z, t, cond)

    def run(method: _Method, timesteps, noise, cond, uncond, first_pair: int) -> torch.Tensor:
        """One batch sampled with one method, decoded to images in [0, 1] on the CPU."""
        generator = torch.Generator().manual_seed(seed + 7919 * (first_pair + 1))
        init = {}
        if method.start is not None:  # the SR hint is the bicubic upsample in [0, 1]
            hint = cond["hint"]
            init = {"init_image": base.encode_pixels(hint * 2 - 1).to(noise.dtype), "strength": method.start}
        with autocast:
            latents = cs.sample(denoise, noise, timesteps, base.prediction_type, schedule=schedule,
                                mode=method.mode, cond=cond, uncond=uncond, cfg=cfg, generator=generator,
                                boundary=method.boundary, sigma_data=sigma_data, timestep_scaling=timestep_scaling,
                                **init)
        image = base.decode_latents(latents)  # in the VAE's own dtype: SDXL's overflows under fp16 autocast
        return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

    bar = tqdm(total=len(pairs) * len(methods), desc="quality report", disable=not progress, dynamic_ncols=True)
    warmed = False
    downscale = getattr(base, "latent_downscale", 8)  # 1 for a pixel-space base
    for group in groups:
        hint = torch.stack([pairs[i].hint.float() for i in group]).to(device, dtype)
        h, w = hint.shape[-2] // downscale, hint.shape[-1] // downscale
        size = tuple(hint.shape[-2:])  # SDXL time ids: the size actually sampled
        cond = text_conditioning(encode_text([pairs[i].caption for i in group], device=device, size=size), hint)
        uncond = None
        if cfg != 1.0:
            uncond = text_conditioning(encode_text([negative_prompt] * len(group), device=device, size=size),
                                        hint)
        noise = torch.stack([torch.randn((unet.config.in_channels, h, w),
                                         generator=torch.Generator().manual_seed(seed + i)) for i in group])
        noise = noise.to(device, dtype)
        if not warmed:  # first calls pay one-off costs (allocator, kernels): keep them out of the timings
            run(_Method("", "", 0, [], methods[0].boundary, "ode"), methods[0].timesteps[:1], noise, cond, uncond,
                group[0])
            warmed = True
        for method in methods:
            calls["images"] = 0
            _sync(device)
            start = time.perf_counter()
            images = run(method, method.timesteps, noise, cond, uncond, group[0])
            _sync(device)
            seconds[method.label] += time.perf_counter() - start
            evals[method.label] += calls["images"]
            for k, i in enumerate(group):
                outputs[method.label][i] = images[k]
            bar.update(len(group))
    bar.close()
    return outputs, seconds, evals


class _Scorer:
    """Per-image metrics of a list of outputs (scored per size group: images of different groups differ in size)."""

    def __init__(self, task: str, targets, masks, groups, edge_detector):
        self.task, self.targets, self.masks, self.groups = task, targets, masks, groups
        self.edge_detector = edge_detector

    def _group(self, images: list[torch.Tensor], group: list[int]) -> dict[str, list[float]]:
        pred = torch.stack([images[i] for i in group])
        tgt = torch.stack([self.targets[i] for i in group])
        out = {"psnr": psnr(pred, tgt, cap_db=PSNR_CAP_DB).tolist(), "ssim": ssim(pred, tgt).tolist()}
        if self.task == "canny":
            out["task_metric"] = edge_f1(self.edge_detector(pred), self.edge_detector(tgt)).tolist()
        elif self.task == "inpaint":
            out["task_metric"] = [float("nan") if self.masks[i] is None else
                                  float(masked_psnr(images[i], self.targets[i], self.masks[i], cap_db=PSNR_CAP_DB)[0])
                                  for i in group]
        return out

    def per_image(self, images: list[torch.Tensor]) -> dict[str, list[float]]:
        """Per-image metrics in pair order."""
        per: dict[str, list[float]] = {}
        for group in self.groups:
            for key, values in self._group(images, group).items():
                column = per.setdefault(key, [float("nan")] * len(images))
                for i, v in zip(group, values):
                    column[i] = v
        return per


def _mean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
