"""Condition builders (trainer/conditions.py) and the shared hint functions (ccd_sampler/hints.py) on real photos.

Photos: scikit-image's bundled astronaut, chelsea and coffee, centre-cropped and resized (INTER_AREA) to 256x256 (the
``sr`` bands) or 128x128 (everything else, to stay fast).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ccd_sampler import hints
from trainer.data import conditions as C

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee")


def _photo(name: str, size: int) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    h, w = image.shape[:2]
    side = min(h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return cv2.resize(image[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def photos256() -> dict[str, np.ndarray]:
    return {name: _photo(name, 256) for name in PHOTOS}


@pytest.fixture(scope="module")
def photos128() -> dict[str, np.ndarray]:
    return {name: _photo(name, 128) for name in PHOTOS}


@pytest.fixture(scope="module")
def target(photos128) -> np.ndarray:
    """A non-square crop (96 rows x 128 columns) so height/width mix-ups show."""
    return np.ascontiguousarray(photos128["astronaut"][16:112])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def edge_f1(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel-exact F1 of two boolean edge maps."""
    tp = np.logical_and(a, b).sum()
    return float(2 * tp / (a.sum() + b.sum()))


def cv2_canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """The OpenCV pipeline canny_hint documents: grey, 5x5 sigma-1 Gaussian, cv2.Canny (L1 gradient)."""
    gray = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (5, 5), 1.0)
    return cv2.Canny(gray, low, high) > 0


def build(task: str, target: np.ndarray, seed: int = 0, **options) -> C.Condition:
    builder = C.make_condition_builder(task, **options)
    if task == "paired":
        return builder(target, np.random.default_rng(seed), condition=_paired_condition(target))
    return builder(target, np.random.default_rng(seed))


def _paired_condition(target: np.ndarray) -> np.ndarray:
    """A stand-in for a user's depth map: a grey vertical ramp (uint8, HxW)."""
    return np.repeat(np.linspace(0, 255, target.shape[0]).astype(np.uint8)[:, None], target.shape[1], axis=1)


# ------------------------------------------------------------------------------------------- every builder

RANDOM_TASKS = ("sr", "inpaint", "blur", "jpeg")
DETERMINISTIC_TASKS = ("canny", "gray", "paired")


def test_registry_lists_every_task():
    assert set(C.TASKS) == {"sr", "inpaint", "canny", "gray", "blur", "jpeg", "paired"}
    for task in C.TASKS:
        assert C.is_deterministic(task) == (task in DETERMINISTIC_TASKS)
        assert C.make_condition_builder(task).is_deterministic == C.is_deterministic(task)


@pytest.mark.parametrize("task", C.TASKS)
def test_shapes_dtypes_and_ranges(task, target):
    cond = build(task, target)
    h, w = target.shape[:2]
    assert cond.hint.shape == (h, w, 3) and cond.hint.dtype == np.float32
    assert np.isfinite(cond.hint).all()
    lo, hi, _ = hints.HINT_RANGES[task]
    assert cond.hint.min() >= lo and cond.hint.max() <= hi
    if task == "inpaint":
        assert cond.mask.shape == (h, w) and cond.mask.dtype == np.float32
        assert set(np.unique(cond.mask)) == {0.0, 1.0}
        assert set(np.unique(cond.hint[cond.hint < 0])) == {-1.0}
    else:
        assert cond.mask is None
        assert cond.hint.min() >= 0.0
    if task == "canny":
        assert set(np.unique(cond.hint)) == {0.0, 1.0}
    if task in ("canny", "gray", "paired"):  # single-channel information on 3 equal channels
        assert np.array_equal(cond.hint[..., 0], cond.hint[..., 1])
        assert np.array_equal(cond.hint[..., 0], cond.hint[..., 2])
    # options are JSON-serialisable (cache keys) and name the task
    assert json.loads(json.dumps(C.make_condition_builder(task).options()))["task"] == task
    assert C.make_condition_builder(task).hint_preprocessing()["type"] == task


