"""The ``codi.*`` sampler facts stored in an adapter's safetensors metadata (all values are strings).

The ComfyUI nodes read these to pick the schedule, boundary scalings, guidance and the hint preprocessing that the
adapter was trained with, so a shared adapter file carries everything needed to sample it correctly.

=========================  ======================================================  ==================
key                        meaning                                                 example
=========================  ======================================================  ==================
codi.format_version        version of this key set                                 ``1``
codi.task                  sr, inpaint, canny, depth, gray, blur, jpeg, paired     ``sr``
codi.adapter_type          controlnet or control-lora                              ``control-lora``
codi.unet_lora             a UNet LoRA was trained jointly (separate kohya file)   ``false``
codi.distill_grid          grid size N the adapter was distilled on                ``50``
codi.num_train_timesteps   T of the base schedule                                  ``1000``
codi.timestep_scaling      tau of the boundary scalings                            ``10.0``
codi.sigma_data            sigma_d of the boundary scalings                        ``0.5``
codi.boundary              boundary scalings on/off                                ``true``
codi.prediction_type       epsilon, v_prediction or sample                         ``epsilon``
codi.guidance_mode         none, cfg (CFG-aware) or distill (w-conditioned)        ``cfg``
codi.cfg_range             guidance range seen in training, ``w_min,w_max``        ``2.0,8.0``
codi.recommended_steps     steps to sample with                                    ``4``
codi.recommended_cfg       cfg to sample with                                      ``1.0``
codi.sampler_mode          ode or consistency                                      ``ode``
codi.hint_preprocessing    JSON object describing how the hint image is built     ``{"type": "sr", "scale": 4}``
codi.objective             codi (distilled: 1-4 steps) or diffusion (plain         ``codi``
                           ControlNet fine-tune: sample with many steps)
codi.zero_terminal_snr     trained on the zero-terminal-SNR schedule (Lin et al.)  ``false``
codi.clip_skip             text-encoder layer from the end (ComfyUI's              ``1``
                           CLIPSetLastLayer = -clip_skip); 0 = not recorded
codi.ema_decay             EMA decay of the saved weights; 0 = not recorded        ``0.999``
codi.ema_warmup            the EMA used the warm-up min(decay, (1+n)/(10+n))       ``true``
=========================  ======================================================  ==================
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field, fields

from .loss import GUIDANCE_MODES
from .parameterization import PREDICTION_TYPES, normalize_prediction_type
from .sampling import SAMPLER_MODES

FORMAT_VERSION = 2  # 2: zero_terminal_snr, clip_skip, ema_decay, ema_warmup
PREFIX = "codi."
OBJECTIVES = ("codi", "diffusion")  # diffusion: a plain ControlNet fine-tune, to be sampled with many steps
TASKS = ("sr", "inpaint", "canny", "depth", "gray", "blur", "jpeg", "paired")
ADAPTER_TYPES = ("controlnet", "control-lora")


class MetadataError(ValueError):
    """An adapter's ``codi.*`` metadata is missing, malformed or out of range."""


