"""What a run writes: the adapter files (EMA weights + metadata), intermediate saves and their pruning, resumable
state folders, and the file kept when a run stops on a non-finite loss."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

import ccd_sampler as cs
from trainer.adapters.files import build_metadata, save_adapter, unet_lora_path
from trainer.data.conditions import make_condition_builder
from trainer.errors import CodiError
from trainer.training import state
from trainer.training.networks import Networks
from trainer.training.settings import CodiSettings, SaveSettings, Settings

class TrainingStopped(CodiError):
    """Training cannot continue (e.g. a non-finite loss); the message says what was kept on disk."""

    exit_code = 3


# An adapter's weights stay within a few units; a run whose weights pass this has diverged (--learning_rate 1e30 gives
# finite weights near 1e27 after one step), and its weights are never called "good" nor written over a good file.
DIVERGED_MAGNITUDE = 1e4


def diverged(named: dict) -> list[str]:
    """Names of the tensors that are not finite or exceed :data:`DIVERGED_MAGNITUDE` in magnitude."""
    names = list(named)
    if not names:
        return []
    peaks = torch.stack(torch._foreach_norm([named[n].detach().float() for n in names], float("inf")))
    ok = (peaks <= DIVERGED_MAGNITUDE).tolist()  # NaN compares False
    return [n for n, good in zip(names, ok) if not good]


def hint_preprocessing_of(dataset) -> dict:
    """``codi.hint_preprocessing``: how the training hints were built (the nodes build inference hints the same way).
    Several different conditions in one dataset are listed under ``"mixed"``."""
    kinds = {}
    for item in dataset.items:
        if (item.condition, item.condition_options) not in kinds:
            kinds[(item.condition, item.condition_options)] = (
                {"type": "paired"} if item.condition == "paired"
                else make_condition_builder(item.condition, **dict(item.condition_options)).hint_preprocessing())
    values = list(kinds.values())
    return values[0] if len(values) == 1 else {"type": "mixed", "conditions": values}


def provenance(settings: Settings, adapter_type: str, num_images: int, resolution,
               base_hash: str) -> dict[str, str] | None:
    """kohya's ``ss_*`` keys (``ss_steps`` is filled in at each save); None with ``--no_metadata``."""
    if settings.save.no_metadata:
        return None
    base_path = settings.model.pretrained_model_name_or_path
    lora = adapter_type == "control-lora"
    return {"ss_sd_model_name": os.path.basename(str(base_path)),
            "ss_sd_model_hash": base_hash,
            "ss_base_model_version": None,  # filled by AdapterWriter (the base's modelspec architecture)
            "ss_resolution": f"({resolution[0]}, {resolution[1]})",
            "ss_num_train_images": str(num_images),
            "ss_steps": None,
            "ss_learning_rate": str(settings.optimizer.learning_rate),
            "ss_optimizer": settings.optimizer.optimizer_type,
            "ss_mixed_precision": settings.run.mixed_precision,
            "ss_seed": str(settings.run.seed),
            "ss_network_dim": str(settings.adapter.network_dim) if lora else "",
            "ss_network_alpha": str(settings.adapter.network_alpha) if lora else "",
            "ss_training_comment": settings.save.training_comment or ""}