@pytest.mark.parametrize("task", C.TASKS)
def test_determinism_for_a_seed(task, target):
    first, again, other = build(task, target, 7), build(task, target, 7), build(task, target, 8)
    assert np.array_equal(first.hint, again.hint)
    if task == "inpaint":
        assert np.array_equal(first.mask, again.mask)
    if task in RANDOM_TASKS:
        assert not np.array_equal(first.hint, other.hint), f"{task}: seeds 7 and 8 gave the same hint"
    else:
        assert np.array_equal(first.hint, other.hint)


def test_deterministic_builders_need_no_rng(target):
    for task in ("canny", "gray"):
        builder = C.make_condition_builder(task)
        assert np.array_equal(builder(target, None).hint, builder(target, np.random.default_rng(3)).hint)


# ------------------------------------------------------------------------------------------------------ sr

# Scale 4, default chain, 256x256 photos: observed 21.0-28.9 dB (astronaut 21-22, coffee 24-25, chelsea 27-29).
SR4_BAND_DB = (19.0, 31.0)


def test_sr_hint_is_a_degraded_target(photos256):
    for name, target in photos256.items():
        truth = target / np.float32(255)
        # the clean baseline: area downscale, no blur/noise/JPEG, then the same bicubic upsampling
        clean = psnr(build("sr", target, blur_sigma=None, noise_sigma=None, jpeg_quality=None,
                           resize_kernels="area").hint, truth)
        for seed in range(4):
            value = psnr(build("sr", target, seed).hint, truth)
            assert SR4_BAND_DB[0] <= value <= SR4_BAND_DB[1], (name, seed, value)
            assert value < 40.0, "the sr hint must not be the target"
            # blur, noise and JPEG only lose information: at most a little above the clean baseline, not far below it
            assert clean - 4.0 <= value <= clean + 0.5, (name, seed, value, clean)


def test_sr_stronger_degradation_lowers_psnr(photos256):
    light = dict(blur_sigma=(0.1, 0.3), noise_sigma=(0.0, 1.0), jpeg_quality=(90, 95))
    strong = dict(blur_sigma=(2.0, 3.0), noise_sigma=(15.0, 20.0), jpeg_quality=(10, 20))
    for name, target in photos256.items():
        truth = target / np.float32(255)
        for seed in range(3):
            weak_db = psnr(build("sr", target, seed, **light).hint, truth)
            strong_db = psnr(build("sr", target, seed, **strong).hint, truth)
            assert strong_db < weak_db - 1.0, (name, seed, weak_db, strong_db)


def test_sr_larger_scale_lowers_psnr(photos256):
    for name, target in photos256.items():
        truth = target / np.float32(255)
        for seed in range(3):
            x2, x4, x8 = (psnr(build("sr", target, seed, scale=s).hint, truth) for s in (2, 4, 8))
            assert x2 > x4 > x8, (name, seed, x2, x4, x8)


def test_sr_low_res_and_hint_agree_with_the_node_path(photos128):
    target = photos128["coffee"]
    builder = C.make_condition_builder("sr", sr_scale=4)  # the dataset TOML's spelling
    assert builder.scale == 4
    low = builder.degrade_to_low_res(target, np.random.default_rng(5))
    assert low.shape == (32, 32, 3) and low.dtype == np.uint8
    assert np.array_equal(low, C.degrade_to_low_res(target, np.random.default_rng(5), scale=4))
    # what a ComfyUI node does with the low-res IMAGE [B, H, W, C] float
    node_image = torch.from_numpy(low).unsqueeze(0).float() / 255.0
    node_hint = hints.sr_hint(node_image.movedim(-1, 1), 4)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(builder(target, np.random.default_rng(5)).hint, node_hint)


