"""Adapter files: safetensors only (never a pickle), string metadata, ``modelspec.*`` / ``codi.*`` / ``ss_*`` keys.

* :func:`save_adapter` casts to the ``--save_precision`` dtype, makes tensors contiguous, adds
  ``modelspec.hash_sha256`` when the metadata has ``modelspec.*`` keys, and writes atomically (a crash never leaves a
  half-written adapter behind).
* :func:`load_adapter_file` reads tensors + metadata with clear errors for missing, truncated or non-safetensors files.
* :func:`load_adapter` is *the* adapter loader (trainer, quality report, benchmarks, demo): it rebuilds the adapter a
  file describes on a base model (or fills one the caller built) and attaches its UNet LoRA.
* :func:`build_metadata` assembles the file's metadata (see ``docs/adapter_format.md``): ``modelspec.*`` made here,
  ``codi.*`` from a ``ccd_sampler.CoDiMetadata``, kohya ``ss_*`` provenance given by the training loop.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

import ccd_sampler as cs
from ccd_sampler.metadata import read_safetensors_header
from trainer.adapters.controlnet import Adapter, AdapterFileError, build_adapter
from trainer.adapters.lora import UNetLoRA, add_unet_lora
from trainer.disk import write_safetensors

logger = logging.getLogger("codi.adapters")

SAVE_PRECISIONS = {None: None, "float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
                   "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
BASE_ARCHITECTURES = ("stable-diffusion-v1", "stable-diffusion-v2-512", "stable-diffusion-v2-768-v",
                      "stable-diffusion-xl-v1-base",
                      "codi-mini-pixel-v1", "codi-mini-pixel-v2")  # the pixel-space bases of benchmarks/mini
ARCHITECTURE_SUFFIX = {"controlnet": "codi-controlnet", "control-lora": "codi-control-lora", "lora": "lora",
                       "unet-lora": "lora"}
SAI_MODEL_SPEC_VERSION = "1.0.1"
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return SAVE_PRECISIONS[dtype]
    except KeyError:
        raise ValueError(f"unknown save precision {dtype!r}; use float, fp16 or bf16") from None


def prepare_tensors(tensors: dict[str, torch.Tensor], dtype=None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; floating ones cast to ``dtype`` (a torch dtype or float/fp16/bf16; None
    keeps each tensor's dtype)."""
    dtype = _dtype(dtype)
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t.contiguous()
    return out


def safetensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data of the safetensors serialisation (kohya's ``addnet`` hash; independent of the
    metadata), as ``0x<hex>``."""
    blob = safetensors.torch.save(tensors)
    (header_len,) = struct.unpack("<Q", blob[:8])
    return "0x" + hashlib.sha256(blob[8 + header_len:]).hexdigest()


def save_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 dtype=None) -> None:
    """Write ``tensors`` with string ``metadata`` to a ``.safetensors`` file (atomically). ``dtype``: the
    ``--save_precision`` (torch dtype or float/fp16/bf16) for floating tensors; None keeps them as they are."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: adapters are saved as .safetensors only")
    metadata = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; offending keys: {bad}")
    tensors = prepare_tensors(tensors, dtype)
    if any(k.startswith("modelspec.") for k in metadata):
        metadata["modelspec.hash_sha256"] = safetensors_hash(tensors)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        write_safetensors(tensors, tmp, metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: a ComfyUI running as another user could not read it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` adapter; :class:`AdapterFileError` naming the file for anything
    else (missing, truncated, a pickle)."""
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise AdapterFileError(f"{path}: adapters are read from .safetensors only (pickle files can run code)")
    try:
        _, metadata = read_safetensors_header(path)  # clear errors for missing / truncated / not safetensors
    except ValueError as e:
        raise AdapterFileError(str(e)) from None
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise AdapterFileError(f"{path}: cannot read safetensors data ({e})") from None
    return tensors, metadata


def unet_lora_path(adapter_path: str | os.PathLike, suffix: str = "") -> Path:
    """Where the UNet LoRA trained with an adapter lives: ``<name>_unet_lora<suffix>.safetensors`` beside it, for
    the adapter ``<name><suffix>.safetensors``."""
    path = Path(adapter_path)
    stem = path.stem[:len(path.stem) - len(suffix)] if suffix and path.stem.endswith(suffix) else path.stem
    return path.with_name(f"{stem}_unet_lora{suffix}.safetensors")


@dataclass
class LoadedAdapter:
    """What :func:`load_adapter` returns: the adapter (frozen, eval mode), its ``codi.*`` facts (None when the file
    was loaded ``into`` an adapter the caller built) and the UNet LoRA injected into the base (or None)."""

    adapter: Adapter
    codi: cs.CoDiMetadata | None
    unet_lora: UNetLoRA | None = None


def _hint_channels(tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The hint CNN's channels as saved (a pixel-space mini base may use a narrower one than ComfyUI's)."""
    convs = sorted((k for k in tensors if k.startswith("input_hint_block.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[1]))
    return tuple(int(tensors[k].shape[0]) for k in convs[:-1:2])


def _control_lora_rank(tensors: dict[str, torch.Tensor], path) -> int:
    ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith(".down")}
    if len(ranks) != 1:
        raise AdapterFileError(f"{path}: cannot infer the Control-LoRA rank from its '.down' factors (ranks found: "
                               f"{sorted(ranks)})")
    return ranks.pop()


def load_adapter(base, path, *, into: Adapter | None = None, unet_lora: str | os.PathLike | None = None,
                 flag: str = "adapter") -> LoadedAdapter:
    """Load the adapter file ``path`` for ``base`` (a ``trainer.models.BaseModel``).

    Without ``into`` the adapter is rebuilt from what the file says (``codi.adapter_type``, the Control-LoRA rank,
    the hint CNN's channels), frozen in eval mode, and a UNet LoRA trained with it (``codi.unet_lora``; the file
    :func:`unet_lora_path` or ``unet_lora``) is injected into ``base.unet``. With ``into`` the file's weights are
    loaded into that adapter (``--init_adapter`` / ``--teacher_adapter``: the caller built it from its own flags)
    and nothing else changes. A file of another type, base or shape raises :class:`AdapterFileError` naming
    ``flag`` and the file."""
    tensors, metadata = load_adapter_file(path)
    if into is not None:
        try:
            into.load_exported(tensors)
        except (ValueError, KeyError, RuntimeError) as e:
            raise AdapterFileError(f"{flag} {path}: cannot load it into this {type(into).__name__} (same "
                                   f"--adapter_type, base model and hint channels needed): {e}") from e
        return LoadedAdapter(into, None)
    try:
        codi = cs.CoDiMetadata.from_metadata(metadata)
    except cs.MetadataError as e:
        raise AdapterFileError(f"{flag} {path}: {e}") from None
    kwargs = {}
    if codi.adapter_type == "control-lora":
        # export folds alpha/rank into `up`, load_exported divides it back out: alpha = rank loads it exactly
        kwargs = {"network_dim": _control_lora_rank(tensors, path), "network_alpha": None}
    if _hint_channels(tensors):
        kwargs["conditioning_embedding_out_channels"] = _hint_channels(tensors)
    adapter = build_adapter(base.unet, codi.adapter_type, hint_downscale=base.latent_downscale, **kwargs)
    try:
        adapter.load_exported(tensors)
    except (ValueError, KeyError, RuntimeError) as e:
        raise AdapterFileError(f"{flag} {path}: does not fit this base model: {e}") from None
    adapter.requires_grad_(False).eval()
    if unet_lora is None and codi.unet_lora:
        guess = unet_lora_path(path)
        if guess.is_file():
            unet_lora = guess
        else:
            logger.warning("codi: warning: the adapter was trained with a UNet LoRA but %s is missing (give it with "
                           "--unet_lora); using the adapter without it", guess)
    lora = None if unet_lora is None else _load_unet_lora(base, unet_lora)
    return LoadedAdapter(adapter, codi, lora)


def _load_unet_lora(base, path) -> UNetLoRA:
    tensors, _ = load_adapter_file(path)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    if not downs:
        raise AdapterFileError(f"{path}: no kohya lora_down weights: not a UNet LoRA file")
    rank = int(tensors[downs[0]].shape[0])
    alpha = tensors.get(downs[0][:-len(".lora_down.weight")] + ".alpha")
    lora = add_unet_lora(base.unet, rank, float(alpha) if alpha is not None else None)
    lora.load_kohya_state_dict(tensors)
    for p in lora.parameters():
        p.requires_grad_(False)
    return lora


def build_metadata(*, base_architecture: str, adapter_type: str, title: str,
                   resolution: int | tuple[int, int] = 512, prediction_type: str = "epsilon", codi=None,
                   provenance: dict[str, str] | None = None, description: str | None = None,
                   date: datetime.datetime | None = None) -> dict[str, str]:
    """The file's metadata: ``modelspec.*`` (``hash_sha256`` is added by :func:`save_adapter`), then the ``codi.*``
    keys of ``codi`` (a ``ccd_sampler.CoDiMetadata``, or None for the UNet LoRA file) and the ``ss_*`` ``provenance``
    (None with ``--no_metadata``). ``adapter_type``: controlnet, control-lora or lora (the UNet LoRA)."""
    if base_architecture not in BASE_ARCHITECTURES:
        raise ValueError(f"unknown base architecture {base_architecture!r}; one of {BASE_ARCHITECTURES}")
    if adapter_type not in ARCHITECTURE_SUFFIX:
        raise ValueError(f"unknown adapter type {adapter_type!r}; one of {tuple(ARCHITECTURE_SUFFIX)}")
    if prediction_type in ("v", "v_prediction", "v-prediction"):
        prediction = "v"
    elif prediction_type in ("epsilon", "eps"):
        prediction = "epsilon"
    else:
        raise ValueError(f"modelspec.prediction_type: unsupported prediction type {prediction_type!r}")
    width, height = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    date = date or datetime.datetime.now()
    out = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": f"{base_architecture}/{ARCHITECTURE_SUFFIX[adapter_type]}",
        "modelspec.implementation": SGM_IMPLEMENTATION if "xl" in base_architecture else "diffusers",
        "modelspec.title": title,
        "modelspec.date": date.replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": prediction,
        "modelspec.resolution": f"{width}x{height}",
    }
    if description:
        out["modelspec.description"] = description
    if codi is not None:
        out.update(codi.to_metadata())
    for key, value in (provenance or {}).items():
        if not key.startswith("ss_"):
            raise ValueError(f"provenance key {key!r} is not a kohya ss_* key")
        out[key] = str(value)
    return out
