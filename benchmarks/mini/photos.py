"""The real photographs of the miniature reproduction: the images shipped inside scikit-image and scikit-learn.

Nothing is downloaded. Images are grouped (the two views of the motorcycle stereo pair are one group) and split into
train and test **by group** with a seeded permutation: test groups are drawn from the colour photos only; the greyscale
textures/photos (converted to RGB) only ever train. Every image is kept as a small pyramid (short side 128 and 256
pixels, Lanczos) from which 64x64 crops are taken, so a crop sees a useful amount of the scene whatever the original
size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# group -> [(name, loader)]; loaders return HxWx3 (or HxW) uint8 arrays
COLOR_GROUPS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry",
                "retina", "china", "flower")
GRAY_GROUPS = ("camera", "moon", "coins", "clock", "grass", "gravel", "brick")
PYRAMID_SHORT_SIDES = (128, 256)
NUM_TEST_GROUPS = 3


def _load_group(group: str) -> dict[str, np.ndarray]:
    from skimage import data

    if group == "motorcycle":
        left, right, _ = data.stereo_motorcycle()
        return {"motorcycle_left": left, "motorcycle_right": right}
    if group in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return {group: load_sample_image(f"{group}.jpg")}
    return {group: getattr(data, group)()}


def _rgb(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.dtype.kind == "f" else \
            array.astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def make_split(seed: int, num_test: int = NUM_TEST_GROUPS, grayscale: bool = True) -> dict:
    """``{"seed", "test_groups", "train": [image names], "test": [image names], ...}`` (by group, seeded)."""
    order = np.random.default_rng(seed).permutation(len(COLOR_GROUPS))
    test_groups = sorted(COLOR_GROUPS[i] for i in order[:num_test])
    train_groups = [g for g in COLOR_GROUPS if g not in test_groups] + (list(GRAY_GROUPS) if grayscale else [])
    names = lambda groups: [n for g in groups for n in _group_names(g)]  # noqa: E731
    return {"seed": seed, "rule": "seeded permutation of the colour groups; the first "
                                  f"{num_test} are test; greyscale groups always train",
            "test_groups": test_groups, "train_groups": train_groups,
            "train": names(train_groups), "test": names(test_groups),
            "pyramid_short_sides": list(PYRAMID_SHORT_SIDES)}


def _group_names(group: str) -> list[str]:
    return ["motorcycle_left", "motorcycle_right"] if group == "motorcycle" else [group]


def load_images(names) -> dict[str, list[np.ndarray]]:
    """``{name: [pyramid level arrays HxWx3 uint8]}`` for the image names of a split."""
    wanted = set(names)
    out = {}
    for group in (*COLOR_GROUPS, *GRAY_GROUPS):
        if not wanted.intersection(_group_names(group)):
            continue
        for name, array in _load_group(group).items():
            if name in wanted:
                img = _rgb(array)
                levels = []
                for short in PYRAMID_SHORT_SIDES:
                    scale = short / min(img.size)
                    size = (max(64, round(img.width * scale)), max(64, round(img.height * scale)))
                    levels.append(np.asarray(img.resize(size, Image.LANCZOS)))
                out[name] = levels
    missing = wanted - out.keys()
    if missing:
        raise ValueError(f"unknown photo names: {sorted(missing)}")
    return out


def random_crops(images: dict[str, list[np.ndarray]], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` crops ``[count, 3, size, size]`` float32 in [-1, 1]: uniform over images, then pyramid level,
    position and horizontal flip."""
    names = sorted(images)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for k in range(count):
        levels = images[names[rng.integers(len(names))]]
        level = levels[rng.integers(len(levels))]
        y = rng.integers(level.shape[0] - size + 1)
        x = rng.integers(level.shape[1] - size + 1)
        crop = level[y:y + size, x:x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[k] = crop.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    return out


def write_crops(names, out_dir, count: int, seed: int, size: int = 64) -> list:
    """Write ``count`` seeded random ``size``x``size`` crops of the named photos (see :func:`random_crops`) as PNGs
    ``00000.png, ...`` into ``out_dir``; returns the paths. A folder that already holds exactly these files (same
    count, a ``crops.json`` with the same names/seed/size) is left as it is, so reruns cost nothing."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    recipe = {"names": sorted(names), "count": count, "seed": seed, "size": size,
              "pyramid_short_sides": list(PYRAMID_SHORT_SIDES)}
    stamp = out / "crops.json"
    paths = [out / f"{k:05d}.png" for k in range(count)]
    if stamp.exists() and json.loads(stamp.read_text()) == recipe and all(p.exists() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    crops = random_crops(load_images(names), count, size, np.random.default_rng(seed))
    for path, crop in zip(paths, crops):
        pixels = ((crop.transpose(1, 2, 0) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
    stamp.write_text(json.dumps(recipe, indent=1))
    return paths