def test_upscale_is_opencv_bicubic(photos128):
    low = cv2.resize(photos128["chelsea"], (40, 32), interpolation=cv2.INTER_AREA)
    ours = hints.upscale_to(C.image_to_tensor(low), (128, 160))
    reference = np.clip(cv2.resize(low.astype(np.float32) / 255, (160, 128), interpolation=cv2.INTER_CUBIC), 0, 1)
    assert np.abs(C.tensor_to_hint(ours) - reference).max() < 1e-5
    assert ours.shape == (1, 3, 128, 160)


# -------------------------------------------------------------------------------------------------- inpaint


@pytest.mark.parametrize("coverage", [(0.1, 0.6), (0.3, 0.4)])
def test_inpaint_coverage_stays_in_range(coverage):
    builder = C.make_condition_builder("inpaint", coverage=list(coverage))  # TOML gives lists
    covered = []
    for seed in range(60):
        mask = builder.make_mask((96, 128), np.random.default_rng(seed))
        covered.append(mask.mean())
        assert coverage[0] <= covered[-1] <= coverage[1], (seed, covered[-1])
    assert np.ptp(covered) > 0.3 * (coverage[1] - coverage[0]), "coverage should spread over the range"


def test_inpaint_hint_convention(photos128):
    target = photos128["chelsea"]
    truth = target / np.float32(255)
    for seed in range(5):
        cond = build("inpaint", target, seed)
        hole = cond.mask == 1
        assert hole.any() and (~hole).any()
        assert (cond.hint[hole] == hints.INPAINT_MASKED_VALUE).all()
        assert np.array_equal(cond.hint[~hole], truth[~hole])
        # the mask is recoverable from the hint alone
        assert np.array_equal(cond.hint[..., 0] < 0, hole)


def test_inpaint_hint_matches_the_node_path(photos128):
    target = photos128["astronaut"]
    cond = build("inpaint", target, 3)
    # ComfyUI: IMAGE [B, H, W, C] and MASK [B, H, W], a soft mask thresholded at 0.5
    image = torch.from_numpy(target).unsqueeze(0).float() / 255.0
    soft = torch.from_numpy(cond.mask).unsqueeze(0) * 0.8 + 0.1
    node_hint = hints.inpaint_hint(image.movedim(-1, 1), soft.unsqueeze(1))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(node_hint, cond.hint)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [labels == i for i in range(1, count)]


def test_inpaint_mask_kinds_look_like_their_names():
    shape = (96, 128)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        # box: one box is exactly a filled rectangle
        box = C.InpaintCondition(mask_kind="box", max_boxes=1).make_mask(shape, rng) > 0
        ys, xs = np.nonzero(box)
        assert box[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        # border: every band covers a whole image side (a full first/last row or column)
        border = C.InpaintCondition(mask_kind="border").make_mask(shape, rng) > 0
        assert any(edge.all() for edge in (border[0], border[-1], border[:, 0], border[:, -1]))
        for part in _components(border):
            assert part[0].any() or part[-1].any() or part[:, 0].any() or part[:, -1].any()
        assert not border[48, 64] or border.mean() > 0.45, "a border mask leaves the centre for last"
        # stroke: one stroke is one connected blob that is not a rectangle
        stroke = C.InpaintCondition(mask_kind="stroke", max_strokes=1).make_mask(shape, rng) > 0
        assert len(_components(stroke)) == 1
        ys, xs = np.nonzero(stroke)
        assert stroke[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() < 0.97


def test_inpaint_kind_probabilities():
    builder = C.make_condition_builder("inpaint", inpaint_box_prob=0.0, inpaint_stroke_prob=0.0, border_prob=1.0)
    for seed in range(5):
        mask = builder.make_mask((64, 64), np.random.default_rng(seed)) > 0
        assert any(edge.all() for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1]))
    mixed = C.make_condition_builder("inpaint")
    rect = 0
    for seed in range(40):
        mask = mixed.make_mask((64, 64), np.random.default_rng(seed)) > 0
        ys, xs = np.nonzero(mask)
        rect += mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    assert 0 < rect < 40, "the default mixture should give both rectangles and other shapes"


