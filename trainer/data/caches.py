"""Caches above the dataset: VAE latents (memory or disk, with invalidation) and text-encoder outputs.

Latents (``--cache_latents``; ``--cache_latents_to_disk`` stores them beside the images as kohya does, as
``<image name>.codi-latents.safetensors``). The disk file holds the VAE posterior's mean and std (float32) and an
invalidation key: image file size + mtime, training size + crop mode + resize filter, flip, and the VAE identity
(architecture, dtype and a hash of the encoder weights). A file whose key differs is re-encoded; so changing one image
or one setting re-encodes only what it touches (``cache.encoded`` counts the images encoded this run,
``cache.loaded`` those read from disk). The latent itself is drawn at cache build time as
``(mean + std * noise) * scaling_factor`` with the per-item noise of :func:`item_generator`,
exactly as the uncached path draws it; the seed is therefore not part of the disk key.

Random crops cannot be cached (each epoch has other pixels): that is an error, as in kohya. Flips are supported: both
the plain and the flipped image are encoded and the batch takes the one its flip decision picks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch

from trainer.data.dataset import ControlDataset
from trainer.data.errors import DataError, warn
from trainer.disk import write_safetensors

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


def item_generator(seed: int, index: int) -> torch.Generator:
    """The generator of item ``index``'s latent noise: a pure function of ``(seed, index)``, so a cached latent and
    one encoded on the fly are the same draw."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, indices, seed: int, scaling_factor: float) -> torch.Tensor:
    """VAE latents sampled with a per-item generator, so cached and on-the-fly latents are identical. ``vae=None`` (a
    pixel-space base): the latents are the pixels in [-1, 1] times ``scaling_factor``."""
    if vae is None:
        return pixels.float() * scaling_factor
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=item_generator(seed, int(i)))
                         for i in indices]).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * noise) * scaling_factor


def sample_latent(mean: torch.Tensor, std: torch.Tensor, seed: int, index: int, scaling_factor: float):
    noise = torch.randn(mean.shape, generator=item_generator(seed, int(index)))
    return (mean + std * noise) * scaling_factor


class LatentCache:
    """Latents of every item (both flips when the item flips), computed before training."""

    def __init__(self, dataset: ControlDataset, base, *, seed: int, to_disk: bool = False, is_main_process: bool = True,
                 chunk: int = 4):
        random_crop = [item.image_path.name for item in dataset.items if item.random_crop]
        if random_crop:
            raise DataError(f"--random_crop cannot be combined with --cache_latents/--cache_latents_to_disk (each "
                            f"epoch crops other pixels; kohya refuses this too): {len(random_crop)} images with "
                            f"random_crop, e.g. {random_crop[0]}; drop one of the two")
        scaling = base.vae_scaling_factor
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
                    if to_disk and is_main_process and not self._save(latent_cache_path(item.image_path), tensors,
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
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            write_safetensors(tensors, tmp, {"codi_cache_key": key, "format": CACHE_FORMAT})
            os.replace(tmp, path)
            return True
        except OSError:
            with contextlib.suppress(OSError):  # a read-only folder refuses even removing what is not there
                tmp.unlink(missing_ok=True)
            return False

    def get(self, indices, flips=None) -> torch.Tensor:
        flips = [False] * len(indices) if flips is None else flips
        return torch.stack([self.latents[(int(i), bool(f))] for i, f in zip(indices, flips)])


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
