"""Training data: items (target image, condition, caption), geometry (crops, buckets, flips) and batching.

Sources, all producing the same :class:`ImageItem` list and the same sample dicts:

- a folder of images (``--train_data_dir``) with captions beside them (``<stem><caption_extension>``, kohya default
  ``.caption``; ``.txt``/``.caption`` are also read) and a **generated** condition (``--task sr|inpaint|canny|gray|
  blur|jpeg``, computed on the fly from the *cropped* target by ``trainer.data.conditions.make_condition_builder``);
- **paired** folders (``--conditioning_data_dir``: condition images with the target's basename, any image extension);
- a kohya dataset TOML (``--dataset_config``, see :mod:`trainer.data.spec`), several datasets included.

Geometry: the target is resized (Lanczos) to cover its training size, then center-cropped (default) or randomly
cropped (``--random_crop``). The training size is ``--resolution``, or with ``--enable_bucket`` the kohya bucket with
the nearest aspect ratio (bucket list from the resolution's area, ``--min_bucket_reso``/``--max_bucket_reso``,
``--bucket_reso_steps``). A paired condition image is resized to the target's size first (it may differ in size, not
in aspect ratio: more than 1% is an error) and gets the same crop; a generated condition is computed from the cropped
target; a flip (``--flip_aug``) hits target, condition and mask together. Images smaller than their training size are
upscaled, with one warning giving their count.

Determinism: crop offsets, flips and the generated condition's random parameters are a pure function of
``(seed, epoch, index)`` and batches of ``(seed, epoch)``, so a resumed run sees exactly the data of an uninterrupted
one. Validation samples are fixed: center crop, no flip, condition parameters from ``(validation_seed, index)``.

Sample dict: ``{"pixel_values": [3,H,W] in [-1,1], "hint": [3,H,W] float (range per builder; paired: [0,1]),
"caption": str, "index": int, "flip": bool, "size_cond": [6]}`` plus ``"mask": [1,H,W]`` when the condition builder
gives one. ``size_cond`` is SDXL's size conditioning as kohya computes it: the original image's height and width, the
crop's top-left corner in the resized image (mirrored with a flip) and the trained height and width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.data.conditions import make_condition_builder
from trainer.data.errors import DataError, warn
from trainer.data.images import (IMAGE_EXTENSIONS, cover_size, image_size, images_in, load_condition_image,
                                 load_rgb, read_caption, to_tensor01, verify_image)
from trainer.data.spec import DatasetSpec, DataSettings, SubsetSpec, load_dataset_config, specs_from_settings

ASPECT_TOLERANCE = 0.01  # condition vs target aspect ratio


@dataclass(frozen=True)
class ImageItem:
    image_path: Path
    condition_path: Path | None
    caption: str
    condition: str = "paired"            # "paired" or a generated condition (sr, inpaint, canny, gray, blur, jpeg)
    condition_options: tuple = ()        # sorted (key, value) pairs for make_condition_builder
    num_repeats: int = 1
    flip_aug: bool = False
    random_crop: bool = False
    dataset: int = 0                     # which [[datasets]] block: batches never mix datasets
    size: tuple | None = field(default=None, compare=False)  # (width, height) of the image file


def _shown(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _options_tuple(options: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def collect_items(subset: SubsetSpec, dataset: int = 0, skip_missing: bool = False) -> list[ImageItem]:
    """The items of one subset: every image in ``image_dir`` with its caption and condition (checked here: missing
    condition images, unreadable files and aspect-ratio mismatches are errors naming the files)."""
    image_dir = subset.image_dir
    label = subset.name if subset.name.startswith("--") else f"image_dir of {subset.name}"
    if not image_dir.is_dir():
        raise DataError(f"{label}: {image_dir} is not a folder")
    images = images_in(image_dir)
    if not images:
        raise DataError(f"{label}: {image_dir} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    by_stem: dict[str, Path] = {}
    if subset.condition == "paired":
        cond_dir = subset.conditioning_data_dir
        if cond_dir is None:
            raise DataError("give the condition images with --conditioning_data_dir (same basenames as the targets)")
        if not cond_dir.is_dir():
            raise DataError(f"conditioning_data_dir {cond_dir} is not a folder")
        duplicates = []
        for p in images_in(cond_dir):
            if p.stem in by_stem:
                duplicates.append(f"{by_stem[p.stem].name}/{p.name}")
            by_stem[p.stem] = p
        if duplicates:
            raise DataError(f"{cond_dir}: several condition images share a basename: {_shown(duplicates)}")
        missing = [p.name for p in images if p.stem not in by_stem]
        if missing and not skip_missing:
            raise DataError(f"{len(missing)} of {len(images)} images have no condition image in {cond_dir}: "
                            f"{_shown(missing)} (add them, or pass --skip_missing to train without these images)")
        if missing:
            warn(f"--skip_missing: skipped {len(missing)} of {len(images)} images in {image_dir} without a condition "
                 f"image in {cond_dir}: {_shown(missing)}")
            images = [p for p in images if p.stem in by_stem]
            if not images:
                raise DataError(f"no image in {image_dir} has a condition image in {cond_dir}")
    options = _options_tuple(subset.condition_options)
    items, mismatched = [], []
    for path in images:
        size = image_size(path)
        verify_image(path)  # decode it all now: a truncated file stops the run here, not at step 10
        cond = by_stem.get(path.stem)
        if cond is not None:
            verify_image(cond)
            cw, ch = image_size(cond)
            target_ar, cond_ar = size[0] / size[1], cw / ch
            if abs(cond_ar - target_ar) > ASPECT_TOLERANCE * target_ar:
                mismatched.append(f"{path.name} {size[0]}x{size[1]} vs {cond.name} {cw}x{ch}")
        items.append(ImageItem(path, cond, read_caption(path, subset.caption_extension, subset.default_caption),
                               subset.condition, options, subset.num_repeats, subset.flip_aug, subset.random_crop,
                               dataset, size))
    if mismatched:
        raise DataError(f"{len(mismatched)} condition images have another aspect ratio than their target (more than "
                        f"{ASPECT_TOLERANCE:.0%}; sizes may differ, shapes may not): {_shown(mismatched)}")
    return items


def collect_paired_items(train_data_dir, conditioning_data_dir, caption_extension: str = ".caption",
                         default_caption: str = "", skip_missing: bool = False) -> list[ImageItem]:
    """Pair every image in ``train_data_dir`` with the condition image of the same basename (any image extension)."""
    if not Path(train_data_dir).is_dir():
        raise DataError(f"--train_data_dir {train_data_dir} is not a folder")
    subset = SubsetSpec(Path(train_data_dir), Path(conditioning_data_dir) if conditioning_data_dir else None,
                        "paired", caption_extension=caption_extension, default_caption=default_caption)
    return collect_items(subset, skip_missing=skip_missing)


# ------------------------------------------------------------------------------------------------------ geometry


def make_bucket_resolutions(resolution, min_size: int, max_size: int, divisible: int) -> list[tuple[int, int]]:
    """kohya's bucket list: sizes ``(w, h)``, multiples of ``divisible``, with area up to the resolution's."""
    max_area = resolution[0] * resolution[1]
    resos = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def bucket_list(spec: DatasetSpec) -> list[tuple[int, int]]:
    steps = int(spec.bucket_reso_steps or 64)
    if steps % 8:
        raise DataError(f"bucket_reso_steps must be a multiple of 8 (the VAE's factor), got {steps}")
    low = spec.min_bucket_reso or min(256, min(spec.resolution) // steps * steps)
    high = spec.max_bucket_reso or max(1024, max(spec.resolution))
    if low % steps or high % steps:
        raise DataError(f"min_bucket_reso ({low}) and max_bucket_reso ({high}) must be multiples of "
                        f"bucket_reso_steps ({steps})")
    if not steps <= low <= min(spec.resolution) or high < max(spec.resolution):
        raise DataError(f"buckets need bucket_reso_steps <= min_bucket_reso <= the resolution's smaller side <= its "
                        f"larger side <= max_bucket_reso; got steps {steps}, min {low}, max {high}, resolution "
                        f"{spec.resolution[0]}x{spec.resolution[1]}")
    return make_bucket_resolutions(spec.resolution, low, high, steps)


def select_bucket(size, buckets) -> tuple[int, int]:
    """The bucket with the nearest aspect ratio (kohya)."""
    aspect = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one random decision (stream 0: crop, 1: flip, 2: condition) of item ``index`` in ``epoch``:
    a pure function of its arguments."""
    return np.random.default_rng([int(seed) % 2**63, int(epoch) % 2**63, int(index), int(stream)])