# ---------------------------------------------------------------------------------------------------- canny

# canny_hint reproduces OpenCV 5's integer pipeline; observed F1 = 1.000 (bit-identical) on all photos and thresholds.
CANNY_F1_MIN = 0.95


@pytest.mark.parametrize("low,high", [(100, 200), (50, 100), (150, 250)])
def test_canny_agrees_with_opencv(photos256, low, high):
    for name, target in photos256.items():
        ours = C.make_condition_builder("canny", canny_low=low, canny_high=high)(target).hint[..., 0] > 0.5
        f1 = edge_f1(ours, cv2_canny(target, low, high))
        assert f1 > CANNY_F1_MIN, (name, low, high, f1)


def test_canny_edges_are_thin_binary_and_fewer_for_higher_thresholds(photos128):
    for name, target in photos128.items():
        counts = []
        for low, high in [(50, 100), (100, 200), (150, 250)]:
            edges = C.make_condition_builder("canny", low_threshold=low, high_threshold=high)(target).hint[..., 0]
            assert set(np.unique(edges)) <= {0.0, 1.0}
            e = edges > 0.5
            counts.append(int(e.sum()))
            # thin: non-maximum suppression leaves (almost) no 2x2 block of edge pixels
            blocks = e[:-1, :-1] & e[1:, :-1] & e[:-1, 1:] & e[1:, 1:]
            assert blocks.sum() <= 0.02 * max(e.sum(), 1), (name, low, high)
        assert counts[0] > counts[1] > counts[2] > 0, (name, counts)


def test_canny_is_batched_and_dtype_independent(photos128):
    batch = torch.cat([C.image_to_tensor(photos128[n]) for n in PHOTOS])
    edges = hints.canny_hint(batch)
    for i, name in enumerate(PHOTOS):
        assert torch.equal(edges[i:i + 1], hints.canny_hint(C.image_to_tensor(photos128[name])))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        other = hints.canny_hint(batch.to(dtype))
        assert other.dtype == dtype and torch.equal(other.float(), edges)


# ------------------------------------------------------------------------------------------------- gray etc.


def test_gray_hint_is_bt601_luma(photos128):
    target = photos128["coffee"]
    hint = build("gray", target).hint[..., 0]
    reference = cv2.cvtColor(target, cv2.COLOR_RGB2GRAY) / 255.0
    assert np.abs(hint - reference).max() <= 0.51 / 255
    batch = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    gray = hints.gray_hint(batch)
    assert gray.dtype == torch.float64 and gray.shape == (2, 3, 8, 8)
    assert torch.allclose(gray[:, 0], 0.299 * batch[:, 0] + 0.587 * batch[:, 1] + 0.114 * batch[:, 2])


def test_blur_and_jpeg_degrade_more_for_stronger_settings(photos128):
    target = photos128["astronaut"]
    truth = target / np.float32(255)
    assert psnr(build("blur", target, sigma=3.0).hint, truth) < psnr(build("blur", target, sigma=0.8).hint, truth)
    assert psnr(build("jpeg", target, quality=10).hint, truth) < psnr(build("jpeg", target, quality=90).hint, truth)
    for task in ("blur", "jpeg"):
        assert psnr(build(task, target).hint, truth) < 40.0


def test_paired_returns_the_users_map(target):
    depth = _paired_condition(target)
    hint = build("paired", target).hint
    assert np.array_equal(hint[..., 1], depth / np.float32(255))
    depth16 = depth.astype(np.uint16) * 257
    assert np.allclose(C.PairedCondition()(target, condition=depth16).hint, hint, atol=1e-6)


def test_image_tensor_round_trip(target):
    tensor = C.image_to_tensor(target)
    assert tensor.shape == (1, 3, 96, 128) and tensor.dtype == torch.float32
    assert np.array_equal(C.tensor_to_hint(tensor), target / np.float32(255))


