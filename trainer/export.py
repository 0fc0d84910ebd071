"""Writing and reading adapter files: safetensors only (no pickle), string metadata, ``modelspec.*`` keys.

* :func:`save_adapter` casts to the ``--save_precision`` dtype, makes tensors contiguous, adds ``modelspec.hash_sha256`` when
  the metadata has ``modelspec.*`` keys, and writes atomically (a crash never leaves a half-written adapter behind).
* :func:`load_adapter_file` reads tensors + metadata with clear errors for missing, truncated or non-safetensors files.
* :func:`load_adapter_weights` puts an exported state dict back into an adapter (inverse of ``export_state_dict``).
* :func:`build_metadata` assembles the file's metadata (CONVENTIONS.md): ``modelspec.*`` made here, ``codi.*`` from
  a ``ccd_sampler.CoDiMetadata``, kohya ``ss_*`` provenance given by the training loop.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
import tempfile

import safetensors.torch
import torch

from ccd_sampler.metadata import read_safetensors_header

SAVE_PRECISIONS = {None: None, "float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
                   "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
BASE_ARCHITECTURES = ("stable-diffusion-v1", "stable-diffusion-v2-512", "stable-diffusion-v2-768-v",
                      "stable-diffusion-xl-v1-base",
                      "codi-mini-pixel-v1")  # the pixel-space base bundle of benchmarks/mini (trainer/bundle.py)
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
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` adapter; ValueError naming the file for anything else."""
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"{path}: adapters are read from .safetensors only (pickle files can run code)")
    _, metadata = read_safetensors_header(path)  # clear errors for missing / truncated / not safetensors
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise ValueError(f"{path}: cannot read safetensors data ({e})") from None
    return tensors, metadata


def load_adapter_weights(adapter, tensors: dict[str, torch.Tensor]) -> None:
    """Load an exported adapter state dict (any layout its ``export_state_dict`` writes) into ``adapter``; raises
    ``AdapterFileError`` when the file is of another type or shape."""
    adapter.load_exported(tensors)


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