# ------------------------------------------------------------------------------------------------------ dataset


class ConditionCache:
    """Generated conditions that do not change between epochs (deterministic builders at a fixed crop), kept in
    memory after their first computation (before any flip). ``computed`` counts the stores."""

    def __init__(self):
        self.entries: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.computed = 0

    def lookup(self, index: int):
        entry = self.entries.get(index)
        if entry is None:
            return None
        return tuple(None if a is None else (a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a)
                     for a in entry)

    def store(self, index: int, hint, mask) -> None:
        self.entries[index] = (_compact(hint), None if mask is None else _compact(mask))
        self.computed += 1


def _compact(array) -> np.ndarray:
    """uint8 when the values are exactly k/255 (gray, canny, masks: 4x less memory), else float32."""
    array = np.asarray(array, dtype=np.float32)
    if array.min(initial=0.0) >= 0.0 and array.max(initial=0.0) <= 1.0:
        packed = np.round(array * 255.0).astype(np.uint8)
        if np.array_equal(packed.astype(np.float32) / 255.0, array):
            return packed
    return array.copy()



class ControlDataset(torch.utils.data.Dataset):
    """Loads items as sample dicts (see the module docstring). ``dataset[i]`` uses the epoch set by
    :meth:`set_epoch`; :meth:`get` takes it explicitly.

    ``specs`` gives each item's dataset settings (resolution, buckets, batch size) by ``item.dataset``; without it,
    every item is trained at ``resolution``. ``builder_factory(task, **options)`` makes the generated-condition
    builders (default: ``trainer.data.conditions.make_condition_builder``). ``condition_cache`` (a
    :class:`ConditionCache`) keeps deterministic conditions after their first computation.
    """

    def __init__(self, items: list[ImageItem], resolution: tuple[int, int], flip_aug: bool | None = None,
                 seed: int = 0, *, specs: list[DatasetSpec] | None = None, builder_factory=None,
                 validation: bool = False, validation_seed: int | None = None, condition_cache=None):
        if not items:
            raise DataError("the dataset is empty")
        if flip_aug is not None:  # legacy: one flip setting for all items
            items = [replace(item, flip_aug=flip_aug) for item in items]
        self.items, self.resolution, self.seed = list(items), tuple(resolution), seed
        # batch_size 0: the caller's (EpochBatches.from_dataset's batch_size)
        self.specs = specs or [DatasetSpec(resolution=tuple(resolution), batch_size=0, subsets=[])]
        self.validation = validation
        self.validation_seed = seed if validation_seed is None else validation_seed
        self.builder_factory = builder_factory
        self.condition_cache = condition_cache
        self._builders: dict = {}
        self.epoch = 0
        self.sizes = [item.size or image_size(item.image_path) for item in self.items]
        self.geometry = self._assign_geometry()
        for item in self.items:  # make the builders now: bad condition options fail before training starts
            if item.condition != "paired":
                self.builder(item)

    # -- geometry
    def _assign_geometry(self) -> list[tuple[int, int]]:
        buckets = {d: bucket_list(spec) for d, spec in enumerate(self.specs) if spec.enable_bucket}
        geometry, small = [], []
        for item, size in zip(self.items, self.sizes):
            spec = self.specs[item.dataset]
            train_size = select_bucket(size, buckets[item.dataset]) if spec.enable_bucket else tuple(spec.resolution)
            geometry.append(train_size)
            if max(train_size[0] / size[0], train_size[1] / size[1]) > 1:  # covering it needs an upscale
                small.append(f"{item.image_path.name} ({size[0]}x{size[1]} < {train_size[0]}x{train_size[1]})")
        if small:
            warn(f"{len(small)} of {len(self.items)} {'validation ' if self.validation else ''}images are smaller "
                 f"than their training size and are upscaled (blurrier targets): {', '.join(small[:5])}"
                 f"{' ...' if len(small) > 5 else ''}")
        return geometry

    def group(self, index: int) -> tuple[int, int, int]:
        """Batches hold one group only: ``(dataset, width, height)``."""
        return (self.items[index].dataset, *self.geometry[index])

    def batch_size_of(self, index: int) -> int:
        return self.specs[self.items[index].dataset].batch_size

    def geometry_key(self, index: int) -> str:
        """Everything about an item's pixels except the file: for cache invalidation."""
        w, h = self.geometry[index]
        return f"{w}x{h}-{'random' if self.items[index].random_crop and not self.validation else 'center'}-lanczos"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    # -- random decisions
    def flips(self, index: int, epoch: int | None = None) -> bool:
        item = self.items[index]
        if self.validation or not item.flip_aug:
            return False
        epoch = self.epoch if epoch is None else epoch
        return bool(sample_rng(self.seed, epoch, index, 1).random() < 0.5)

    def _crop_box(self, index, epoch, covered) -> tuple[int, int, int, int]:
        w, h = self.geometry[index]
        free_x, free_y = covered[0] - w, covered[1] - h
        if self.items[index].random_crop and not self.validation:
            rng = sample_rng(self.seed, epoch, index, 0)
            left, top = int(rng.integers(0, free_x + 1)), int(rng.integers(0, free_y + 1))
        else:
            left, top = free_x // 2, free_y // 2
        return left, top, left + w, top + h

    def condition_rng(self, index: int, epoch: int) -> np.random.Generator:
        if self.validation:
            return np.random.default_rng([int(self.validation_seed) % 2**63, int(index), 2, 7])
        return sample_rng(self.seed, epoch, index, 2)

    def builder(self, item: ImageItem):
        key = (item.condition, item.condition_options)
        if key not in self._builders:
            factory = self.builder_factory or make_condition_builder
            try:
                self._builders[key] = factory(item.condition, **dict(item.condition_options))
            except (TypeError, ValueError) as exc:
                raise DataError(f"condition {item.condition!r} (images in {item.image_path.parent}): {exc}") from None
        return self._builders[key]

    def condition_is_fixed(self, index: int) -> bool:
        """The condition does not change between epochs (cacheable)."""
        item = self.items[index]
        if item.condition == "paired":
            return False  # the condition file is its own cache
        return (self.validation or (not item.random_crop and bool(getattr(self.builder(item), "is_deterministic",
                                                                          False))))

    # -- loading
    def get(self, index: int, epoch: int | None = None, *, pixels: bool = True, condition: bool = True,
            flip: bool | None = None) -> dict:
        """One sample. ``pixels=False`` leaves out ``pixel_values`` (cached latents), ``condition=False`` the hint;
        ``flip`` overrides the flip decision (latent caching encodes both)."""
        item = self.items[index]
        epoch = self.epoch if epoch is None else epoch
        covered = cover_size(self.sizes[index], self.geometry[index])
        box = self._crop_box(index, epoch, covered)
        flipped = self.flips(index, epoch) if flip is None else flip
        left = covered[0] - box[2] if flipped else box[0]  # the crop's left edge in the image the model sees
        width, height = self.sizes[index]
        sample = {"caption": item.caption, "index": index, "flip": flipped,
                  # SDXL's size conditioning, as kohya computes it: (original h, w, crop top, left, target h, w)
                  "size_cond": torch.tensor([height, width, box[1], left, box[3] - box[1], box[2] - box[0]])}
        target = None
        generated = condition and item.condition != "paired"
        cached = None
        if condition and self.condition_cache is not None and self.condition_is_fixed(index):
            cached = self.condition_cache.lookup(index)
        if pixels or (generated and cached is None):
            target = np.array(load_rgb(item.image_path).resize(covered, Image.LANCZOS).crop(box))
        if pixels:
            array = target[:, ::-1] if flipped else target
            sample["pixel_values"] = to_tensor01(array) * 2.0 - 1.0
        if not condition:
            return sample
        if cached is None:
            if item.condition == "paired":
                hint, mask = load_condition_image(item.condition_path, covered, box), None
            else:
                result = self.builder(item)(target, self.condition_rng(index, epoch))
                hint, mask = _as_hint(result.hint, item), result.mask
            if self.condition_cache is not None and self.condition_is_fixed(index):
                self.condition_cache.store(index, hint, mask)
        else:
            hint, mask = cached
        if flipped:
            hint = hint[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        sample["hint"] = torch.from_numpy(np.ascontiguousarray(hint, dtype=np.float32)).permute(2, 0, 1).contiguous()
        if mask is not None:
            sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).unsqueeze(0)
        return sample

    def summary(self) -> str:
        groups: dict = {}
        for i in range(len(self)):
            groups[self.group(i)] = groups.get(self.group(i), 0) + 1
        kinds = sorted({item.condition for item in self.items})
        repeats = sum(item.num_repeats for item in self.items)
        sizes = ", ".join(f"{w}x{h}: {n}" for (_, w, h), n in sorted(groups.items()))
        return (f"{'validation' if self.validation else 'training'} data: {len(self)} images ({repeats} with repeats), "
                f"condition {', '.join(kinds)}, {len(self.specs)} dataset(s); sizes {sizes}")