# ---------------------------------------------------------------------------------------------------- errors


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown condition task 'depthmap'.*sr, inpaint, canny, gray, blur, jpeg"):
        C.make_condition_builder("depthmap")
    with pytest.raises(ValueError, match="unknown option 'sr_sigma'.*valid: scale, blur_sigma"):
        C.make_condition_builder("sr", sr_sigma=2)
    with pytest.raises(ValueError, match="given twice"):
        C.make_condition_builder("sr", scale=2, sr_scale=4)


@pytest.mark.parametrize("scale", [1, 3, 16, 4.5, True])
def test_sr_scale_must_be_2_4_or_8(scale):
    with pytest.raises(ValueError, match="scale must be one of 2, 4, 8"):
        C.make_condition_builder("sr", scale=scale)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((64, 64), np.uint8), "HxWx3"),
    (np.zeros((64, 64, 4), np.uint8), "HxWx3"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((4, 64, 3), np.uint8), ">= 8 pixels"),
    ([[0, 0, 0]], "numpy array"),
])
def test_image_must_be_hxwx3_uint8(bad, match):
    for task in ("gray", "sr"):
        with pytest.raises((ValueError, TypeError), match=match):
            C.make_condition_builder(task)(bad, np.random.default_rng(0))


def test_image_too_small_or_not_divisible_for_the_scale():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too small for scale 8.*target >= 64"):
        C.make_condition_builder("sr", scale=8)(np.zeros((32, 32, 3), np.uint8), rng)
    with pytest.raises(ValueError, match="not divisible by scale 4"):
        C.make_condition_builder("sr", scale=4)(np.zeros((66, 64, 3), np.uint8), rng)


@pytest.mark.parametrize("low,high,match", [
    (-1, 200, "0..255"), (100, 256, "0..255"), (200, 100, "must not exceed"), (float("nan"), 100, "number"),
])
def test_canny_thresholds_out_of_range(low, high, match):
    with pytest.raises(ValueError, match=match):
        C.make_condition_builder("canny", low_threshold=low, high_threshold=high)
    with pytest.raises(ValueError, match=match):
        hints.canny_hint(torch.zeros(1, 3, 8, 8), low, high)


def test_other_clear_errors(target):
    with pytest.raises(TypeError, match="default_rng"):
        C.make_condition_builder("jpeg")(target, None)
    with pytest.raises(ValueError, match="use task 'paired'"):
        C.make_condition_builder("gray")(target, condition=target)
    with pytest.raises(ValueError, match="pass the condition image"):
        C.make_condition_builder("paired")(target)
    with pytest.raises(ValueError, match="differs from the target"):
        C.make_condition_builder("paired")(target, condition=target[:50])
    with pytest.raises(ValueError, match="coverage"):
        C.make_condition_builder("inpaint", coverage=(0.5, 0.4))
    with pytest.raises(ValueError, match="mask_kind"):
        C.make_condition_builder("inpaint", mask_kind="circle")
    with pytest.raises(ValueError, match="jpeg_quality"):
        C.make_condition_builder("sr", jpeg_quality=(0, 50))
    with pytest.raises(ValueError, match="resize_kernels"):
        C.make_condition_builder("sr", resize_kernels=("lanczos",))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        hints.gray_hint(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="only enlarges"):
        hints.upscale_to(torch.zeros(1, 3, 16, 16), (8, 8))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        hints.inpaint_hint(torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8))


# ------------------------------------------------------------------------------------------------- imports


def test_hints_import_neither_opencv_nor_pil():
    code = (
        "import sys, ccd_sampler.hints\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'cv2', 'PIL', 'kornia', 'scipy', 'skimage', "
        "'diffusers', 'transformers', 'comfy', 'trainer', 'nodes'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "ccd_sampler" / "hints.py").read_text()
    for name in ("import cv2", "from cv2", "import PIL", "from PIL", "import kornia", "import scipy"):
        assert name not in text, f"hints.py contains {name!r}"
