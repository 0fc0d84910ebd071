"""Caches: VAE latents (memory or disk, with invalidation), deterministic conditions, text-encoder outputs.

Latents (``--cache_latents``; ``--cache_latents_to_disk`` stores them beside the images as kohya does, as
``<image name>.codi-latents.safetensors``). The disk file holds the VAE posterior's mean and std (float32) and an
invalidation key: image file size + mtime, training size + crop mode + resize filter, flip, and the VAE identity
(architecture, dtype and a hash of the encoder weights). A file whose key differs is re-encoded; so changing one image
or one setting re-encodes only what it touches (``cache.encoded`` counts the images encoded this run,
``cache.loaded`` those read from disk). The latent itself is drawn at cache build time as
``(mean + std * noise) * scaling_factor`` with the per-item noise of ``trainer.loop.item_generator(seed, index)``,
exactly as the uncached path draws it; the seed is therefore not part of the disk key.

Random crops cannot be cached (each epoch has other pixels): that is an error, as in kohya. Flips are supported: both
the plain and the flipped image are encoded and the batch takes the one its flip decision picks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from trainer.data import ControlDataset, DataError, warn

CACHE_SUFFIX = ".codi-latents.safetensors"
CACHE_FORMAT = "1"


def latent_cache_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.name + CACHE_SUFFIX)


def vae_identity(base) -> str:
    """Architecture, dtype and a hash of the VAE encoder weights (what decides the latents of an image)."""
    vae = base.vae
    if vae is None:  # a pixel-space base: the latents are the pixels
        return f"{getattr(base, 'architecture', 'pixels')}-pixels-x{getattr(base, 'vae_scaling_factor', 1.0)}"
    state = vae.state_dict()
    names = [n for n in state if n.startswith(("encoder.", "quant_conv."))] or list(state)
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = state[name]
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    dtype = str(getattr(vae, "dtype", "")).replace("torch.", "")
    return f"{getattr(base, 'architecture', 'vae')}-{dtype}-{digest.hexdigest()[:16]}"


def invalidation_key(dataset: ControlDataset, index: int, vae_id: str, flips: bool) -> str:
    stat = dataset.items[index].image_path.stat()
    return (f"v{CACHE_FORMAT}|{stat.st_size}|{stat.st_mtime_ns}|{dataset.geometry_key(index)}|flip{int(flips)}|"
            f"{vae_id}")


@torch.no_grad()
def vae_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if vae is None:  # a pixel-space base: mean = the pixels, std = 0 (latent = pixels * scaling factor)
        return pixels.float().cpu(), torch.zeros_like(pixels, dtype=torch.float32, device="cpu")
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def sample_latent(mean: torch.Tensor, std: torch.Tensor, seed: int, index: int, scaling_factor: float):
    from trainer.loop import item_generator

    noise = torch.randn(mean.shape, generator=item_generator(seed, int(index)))
    return (mean + std * noise) * scaling_factor


class LatentCache:
    """Latents of every item (both flips when the item flips), computed before training."""

    def __init__(self, dataset: ControlDataset, base, args, device=None, accelerator=None, *, chunk: int = 4):
        random_crop = [item.image_path.name for item in dataset.items if item.random_crop]
        if random_crop:
            raise DataError(f"--random_crop cannot be combined with --cache_latents/--cache_latents_to_disk (each "
                            f"epoch crops other pixels; kohya refuses this too): {len(random_crop)} images with "
                            f"random_crop, e.g. {random_crop[0]}; drop one of the two")
        to_disk = bool(getattr(args, "cache_latents_to_disk", False))
        is_main = accelerator is None or accelerator.is_main_process
        seed, scaling = args.seed, base.vae_scaling_factor
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.encoded = self.loaded = 0
        vae_id = vae_identity(base) if to_disk else ""
        todo: dict[str, list[int]] = {}
        keys = {}
        for index, item in enumerate(dataset.items):
            views = (False, True) if item.flip_aug else (False,)
            if to_disk:
                keys[index] = invalidation_key(dataset, index, vae_id, item.flip_aug)
                moments = self._load(latent_cache_path(item.image_path), keys[index], views)
                if moments is not None:
                    for flip, (mean, std) in moments.items():
                        self.latents[(index, flip)] = sample_latent(mean, std, seed, index, scaling)
                    self.loaded += 1
                    continue
            todo.setdefault(dataset.geometry_key(index), []).append(index)
        unwritable = []
        for indices in todo.values():
            for start in range(0, len(indices), chunk):
                part = indices[start:start + chunk]
                flips_needed = any(dataset.items[i].flip_aug for i in part)
                results = {}
                for flip in ((False, True) if flips_needed else (False,)):
                    pixels = torch.stack([dataset.get(i, 0, condition=False, flip=flip)["pixel_values"]
                                          for i in part])
                    mean, std = vae_moments(base.vae, pixels)
                    results[flip] = (mean, std)
                for row, index in enumerate(part):
                    item = dataset.items[index]
                    views = (False, True) if item.flip_aug else (False,)
                    tensors = {}
                    for flip in views:
                        mean, std = results[flip][0][row], results[flip][1][row]
                        self.latents[(index, flip)] = sample_latent(mean, std, seed, index, scaling)
                        suffix = "_flipped" if flip else ""
                        tensors[f"mean{suffix}"], tensors[f"std{suffix}"] = mean.contiguous(), std.contiguous()
                    self.encoded += 1
                    if to_disk and is_main and not self._save(latent_cache_path(item.image_path), tensors,
                                                              keys[index]):
                        unwritable.append(item.image_path.name)
        if unwritable:
            warn(f"could not write the latent cache beside {len(unwritable)} images (read-only folder?), e.g. "
                 f"{unwritable[0]}; they are cached in memory only")

    @staticmethod
    def _load(path: Path, key: str, views) -> dict | None:
        if not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                if (fh.metadata() or {}).get("codi_cache_key") != key:
                    return None
                out = {}
                for flip in views:
                    suffix = "_flipped" if flip else ""
                    out[flip] = (fh.get_tensor(f"mean{suffix}"), fh.get_tensor(f"std{suffix}"))
                return out
        except Exception:  # a truncated or foreign file: re-encode it
            return None

    @staticmethod
    def _save(path: Path, tensors: dict, key: str) -> bool:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"codi_cache_key": key, "format": CACHE_FORMAT})
            os.replace(tmp, path)
            return True
        except OSError:
            tmp.unlink(missing_ok=True)
            return False

    def get(self, indices, flips=None) -> torch.Tensor:
        flips = [False] * len(indices) if flips is None else flips
        return torch.stack([self.latents[(int(i), bool(f))] for i, f in zip(indices, flips)])


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


class TextCache:
    """Text-encoder outputs per unique caption (``--cache_text_encoder_outputs``), computed once; ``encoded``
    counts the captions encoded."""

    def __init__(self, base, captions, device):
        self.outputs = {}
        self.encoded = 0
        for caption in sorted(set(captions) | {""}):
            self.outputs[caption] = move_tree(base.encode_text([caption], device=device), "cpu")
            self.encoded += 1

    def get(self, captions, device):
        return move_tree(cat_tree([self.outputs[c] for c in captions]), device)


def move_tree(tree, device):
    """Tensors in a (nested) dict moved to ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: move_tree(v, device) for k, v in tree.items()}
    return tree


def cat_tree(trees):
    """Concatenate same-structured (nested) dicts of tensors along the batch axis."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(trees)
    return {k: cat_tree([t[k] for t in trees]) for k in first}