def _as_hint(hint, item: ImageItem) -> np.ndarray:
    hint = np.asarray(hint, dtype=np.float32)
    if hint.ndim == 2:
        hint = np.repeat(hint[..., None], 3, axis=2)
    if hint.ndim != 3 or hint.shape[2] != 3:
        raise DataError(f"condition builder {item.condition!r} returned a hint of shape {hint.shape} for "
                        f"{item.image_path.name}; expected HxWx3")
    return hint


def collate(samples: list[dict]) -> dict:
    batch = {"caption": [s["caption"] for s in samples], "index": torch.tensor([s["index"] for s in samples]),
             "flip": [bool(s.get("flip", False)) for s in samples]}
    for key in ("pixel_values", "hint", "mask", "size_cond"):
        present = [key in s for s in samples]
        if all(present):
            batch[key] = torch.stack([s[key] for s in samples])
        elif any(present):
            raise DataError(f"a batch mixes samples with and without {key!r} (mixed condition kinds in one batch)")
    return batch


# ------------------------------------------------------------------------------------------------------ batches


class EpochBatches:
    """Deterministic batches of item indices, one group (dataset + bucket size) per batch.

    Each item appears ``num_repeats`` times per epoch. Epoch ``e`` draws, from a generator seeded with ``seed + e``,
    a permutation of each group's entries (groups in sorted order), cuts it into global batches of
    ``batch_size * world_size`` (a group's incomplete tail is left out this epoch; another permutation next epoch),
    then, with several groups, a permutation of the batches. Rank ``r`` takes every ``world_size``-th index of the
    global batch. Position ``(epoch, batch)`` fully determines the data, so resuming needs only those two numbers.
    With one group this is exactly a permutation of all entries cut into batches.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 repeats: int = 1, *, groups=None, group_batch_sizes: dict | None = None, item_repeats=None,
                 describe=None):
        self.seed, self.world_size, self.rank, self.batch_size = seed, world_size, rank, batch_size
        self.base_items = num_items
        item_repeats = [repeats] * num_items if item_repeats is None else [int(r) * repeats for r in item_repeats]
        groups = [0] * num_items if groups is None else list(groups)
        self.group_batch_sizes = group_batch_sizes or {}
        # entries in repeat rounds: with equal repeats entry e is item e % num_items (the original layout)
        entries: dict = {}
        for round_ in range(max(item_repeats, default=0)):
            for index in range(num_items):
                if item_repeats[index] > round_:
                    entries.setdefault(groups[index], []).append(index)
        self.entries = {key: entries[key] for key in sorted(entries)}
        self.num_items = sum(len(v) for v in self.entries.values())
        self.global_batch = batch_size * world_size
        self._cache: tuple[int, list] | None = None
        starved = {key: len(v) for key, v in self.entries.items() if len(v) < self._global(key)}
        if len(self) == 0:
            raise DataError(f"{num_items} images ({self.num_items} with repeats) give no full batch of "
                            f"{batch_size} x {world_size} processes"
                            + (f" in any bucket ({self._describe(starved, describe)})" if len(self.entries) > 1
                               else "") + "; lower --train_batch_size or add images")
        if starved:
            warn(f"{sum(starved.values())} image entries in buckets smaller than one batch are never trained: "
                 f"{self._describe(starved, describe)}; lower the batch size, add images or change the buckets")

    @staticmethod
    def _describe(counts: dict, describe) -> str:
        return ", ".join(f"{describe(k) if describe else k}: {n}" for k, n in counts.items())

    @classmethod
    def from_dataset(cls, dataset: ControlDataset, batch_size: int, seed: int, world_size: int = 1, rank: int = 0):
        """Bucket- and dataset-aware batches; a dataset's own ``batch_size`` (dataset TOML) overrides
        ``batch_size``; per-item repeats come from the items (``num_repeats`` / ``--dataset_repeats``)."""
        groups = [dataset.group(i) for i in range(len(dataset))]
        sizes = {g: dataset.specs[g[0]].batch_size or batch_size for g in groups}
        return cls(len(dataset), batch_size, seed, world_size, rank, groups=groups, group_batch_sizes=sizes,
                   item_repeats=[item.num_repeats for item in dataset.items],
                   describe=lambda g: f"dataset {g[0] + 1} {g[1]}x{g[2]}")

    def _global(self, key) -> int:
        return self.group_batch_sizes.get(key, self.batch_size) * self.world_size

    def __len__(self) -> int:
        """Batches per epoch (incomplete tails are left out so every process gets the same batch size)."""
        return sum(len(v) // self._global(k) for k, v in self.entries.items())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches = []
        for key, entries in self.entries.items():
            order = torch.randperm(len(entries), generator=generator).tolist()
            size = self._global(key)
            for start in range(0, len(order) - size + 1, size):
                batches.append([entries[o] for o in order[start:start + size]])
        if len(self.entries) > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._cache = (epoch, batches)
        return batches

    def batch(self, epoch: int, position: int) -> list[int]:
        return self.epoch_batches(epoch)[position][self.rank::self.world_size]


# ------------------------------------------------------------------------------------------------------ building


def dataset_specs(settings: DataSettings, resolution) -> list[DatasetSpec]:
    if settings.dataset_config:
        return load_dataset_config(settings.dataset_config, settings, resolution)
    return specs_from_settings(settings, resolution)


def split_validation(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """Hold out ``fraction`` of the *images* (never the same image file in both), chosen by ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation_split must be in (0, 1), got {fraction}")
    paths = sorted({str(item.image_path.resolve()) for item in items})
    count = max(1, round(fraction * len(paths)))
    if count >= len(paths):
        raise DataError(f"validation_split {fraction} of {len(paths)} images leaves no training image")
    order = np.random.default_rng([int(seed) % 2**63, 0x5A11]).permutation(len(paths))
    held = {paths[i] for i in order[:count]}
    train = [item for item in items if str(item.image_path.resolve()) not in held]
    val, seen = [], set()
    for item in items:  # one validation item per image, even when several subsets list it
        key = str(item.image_path.resolve())
        if key in held and key not in seen:
            seen.add(key)
            val.append(replace(item, num_repeats=1))
    return train, val


