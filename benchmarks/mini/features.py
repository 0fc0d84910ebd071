#!/usr/bin/env python
"""The distribution metric of the miniature paper reproduction: **FD-patch** and **KD-patch**, the Fréchet
distance and the kernel distance between two sets of 64x64 RGB crops, measured in the features of a small network of
our own (``PatchFeatureNet``) trained on the TRAIN split of the real photos (``photos.py``, ``base/split.json``).

    .venv/bin/python benchmarks/mini/features.py --out benchmarks/mini/featnet --threads 1   # train + sanity table

This is **not FID** and its numbers are not comparable with FID, KID or with anything outside this project: FID's
Inception weights cannot be downloaded here, so the feature space is a ~1.2 M parameter CNN that saw 14 photographs.
Always call the metrics "FD-patch" / "KD-patch".

The network
    ``PatchFeatureNet``: input 64x64 RGB in [0, 1] (mapped to [-1, 1] inside); four stages of widths 32-64-128-256,
    each a stride-2 3x3 conv and a 3x3 conv, every conv followed by GroupNorm(8) and SiLU (64 -> 32 -> 16 -> 8 -> 4
    pixels; the first conv sees every input pixel, so fine detail still reaches the features); global average pooling
    gives the 256-d feature vector (``features(x)``). Three linear heads on the features are used only in training.
    1,179,830 parameters (with the heads), ~52 M multiply-adds per crop, 4.7 MB as float32 safetensors; ~0.2 s per
    training step of 64 crops on one CPU thread.

The training recipe (self-supervised, train photos only; the test photos are never seen in training)
    Every step draws ``batch_size`` random crops from the train photos (image uniform, then pyramid level, position,
    flip; ``photos.random_crops``), degrades and rotates them, and minimises a weighted sum (1 / 2 / 1) of three
    cross-entropies:

    * **image identity** — which of the 14 train photos (``split["train"]``) the crop came from (texture, colour and
      content statistics);
    * **rotation** — 0/90/180/270 degrees (structure: orientation of edges, sky above ground, upright objects;
      weight 2, it is the slowest of the three to learn and many train photos are textures without an "up");
    * **degradation** — clean / blurred / noised / blurred-then-noised, with prob. 0.4/0.2/0.2/0.2 (sharpness and
      grain, so that blurry or noisy generator outputs move far in feature space). Blur is a Gaussian blur
      (sigma U(0.6, 2.5) pixels) or an area-downsample by U(1.5, 4) followed by bilinear upsampling; noise is
      additive Gaussian, sigma U(0.02, 0.2) in [0, 1] units (clamped). The sanity table's degradations (bicubic 4x
      down/up, noise sigma 0.1) are thus *not* exactly the training ones.

    AdamW (lr 2e-3, weight decay 1e-4, linear warm-up 50 steps then cosine to 0), gradient clipping 1.0, batch 64,
    600 steps by default (~2.5 min on one CPU thread). Everything is seeded: weights from ``torch.manual_seed(seed)``
    (inside a forked RNG, the caller's RNG is untouched), crops from ``numpy.random.default_rng(seed)``,
    degradations/rotations from a ``torch.Generator`` seeded with ``seed``; with a fixed thread count the run is
    bit-for-bit repeatable on one machine. ``feature_net.json`` records the recipe, the accuracies on fresh held-out
    draws (identity on train photos; rotation and degradation also on the unseen test photos: rotation stays near
    chance there, their orientation cues do not transfer, degradation does), wall-clock seconds and the parameter
    count.

The metrics (on the pooled 256-d features, float64)
    FD-patch = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Fréchet distance of two Gaussians fitted to the
    features; ``Tr (S1 S2)^(1/2)`` is computed as the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2 — stable and real, no complex sqrtm).
    KD-patch = the unbiased MMD^2 estimate with KID's cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, d = 256,
    over the full sets (no subsets). Callers usually report KD-patch x 1000.

Limitations
    * FD-patch is strongly **biased by the sample size**: with N of a few hundred crops and 256 dimensions the
      covariance estimates are poor (rank <= N-1) and FD-patch between two samples of the *same* distribution is well
      above 0 and shrinks as N grows. Compare FD-patch values only at **equal N** (and preferably the same real
      reference set). KD-patch is unbiased (its expectation is 0 for equal distributions; it can be slightly
      negative) and is the better number for small N, but it is noisy: look at several seeds before trusting small
      differences.
    * The feature space is tiny and was trained on 14 photos: it measures patch statistics (colour, texture,
      sharpness, noise, orientation), not semantics. It deliberately reacts strongly to blur and noise.
    * The test split has only 4 photos (3 groups), so "real" test-crop distributions are themselves lumpy: two seeded
      draws of 256 test crops already differ by the share of each photo (row (i) of the sanity table).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import photos  # noqa: E402

CROP = 64
WEIGHTS_FILE = "feature_net.safetensors"
RECIPE_FILE = "feature_net.json"
SANITY_FILE = "sanity.json"
METADATA_KEY = "patch_feature_net"
SPLIT_FILE = HERE / "base" / "split.json"
DEGRADATIONS = ("clean", "blur", "noise", "blur+noise")
DEGRADATION_PROBS = (0.4, 0.2, 0.2, 0.2)
ROTATIONS = (0, 90, 180, 270)
DEFAULTS = {"steps": 600, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "warmup_steps": 50, "grad_clip": 1.0,
            "loss_weights": (1.0, 2.0, 1.0)}


# --------------------------------------------------------------------------------------------------------------- net
def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class PatchFeatureNet(nn.Module):
    """Small CNN for 64x64 RGB crops in [0, 1]: four stages (stride-2 conv + conv), global average pooling to
    ``widths[-1]``-d features (``features``). The heads (image identity, rotation, degradation) serve training only."""

    def __init__(self, widths=(32, 64, 128, 256), num_classes: int = 14, num_rotations: int = len(ROTATIONS),
                 num_degradations: int = len(DEGRADATIONS)):
        super().__init__()
        self.config = {"widths": list(widths), "num_classes": num_classes, "num_rotations": num_rotations,
                       "num_degradations": num_degradations}
        stages, c = [], 3
        for w in widths:
            stages.append(nn.Sequential(_conv(c, w, 2), _conv(w, w, 1)))
            c = w
        self.stages = nn.Sequential(*stages)
        self.class_head = nn.Linear(c, num_classes)
        self.rotation_head = nn.Linear(c, num_rotations)
        self.degradation_head = nn.Linear(c, num_degradations)

    @property
    def feature_dim(self) -> int:
        return self.config["widths"][-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> pooled features ``[N, feature_dim]``."""
        return self.stages(x * 2.0 - 1.0).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.class_head(f), self.rotation_head(f), self.degradation_head(f)