@dataclass
class CoDiMetadata:
    task: str = "paired"
    adapter_type: str = "controlnet"
    unet_lora: bool = False
    distill_grid: int = 50
    num_train_timesteps: int = 1000
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    boundary: bool = True
    prediction_type: str = "epsilon"
    guidance_mode: str = "none"
    cfg_range: tuple[float, float] = (1.0, 1.0)
    recommended_steps: int = 4
    recommended_cfg: float = 1.0
    sampler_mode: str = "ode"
    hint_preprocessing: dict = field(default_factory=dict)
    objective: str = "codi"
    zero_terminal_snr: bool = False
    clip_skip: int = 0
    ema_decay: float = 0.0
    ema_warmup: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MetadataError` naming the first key whose value is out of range."""
        def bad(key, why):
            raise MetadataError(f"{PREFIX}{key} {why} (got {getattr(self, key)!r})")

        if self.format_version > FORMAT_VERSION:
            bad("format_version", f"is newer than this version of CoDi understands ({FORMAT_VERSION}); update the "
                "node pack / trainer")
        if self.task not in TASKS:
            bad("task", f"must be one of {TASKS}")
        if self.adapter_type not in ADAPTER_TYPES:
            bad("adapter_type", f"must be one of {ADAPTER_TYPES}")
        if not 2 <= self.distill_grid <= self.num_train_timesteps:
            bad("distill_grid", f"must be in 2..{self.num_train_timesteps}")
        if self.num_train_timesteps < 2:
            bad("num_train_timesteps", "must be at least 2")
        if self.timestep_scaling <= 0:
            bad("timestep_scaling", "must be positive")
        if self.sigma_data <= 0:
            bad("sigma_data", "must be positive")
        try:
            self.prediction_type = normalize_prediction_type(self.prediction_type)
        except ValueError:
            bad("prediction_type", f"must be one of {PREDICTION_TYPES}")
        if self.guidance_mode not in GUIDANCE_MODES:
            bad("guidance_mode", f"must be one of {GUIDANCE_MODES}")
        if len(self.cfg_range) != 2 or not 1.0 <= self.cfg_range[0] <= self.cfg_range[1]:
            bad("cfg_range", "must be two numbers 1 <= w_min <= w_max")
        if not 1 <= self.recommended_steps <= min(8, self.distill_grid):
            bad("recommended_steps", "must be in 1..8 and at most the grid size")
        if self.recommended_cfg < 1.0:
            bad("recommended_cfg", "must be >= 1")
        if self.sampler_mode not in SAMPLER_MODES:
            bad("sampler_mode", f"must be one of {SAMPLER_MODES}")
        if not isinstance(self.hint_preprocessing, dict):
            bad("hint_preprocessing", "must be a JSON object")
        if self.objective not in OBJECTIVES:
            bad("objective", f"must be one of {OBJECTIVES}")
        if not 0 <= self.clip_skip <= 12:
            bad("clip_skip", "must be in 0..12")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1)")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            bad("zero_terminal_snr", "needs a v- or x-prediction model (epsilon cannot predict at alpha = 0)")

    def to_metadata(self) -> dict[str, str]:
        """The ``codi.*`` keys as safetensors string metadata."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(repr(float(v)) for v in value)
            elif isinstance(value, dict):
                text = json.dumps(value, sort_keys=True)
            else:
                text = str(value)
            out[PREFIX + f.name] = text
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> CoDiMetadata:
        """Parse ``codi.*`` keys (others are ignored). Raises :class:`MetadataError` for a file without CoDi
        metadata, an unknown key, or a value that does not parse or is out of range."""
        metadata = metadata or {}
        ours = {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}
        if not ours:
            raise MetadataError("no codi.* metadata: this file was not written by the CoDi trainer")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(ours) - set(known))
        if unknown and int(_parse_int("format_version", ours.get("format_version", "1"))) <= FORMAT_VERSION:
            raise MetadataError(f"unknown codi.* keys {[PREFIX + k for k in unknown]}")
        kwargs = {}
        for name, text in ours.items():
            if name not in known:
                continue
            kwargs[name] = _parse(name, text, known[name].type)
        return cls(**kwargs)

    @classmethod
    def has_metadata(cls, metadata: dict[str, str] | None) -> bool:
        return any(k.startswith(PREFIX) for k in (metadata or {}))


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MetadataError(f"{PREFIX}{name} must be an integer, got {text!r}") from None


def _parse(name: str, text: str, annotation):
    if not isinstance(text, str):
        raise MetadataError(f"{PREFIX}{name} must be a string (safetensors metadata), got {type(text).__name__}")
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("tuple"):
            parts = [float(p) for p in text.split(",")]
            if len(parts) != 2:
                raise ValueError
            return tuple(parts)
        if kind == "dict":
            value = json.loads(text) if text.strip() else {}
            if not isinstance(value, dict):
                raise ValueError
            return value
        return text
    except (ValueError, json.JSONDecodeError):
        raise MetadataError(f"{PREFIX}{name}: cannot parse {text!r} as {kind}") from None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """``(tensor_index, metadata)`` of a safetensors file, read from its JSON header only (no tensor data, no
    pickle). Raises ``ValueError`` naming the file when it is missing, truncated or not safetensors."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: {size} bytes is too short for a safetensors file (truncated or empty?)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 * 1024 * 1024):
                raise ValueError(f"{path}: not a safetensors file (header length {header_len} does not fit the "
                                 f"{size}-byte file; truncated, or a pickle/.ckpt renamed to .safetensors?)")
            header = json.loads(fh.read(header_len).decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, the header describes "
                         f"{8 + header_len + end})")
    return header, metadata