def build_datasets(settings: DataSettings, resolution, *,
                   builder_factory=None) -> tuple[ControlDataset, ControlDataset | None]:
    """``(training dataset, validation dataset or None)`` from the flags (``--train_data_dir`` ...) or the dataset
    TOML (``--dataset_config``); ``resolution`` is the fallback when neither gives one (the model's default).

    Validation: ``--validation_split F`` (or ``validation_split`` in the TOML, per dataset) holds out a fraction of
    the images chosen by ``--validation_seed`` (default ``--seed``); ``--validation_data_dir`` (with
    ``--validation_conditioning_data_dir`` for paired conditions) gives separate images with the training task.
    """
    specs = dataset_specs(settings, resolution)
    skip_missing = settings.skip_missing
    items = []
    for d, spec in enumerate(specs):
        for subset in spec.subsets:
            items += collect_items(subset, d, skip_missing)
    validation_dir = settings.validation_data_dir
    split_specs = [spec for spec in specs if spec.validation_split]
    if validation_dir and split_specs:
        raise DataError("give either --validation_split or --validation_data_dir, not both")
    val_items: list[ImageItem] = []
    seed = settings.seed
    for d, spec in enumerate(specs):
        if spec.validation_split:
            v_seed = seed if spec.validation_seed is None else spec.validation_seed
            mine = [item for item in items if item.dataset == d]
            kept, held = split_validation(mine, float(spec.validation_split), v_seed)
            items = [item for item in items if item.dataset != d] + kept
            val_items += held
    items.sort(key=lambda item: item.dataset)  # stable: keeps folder order within a dataset
    if validation_dir:
        first = specs[0].subsets[0]
        cond_dir = settings.validation_conditioning_data_dir
        if first.condition == "paired" and not cond_dir:
            raise DataError("--validation_data_dir with paired condition images needs "
                            "--validation_conditioning_data_dir (same basenames)")
        subset = replace(first, image_dir=Path(validation_dir), conditioning_data_dir=Path(cond_dir) if cond_dir
                         else None, num_repeats=1, name="--validation_data_dir")
        val_items = collect_items(subset, 0, skip_missing)
    train = ControlDataset(items, specs[0].resolution, seed=seed, specs=specs, builder_factory=builder_factory,
                           condition_cache=ConditionCache() if settings.cache_conditions else None)
    validation = None
    if val_items:
        v_seed = settings.validation_seed
        validation = ControlDataset(val_items, specs[0].resolution, seed=seed, specs=specs,
                                    builder_factory=builder_factory, validation=True,
                                    validation_seed=seed if v_seed is None else v_seed,
                                    condition_cache=ConditionCache())
    return train, validation