def param_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def save_feature_net(net: PatchFeatureNet, path) -> Path:
    """Write the weights (float32) as safetensors. The metadata is one key (``patch_feature_net``: a sorted JSON of
    the model name and config): safetensors writes several metadata keys in hash order, which would make reruns
    differ byte-wise."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in net.state_dict().items()}
    meta = json.dumps({"model": "PatchFeatureNet", "config": net.config}, sort_keys=True)
    save_file(state, str(path), metadata={METADATA_KEY: meta})
    return path


def load_feature_net(path) -> PatchFeatureNet:
    """Load a ``feature_net.safetensors`` (or the folder holding one); returns the net in eval mode on CPU."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if path.suffix != ".safetensors":
        raise ValueError(f"feature net weights must be a .safetensors file, got {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    if meta.get("model") != "PatchFeatureNet" or "config" not in meta:
        raise ValueError(f"{path} is not a PatchFeatureNet file (metadata {meta})")
    net = PatchFeatureNet(**meta["config"])
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval()


# ----------------------------------------------------------------------------------------------------------- degrade
def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def bicubic_blur(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Bicubic (antialiased) downsample by ``factor`` and bicubic upsample back; clamps to [0, 1]."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    return (x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)).clamp(0, 1)


def _random_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One crop ``[1, 3, H, W]``: Gaussian blur or area-down / bilinear-up with random strength."""
    u = torch.rand(2, generator=g).tolist()
    if u[0] < 0.5:
        return gaussian_blur(x, 0.6 + 1.9 * u[1])
    factor = 1.5 + 2.5 * u[1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(2, round(h / factor)), max(2, round(w / factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def augment(x: torch.Tensor, g: torch.Generator):
    """Degrade and rotate a batch ``[N, 3, H, W]`` in [0, 1]; returns ``(x, rotation labels, degradation labels)``."""
    n = x.shape[0]
    deg = torch.multinomial(torch.tensor(DEGRADATION_PROBS), n, replacement=True, generator=g)
    rot = torch.randint(len(ROTATIONS), (n,), generator=g)
    out = []
    for i in range(n):
        xi = x[i:i + 1]
        d = int(deg[i])
        if d in (1, 3):
            xi = _random_blur(xi, g)
        if d in (2, 3):
            xi = add_noise(xi, 0.02 + 0.18 * float(torch.rand(1, generator=g)), g)
        out.append(torch.rot90(xi.clamp(0, 1), int(rot[i]), dims=(2, 3)))
    return torch.cat(out), rot, deg


# -------------------------------------------------------------------------------------------------------------- data
_IMAGE_CACHE: dict[tuple, dict] = {}


def _images(names) -> dict:
    key = tuple(sorted(names))
    if key not in _IMAGE_CACHE:
        _IMAGE_CACHE[key] = photos.load_images(key)
    return _IMAGE_CACHE[key]


def read_split(path=SPLIT_FILE) -> dict:
    return json.loads(Path(path).read_text())


def crops01(names, count: int, seed: int) -> torch.Tensor:
    """``count`` seeded random 64x64 crops of the named photos (``photos.random_crops``) as a tensor in [0, 1]."""
    x = photos.random_crops(_images(names), count, CROP, np.random.default_rng(seed))
    return torch.from_numpy((x + 1.0) / 2.0).clamp(0, 1)


def labelled_crops(images: dict, classes: list, count: int, rng: np.random.Generator):
    """``count`` crops with their image labels: the label uniform over ``classes``, then the crop as in
    ``photos.random_crops`` (pyramid level, position, flip); returns ``(x in [0, 1], labels)``."""
    labels = rng.integers(len(classes), size=count)
    x = np.empty((count, 3, CROP, CROP), dtype=np.float32)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        x[idx] = photos.random_crops({classes[c]: images[classes[c]]}, len(idx), CROP, rng)
    return torch.from_numpy((x + 1.0) / 2.0).clamp(0, 1), torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------------------------- train
def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def _evaluate(net: PatchFeatureNet, classes: list, test_names: list, seed: int, count: int = 512) -> dict:
    """Accuracies on fresh draws (never trained on): identity/rotation/degradation on train photos, and
    rotation/degradation on the unseen test photos."""
    net.eval()
    out = {}
    rng = np.random.default_rng([seed, 1_000_003])
    g = torch.Generator().manual_seed(seed + 1_000_003)
    x, y = labelled_crops(_images(classes), classes, count, rng)
    xa, rot, deg = augment(x, g)
    logits = [torch.cat(t) for t in zip(*(net(b) for b in xa.split(128)))]
    out["train_photos"] = {"identity": (logits[0].argmax(1) == y).float().mean().item(),
                           "rotation": (logits[1].argmax(1) == rot).float().mean().item(),
                           "degradation": (logits[2].argmax(1) == deg).float().mean().item(), "count": count}
    if test_names:
        xt = photos.random_crops(_images(test_names), count, CROP, rng)
        xt, rot, deg = augment(torch.from_numpy((xt + 1.0) / 2.0).clamp(0, 1), g)
        logits = [torch.cat(t) for t in zip(*(net(b) for b in xt.split(128)))]
        out["test_photos"] = {"rotation": (logits[1].argmax(1) == rot).float().mean().item(),
                              "degradation": (logits[2].argmax(1) == deg).float().mean().item(), "count": count}
    return out


def train_feature_net(out_path, steps: int = DEFAULTS["steps"], seed: int = 0, threads: int | None = 1,
                      batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"], split=SPLIT_FILE,
                      eval_count: int = 512, progress: bool = False, loss_weights=DEFAULTS["loss_weights"]) -> dict:
    """Train ``PatchFeatureNet`` on the train photos of ``split`` (a path or a split dict) and write
    ``feature_net.safetensors`` + ``feature_net.json`` into the folder ``out_path``; returns the recipe dict."""
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    split = split if isinstance(split, dict) else read_split(split)
    classes = list(split["train"])
    if set(classes) & set(split.get("test", [])):
        raise ValueError("train and test photos overlap")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        images = _images(classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = PatchFeatureNet(num_classes=len(classes))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=DEFAULTS["weight_decay"])
        warmup = min(DEFAULTS["warmup_steps"], max(1, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        losses = []
        net.train()
        for step in range(steps):
            x, y = labelled_crops(images, classes, batch_size, rng)
            x, rot, deg = augment(x, g)
            lc, lr_, ld = net(x)
            parts = (F.cross_entropy(lc, y), F.cross_entropy(lr_, rot), F.cross_entropy(ld, deg))
            loss = sum(w * p for w, p in zip(loss_weights, parts))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), DEFAULTS["grad_clip"])
            opt.step()
            sched.step()
            losses.append([round(p.item(), 4) for p in parts])
            if progress and (step % 50 == 0 or step == steps - 1):
                print(f"step {step:4d}  identity {parts[0].item():.3f}  rotation {parts[1].item():.3f}  "
                      f"degradation {parts[2].item():.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        train_seconds = time.perf_counter() - t0
        accuracy = _evaluate(net, classes, list(split.get("test", [])), seed, eval_count) if eval_count else {}
        net.eval()
        weights = save_feature_net(net, out / WEIGHTS_FILE)
        tail = np.asarray(losses[-min(50, len(losses)):]) if losses else np.zeros((1, 3))
        recipe = {
            "model": "PatchFeatureNet", "config": net.config, "param_count": param_count(net),
            "feature_dim": net.feature_dim, "input": "RGB 64x64 in [0, 1]",
            "metrics": ["fd_patch", "kd_patch"], "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
            **{k: DEFAULTS[k] for k in ("weight_decay", "grad_clip")}, "warmup_steps": warmup,
            "loss_weights": dict(zip(("identity", "rotation", "degradation"), map(float, loss_weights))),
            "schedule": "linear warm-up then cosine to 0", "optimizer": "AdamW",
            "objective": "{:g} CE(image identity) + {:g} CE(rotation 0/90/180/270) + {:g} CE(degradation "
                         "clean/blur/noise/blur+noise)".format(*loss_weights),
            "degradation_probs": dict(zip(DEGRADATIONS, DEGRADATION_PROBS)),
            "blur": "Gaussian sigma U(0.6, 2.5) px, or area-down by U(1.5, 4) + bilinear up (1/2 each)",
            "noise": "additive Gaussian sigma U(0.02, 0.2), clamped to [0, 1]",
            "classes": classes, "split": {k: split.get(k) for k in ("seed", "train", "test")},
            "final_loss_mean_last_50": dict(zip(("identity", "rotation", "degradation"),
                                                [round(float(v), 4) for v in tail.mean(0)])),
            "accuracy": accuracy, "seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version(),
            "weights_bytes": weights.stat().st_size,
        }
        (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
        return recipe
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------------------------------------- metrics
def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); Tr (S1 S2)^(1/2) = sum of sqrt(eig(S1^1/2 S2 S1^1/2))."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_distance(f1, f2) -> float:
    """Fréchet distance between Gaussians fitted to the feature sets ``f1 [N1, d]`` and ``f2 [N2, d]`` (sample
    covariance, ddof 1): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64 (always real)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two [N>=2, d] feature sets of equal d, got {f1.shape} and {f2.shape}")
    return frechet_distance_from_stats(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def kernel_distance(f1, f2) -> float:
    """Unbiased MMD^2 between feature sets ``f1 [m, d]`` and ``f2 [n, d]`` with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3 (as in KID), over the full sets. Expectation 0 for equal distributions (so it can
    come out slightly negative); multiply by 1000 for KID-style reporting."""
    x, y = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need two [N>=2, d] feature sets of equal d, got {x.shape} and {y.shape}")
    d = x.shape[1]
    m, n = len(x), len(y)
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


@torch.no_grad()
def extract_features(net: PatchFeatureNet, images, batch_size: int = 128) -> np.ndarray:
    """Features ``[N, d]`` (float64 numpy) of ``images [N, 3, 64, 64]`` in [0, 1] (tensor or array); eval mode,
    no grad, batched; the net's train/eval mode is restored afterwards."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W] images in [0, 1], got {tuple(x.shape)}")
    was_training = net.training
    net.eval()
    try:
        p = next(net.parameters())
        feats = [net.features(b.to(p.device, p.dtype)).double().cpu() for b in x.split(batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(feats).numpy()


def distribution_metrics(net: PatchFeatureNet, images_a, images_b, batch_size: int = 128) -> dict:
    """``{"fd_patch", "kd_patch"}`` between two sets of crops ``[N, 3, 64, 64]`` in [0, 1] (KD-patch unscaled).
    FD-patch depends on N: compare only at equal N."""
    fa = extract_features(net, images_a, batch_size)
    fb = extract_features(net, images_b, batch_size)
    return {"fd_patch": frechet_distance(fa, fb), "kd_patch": kernel_distance(fa, fb)}


# ------------------------------------------------------------------------------------------------------------ sanity
def sanity_table(net: PatchFeatureNet, split=SPLIT_FILE, count: int = 256) -> dict:
    """FD-patch / KD-patch between ``count`` TEST crops (seed 1) and (i) other test crops (seed 2), (ii) the same
    crops bicubic 4x down/up, (iii) the same crops + Gaussian noise sigma 0.1, (iv) train crops (seed 1)."""
    split = split if isinstance(split, dict) else read_split(split)
    ref = crops01(split["test"], count, 1)
    rows = {
        "i_test_vs_other_test": (crops01(split["test"], count, 2), "test crops, seed 2"),
        "ii_test_vs_bicubic4x_blur": (bicubic_blur(ref, 4), "the same crops, bicubic 4x down + up"),
        "iii_test_vs_noise_0.1": (add_noise(ref, 0.1, torch.Generator().manual_seed(3)),
                                  "the same crops + Gaussian noise sigma 0.1 (seed 3), clamped"),
        "iv_test_vs_train": (crops01(split["train"], count, 1), "train crops, seed 1 (domain shift)"),
    }
    table = {}
    for key, (other, what) in rows.items():
        m = distribution_metrics(net, ref, other)
        table[key] = {"fd_patch": round(m["fd_patch"], 4), "kd_patch_x1000": round(1000 * m["kd_patch"], 4),
                      "against": what}
    i = table["i_test_vs_other_test"]
    ok = {f"{k}_gt_i_{name}": table[k][metric] > i[metric]
          for k in ("ii_test_vs_bicubic4x_blur", "iii_test_vs_noise_0.1")
          for name, metric in (("fd", "fd_patch"), ("kd", "kd_patch_x1000"))}
    return {"reference": f"{count} test crops (seed 1) of {split['test']}", "count": count, "rows": table,
            "ordering_holds": ok, "all_ok": all(ok.values()),
            "note": "FD-patch / KD-patch (NOT FID/KID): features of the project's PatchFeatureNet; FD-patch is "
                    "biased by N, compare only at equal N"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "featnet")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--split", type=Path, default=SPLIT_FILE)
    p.add_argument("--sanity_count", type=int, default=256, help="crops per set in the sanity table (0: skip)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    recipe = train_feature_net(args.out, steps=args.steps, seed=args.seed, threads=args.threads,
                               batch_size=args.batch_size, lr=args.lr, split=args.split,
                               progress=not args.no_progress)
    print(f"PatchFeatureNet: {recipe['param_count']:,} parameters, {recipe['weights_bytes'] / 1e6:.2f} MB, "
          f"{recipe['steps']} steps in {recipe['seconds']:.1f} s ({recipe['threads']} thread(s))")
    print("accuracy:", json.dumps(recipe["accuracy"]))
    result = {"recipe": recipe}
    if args.sanity_count:
        old = torch.get_num_threads()
        torch.set_num_threads(args.threads or old)
        try:
            sanity = sanity_table(load_feature_net(args.out / WEIGHTS_FILE), args.split, args.sanity_count)
        finally:
            torch.set_num_threads(old)
        (args.out / SANITY_FILE).write_text(json.dumps(sanity, indent=1) + "\n")
        print(f"\nsanity ({sanity['reference']}):")
        print(f"  {'row':28s} {'FD-patch':>10s} {'KD-patch x1000':>15s}")
        for key, row in sanity["rows"].items():
            print(f"  {key:28s} {row['fd_patch']:10.4f} {row['kd_patch_x1000']:15.4f}   vs {row['against']}")
        print("  ordering (i) < (ii), (i) < (iii):", "OK" if sanity["all_ok"] else f"FAILED {sanity['ordering_holds']}")
        result["sanity"] = sanity
    return result


if __name__ == "__main__":
    main()