class AdapterWriter:
    """Writes the EMA adapter (and the UNet LoRA beside it) as safetensors with ``modelspec.*`` / ``codi.*`` /
    ``ss_*`` metadata; everything but the step is worked out once, when the run starts."""

    def __init__(self, save: SaveSettings, codi: CodiSettings, networks: Networks, dataset, resolution,
                 provenance: dict[str, str] | None, unet_lora_rank: tuple[int, float] = (0, 0.0)):
        self.save_settings, self.networks, self.resolution = save, networks, resolution
        base = networks.base
        self.codi = codi.metadata(adapter_type=networks.adapter_type, unet_lora=networks.unet_lora is not None,
                                  prediction_type=base.prediction_type,
                                  hint_preprocessing=hint_preprocessing_of(dataset),
                                  zero_terminal_snr=bool(base.scheduler.get("rescale_betas_zero_snr")),
                                  clip_skip=base.effective_clip_skip if base.tokenizers else 0)
        self.provenance = None if provenance is None else {
            **provenance, "ss_base_model_version": base.modelspec_architecture}
        self.unet_lora_rank = unet_lora_rank

    def path(self, suffix: str = "", folder=None) -> Path:
        return Path(folder or self.save_settings.output_dir) / f"{self.save_settings.output_name}{suffix}.safetensors"

    def save(self, ema: cs.EMA, step: int, suffix: str = "", folder=None) -> list[Path]:
        """Write the EMA weights after ``step`` steps to ``<output_name><suffix>.safetensors`` (in ``folder``,
        default the output folder); returns the paths. Weights that are not finite are never written: a good file
        is never replaced by a bad one."""
        save, base, networks = self.save_settings, self.networks.base, self.networks
        bad = diverged(ema.shadow)
        if bad:
            raise TrainingStopped(f"the EMA weights have diverged after step {step} (not finite or above "
                                  f"{DIVERGED_MAGNITUDE:g} in {len(bad)} of "
                                  f"{len(ema.shadow)} tensors, e.g. {bad[0]}): nothing was written over the earlier "
                                  "saves. Lower --learning_rate and start again (or --resume an earlier state)")
        Path(folder or save.output_dir).mkdir(parents=True, exist_ok=True)
        ema_adapter = {n[len("adapter."):]: t for n, t in ema.shadow.items() if n.startswith("adapter.")}
        tensors = networks.adapter.export_state_dict(ema_adapter, layout=save.controlnet_layout)
        metadata = build_metadata(
            codi=self.codi, base_architecture=base.modelspec_architecture, adapter_type=networks.adapter_type,
            title=save.output_name, resolution=self.resolution, prediction_type=base.prediction_type,
            provenance=None if self.provenance is None else {**self.provenance, "ss_steps": str(step)})
        path = self.path(suffix, folder)
        save_adapter(path, tensors, metadata, dtype=save.save_precision)
        paths = [path]
        if networks.unet_lora is not None:
            ema_lora = {n[len("unet_lora."):]: t for n, t in ema.shadow.items() if n.startswith("unet_lora.")}
            rank, alpha = self.unet_lora_rank
            lora_meta = build_metadata(
                codi=None, base_architecture=base.modelspec_architecture, adapter_type="lora",
                title=f"{save.output_name} UNet LoRA", resolution=self.resolution,
                prediction_type=base.prediction_type,
                provenance=None if self.provenance is None else {"ss_network_dim": str(rank),
                                                                 "ss_network_alpha": str(alpha),
                                                                 "ss_network_module": "networks.lora"})
            lora_path = unet_lora_path(path, suffix)
            save_adapter(lora_path, networks.unet_lora.export_kohya_state_dict(ema_lora), lora_meta,
                         dtype=save.save_precision)
            paths.append(lora_path)
        return paths


def step_suffix(step: int) -> str:
    return f"-step{step:08d}"


def step_save_pattern(output_name: str) -> re.Pattern:
    """This run's own intermediate saves, exactly: ``<name>-stepNNNNNNNN.safetensors``, its UNet LoRA
    ``<name>_unet_lora-stepNNNNNNNN.safetensors`` and its state ``<name>-stepNNNNNNNN-state`` -- never another run's
    whose name merely starts the same (``<name>_v2-step...``)."""
    return re.compile(re.escape(output_name) + r"(?:_unet_lora)?-step(\d{8})(?:\.safetensors|-state)")


def prune_step_saves(save: SaveSettings, step: int) -> None:
    """--save_last_n_steps: delete this run's intermediate saves older than ``step - N`` (the final save is never
    pruned)."""
    if not save.save_last_n_steps:
        return
    pattern = step_save_pattern(save.output_name)
    for path in list(Path(save.output_dir).iterdir()):
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) < step - save.save_last_n_steps:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_state_folder(save: SaveSettings, name: str, trainable, ema, optimizer, lr_scheduler, progress: dict,
                      folder=None) -> Path:
    """A resumable state folder ``<output_dir>/<name>`` (``folder`` instead of the output folder when given; see
    :mod:`trainer.training.state`)."""
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    return state.save_training_state(Path(folder or save.output_dir) / name, trainable, ema, inner, lr_scheduler,
                                     progress)


def non_finite_loss(step: int, diag: dict, kept: list[Path], earlier: list[Path]) -> TrainingStopped:
    """The error of a run stopped on a non-finite loss at step ``step + 1`` (nothing of it was applied)."""
    where = ", ".join(str(p) for p in kept) or "(not written on this process)"
    before = f"; earlier saves: {', '.join(str(p) for p in earlier)}" if earlier else ""
    return TrainingStopped(
        f"loss is not finite at step {step + 1} (consistency {diag['loss_consistency']:.4g}, guidance "
        f"{diag['loss_guidance']:.4g}, t={diag['t'][0]}). Training stopped; the last good adapter (EMA weights "
        f"after step {step}) is kept at {where}{before}. Try a lower --learning_rate, --mixed_precision bf16 "
        f"instead of fp16, or --max_grad_norm 1.0.")
