"""Typed settings of a training run, built once from the parsed flags (``config.parse_args``).

Each part of the trainer receives the group it needs -- the data layer a :class:`~trainer.data.spec.DataSettings`, the
network setup a :class:`ModelSettings` and an :class:`AdapterSettings`, the saver a :class:`SaveSettings` -- never
the whole argument namespace. Field names are the flag names (``--learning_rate`` -> ``learning_rate``), so
``python trainer/train.py --help`` documents every field.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import ccd_sampler as cs
from ccd_sampler.boundary import DEFAULT_SIGMA_DATA, DEFAULT_TIMESTEP_SCALING
from trainer.data.spec import DataSettings


def _pick(cls, args: argparse.Namespace, **derived):
    """``cls`` filled from the namespace attributes of the same names (``derived`` values win)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in derived}
    return cls(**values, **derived)


@dataclass(frozen=True)
class ModelSettings:
    """The base model and how its frozen modules run."""

    pretrained_model_name_or_path: str
    v_parameterization: bool | None = None
    v2: bool = False
    vae: str | None = None
    tokenizer_path: str | None = None
    no_half_vae: bool = False
    zero_terminal_snr: bool | None = None
    clip_skip: int | None = None
    xformers: bool = False
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class AdapterSettings:
    """The trainable adapter (and optional UNet LoRA) and where its weights may start from."""

    adapter_type: str | None = None  # None: control-lora for SDXL, controlnet otherwise
    network_dim: int = 64
    network_alpha: float = 64.0
    unet_lora_dim: int = 0
    unet_lora_alpha: float = 0.0
    conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    init_adapter: str | None = None
    teacher_adapter: str | None = None


@dataclass(frozen=True)
class CodiSettings:
    """The objective and the sampler facts written into the adapter's ``codi.*`` metadata."""

    loss: str = "codi"  # codi | diffusion (the plain ControlNet loss, a baseline)
    task: str = "paired"
    distill_grid: int = 50
    shared_timestep: bool = True
    ode_model: str = "ema"
    eps_source: str = "ddim"
    consistency_space: str = "eps"
    guidance_weight: float = 1.0
    min_snr_gamma: float | None = None
    no_boundary: bool = False
    sigma_data: float = DEFAULT_SIGMA_DATA
    timestep_scaling: float = DEFAULT_TIMESTEP_SCALING
    cfg_range: tuple[float, float] | None = None
    ema_decay: float = 0.999
    ema_warmup: bool = True
    min_snr_weighting: str = "truncated"
    recommended_steps: int = 4
    sample_sampler: str = "ode"

    @property
    def boundary(self) -> bool:
        return not self.no_boundary

    def loss_config(self, prediction_type: str) -> cs.CoDiLossConfig:
        return cs.CoDiLossConfig(
            prediction_type=prediction_type, distill_grid=self.distill_grid, shared_timestep=self.shared_timestep,
            ode_model=self.ode_model, eps_source=self.eps_source, consistency_space=self.consistency_space,
            guidance_weight=self.guidance_weight, min_snr_gamma=self.min_snr_gamma,
            min_snr_weighting=self.min_snr_weighting, boundary=self.boundary,
            sigma_data=self.sigma_data, timestep_scaling=self.timestep_scaling,
            guidance_mode="cfg" if self.cfg_range else "none", cfg_range=self.cfg_range or (2.0, 8.0))

    def metadata(self, *, adapter_type: str, unet_lora: bool, prediction_type: str, hint_preprocessing: dict | None,
                 zero_terminal_snr: bool = False, clip_skip: int = 0) -> cs.CoDiMetadata:
        """The ``codi.*`` facts the nodes read to sample this adapter."""
        return cs.CoDiMetadata(
            task=self.task, adapter_type=adapter_type, unet_lora=unet_lora, distill_grid=self.distill_grid,
            timestep_scaling=self.timestep_scaling, sigma_data=self.sigma_data, boundary=self.boundary,
            prediction_type=prediction_type, guidance_mode="cfg" if self.cfg_range else "none",
            cfg_range=self.cfg_range or (1.0, 1.0), recommended_steps=min(self.recommended_steps, 8),
            recommended_cfg=float(self.cfg_range[0]) if self.cfg_range else 1.0, sampler_mode=self.sample_sampler,
            hint_preprocessing=hint_preprocessing or {"type": self.task}, objective=self.loss,
            zero_terminal_snr=zero_terminal_snr, clip_skip=clip_skip, ema_decay=self.ema_decay,
            ema_warmup=self.ema_warmup)


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer_type: str = "AdamW"
    optimizer_args: tuple[str, ...] = ()  # KEY=VALUE strings (parsed by optim.parse_optimizer_args)
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class RunSettings:
    """Length, precision, caches, resuming and logging of the loop itself."""

    output_dir: str = "outputs"
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    mixed_precision: str = "no"
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    resume: str | None = None
    resume_changes: tuple[str, ...] = ()
    dry_run: bool = False
    log_with: str | None = None
    logging_dir: str | None = None
    log_prefix: str | None = None


@dataclass(frozen=True)
class SaveSettings:
    output_dir: str = "outputs"
    output_name: str = "codi_adapter"
    save_every_n_steps: int | None = None
    save_last_n_steps: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    save_precision: str = "fp16"
    controlnet_layout: str = "ldm"
    no_metadata: bool = False
    training_comment: str | None = None


@dataclass(frozen=True)
class SampleSettings:
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = None
    sample_at_first: bool = False


@dataclass(frozen=True)
class ReportSettings:
    quality_report: bool = False
    quality_report_steps: tuple[int, ...] = (1, 2, 4)
    quality_reference_steps: int | None = None
    quality_max_pairs: int = 16
    quality_hint_start: tuple[float, ...] = ()


@dataclass(frozen=True)
class Settings:
    """Every setting of a run, grouped; ``flags`` keeps the flag values as strings for the experiment trackers."""

    model: ModelSettings
    adapter: AdapterSettings
    data: DataSettings
    codi: CodiSettings
    optimizer: OptimizerSettings
    run: RunSettings
    save: SaveSettings
    samples: SampleSettings
    report: ReportSettings
    flags: dict

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """From the namespace ``config.parse_args`` returns (flags already checked and converted there)."""
        return cls(
            model=_pick(ModelSettings, args), adapter=_pick(AdapterSettings, args),
            data=_pick(DataSettings, args, condition_args=tuple(args.condition_args or ()),
                       cache_conditions=bool(args.cache_latents or args.cache_latents_to_disk)),
            codi=_pick(CodiSettings, args), optimizer=_pick(OptimizerSettings, args,
                                                            optimizer_args=tuple(args.optimizer_args or ())),
            run=_pick(RunSettings, args), save=_pick(SaveSettings, args), samples=_pick(SampleSettings, args),
            report=_pick(ReportSettings, args), flags={k: str(v) for k, v in vars(args).items()})
