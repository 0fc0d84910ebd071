"""Pure-torch CoDi (Conditional Diffusion Distillation) math: schedules, parameterisations, boundary scalings,
timestep grids, the few-step sampler, the training loss, EMA and adapter metadata.

Imports only torch (and the standard library): both the trainer (diffusers) and the ComfyUI nodes call it.
"""

from .boundary import apply_boundary, boundary_scalings
from .ema import EMA
from .grids import codi_timesteps, distill_grid, even_timesteps, img2img_timesteps, validate_timesteps
from .loss import CoDiLossConfig, codi_loss, diffusion_loss, draw_timesteps, min_snr_weight
from .metadata import CoDiMetadata, MetadataError, read_safetensors_header
from .parameterization import eps_from_x0, from_x0_eps, normalize_prediction_type, to_x0_eps
from .sampling import batch_conditions, consistency_step, guided_output, ode_step, predict_x0_eps, sample
from .schedule import NoiseSchedule, betas_for_schedule

__all__ = [
    "EMA", "CoDiLossConfig", "CoDiMetadata", "MetadataError", "NoiseSchedule", "apply_boundary",
    "batch_conditions", "betas_for_schedule", "boundary_scalings", "codi_loss", "codi_timesteps",
    "consistency_step", "diffusion_loss", "distill_grid", "draw_timesteps", "eps_from_x0", "even_timesteps",
    "from_x0_eps",
    "guided_output", "img2img_timesteps", "min_snr_weight", "normalize_prediction_type", "ode_step",
    "predict_x0_eps", "read_safetensors_header", "sample", "to_x0_eps", "validate_timesteps",
]
