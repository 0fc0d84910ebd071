"""The CoDi training loop: build models, adapter and optimizer, then repeat the CoDi step of CODI_SPEC.md.

One optimizer step = ``gradient_accumulation_steps`` micro-batches; each micro-batch draws its timesteps, noise and
(CFG) guidance scales from a generator seeded by ``(seed, micro-batch index, rank)``, and the data order is a function
of ``(seed, epoch)``. So a run resumed from a saved state continues exactly as if it had never stopped.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ccd_sampler as cs
from trainer import adapters as adapter_lib
from trainer.adapters import text_conditioning
from trainer import export, memory, state
from trainer.checkpoints import CheckpointError, load_base_model, model_hash
from trainer.caching import LatentCache, TextCache, cat_tree
from trainer.data import DataError, EpochBatches, build_datasets, collate
from trainer.optim import (build_lr_scheduler, build_optimizer, optimizer_state_bytes_per_param,
                           parse_optimizer_args)
from trainer.samples import load_condition, read_prompt_file, save_image_grid

logger = logging.getLogger("codi.trainer")

NAN_AT_STEP_ENV = "CODI_DEBUG_NAN_AT_STEP"  # tests: make the loss NaN at this optimizer step
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingStopped(RuntimeError):
    """Training cannot continue (e.g. a NaN loss); the message says what was kept on disk."""


@dataclass
class Models:
    base: object                       # trainer.checkpoints.BaseModel
    adapter: torch.nn.Module           # online adapter (trainable)
    target_adapter: torch.nn.Module    # same architecture, weights = the EMA shadow tensors
    unet_lora: object | None
    teacher_adapter: torch.nn.Module | None = None  # frozen, for --ode_model teacher
    trainable: dict = field(default_factory=dict)  # "adapter.<name>" / "unet_lora.<name>" -> Parameter
    adapter_type: str = "controlnet"


class OnlineModel(torch.nn.Module):
    """base UNet (+ trainable UNet LoRA) + trainable adapter as one module, so DDP syncs every trainable weight."""

    def __init__(self, unet, adapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, sample, timestep, cond):
        return adapter_lib.adapted_unet_output(self.unet, self.adapter, sample, timestep, cond)


def _print(accelerator, *parts):
    if accelerator.is_main_process:
        print(*parts, flush=True)


# ------------------------------------------------------------------------------------------------ setup


def build_models(args, device, weight_dtype) -> Models:
    base = load_base_model(args.pretrained_model_name_or_path, v_parameterization=args.v_parameterization,
                           v2=args.v2, vae_path=args.vae, tokenizer_path=args.tokenizer_path)
    unet = base.unet
    for module in [unet, base.vae, *base.text_encoders]:
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    if args.xformers:
        unet.enable_xformers_memory_efficient_attention()
    adapter_type = args.adapter_type or ("control-lora" if base.architecture == "sdxl" else "controlnet")
    adapter_kwargs = dict(network_dim=args.network_dim, network_alpha=args.network_alpha,
                          conditioning_embedding_out_channels=args.conditioning_embedding_channels,
                          hint_downscale=base.latent_downscale)
    # Both adapters before the UNet LoRA: they copy (controlnet) or tie (control-lora) the plain UNet weights.
    adapter = adapter_lib.build_adapter(unet, adapter_type, **adapter_kwargs)
    target_adapter = adapter_lib.build_adapter(unet, adapter_type, **adapter_kwargs)
    target_adapter.requires_grad_(False)
    if args.init_adapter:  # before the EMA is made from these weights, so the EMA starts there too
        load_adapter_into(adapter, args.init_adapter, "--init_adapter")
    teacher_adapter = None
    if args.teacher_adapter:
        teacher_adapter = adapter_lib.build_adapter(unet, adapter_type, **adapter_kwargs)
        load_adapter_into(teacher_adapter, args.teacher_adapter, "--teacher_adapter")
        teacher_adapter.requires_grad_(False)
        teacher_adapter.eval()
    unet_lora = None
    if args.unet_lora_dim:
        from trainer.lora import add_unet_lora

        unet_lora = add_unet_lora(unet, args.unet_lora_dim, args.unet_lora_alpha)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        adapter.enable_gradient_checkpointing()

    # Frozen weights in the compute dtype; trainable ones stay float32 unless --full_fp16/--full_bf16.
    train_dtype = weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32
    for module in [unet, adapter, *base.text_encoders]:
        for p in module.parameters():
            p.data = p.data.to(device, train_dtype if p.requires_grad else weight_dtype)
    if base.vae is not None:
        base.vae.to(device, torch.float32 if args.no_half_vae else weight_dtype)

    trainable = {f"adapter.{n}": p for n, p in adapter.trainable_named_parameters()}
    if unet_lora is not None:
        trainable.update({f"unet_lora.{n}": p for n, p in unet_lora.trainable_named_parameters()})
    for p in target_adapter.parameters():  # its trainable-named weights become the EMA tensors later
        p.data = p.data.to(device, weight_dtype)
    if teacher_adapter is not None:
        teacher_adapter.to(device, weight_dtype)
    return Models(base=base, adapter=adapter, target_adapter=target_adapter, unet_lora=unet_lora,
                  trainable=trainable, adapter_type=adapter_type, teacher_adapter=teacher_adapter)


def load_adapter_into(adapter, path, flag: str) -> None:
    """Load an exported adapter file into ``adapter``; a file of another type, base or shape stops with a message
    naming the flag and the file."""
    try:
        tensors, _ = export.load_adapter_file(path)
        adapter.load_exported(tensors)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{flag} {path}: cannot load it into this {type(adapter).__name__} "
                              f"(same --adapter_type, base model and hint channels needed): {exc}") from exc


def tie_target_to_ema(models: Models, ema: cs.EMA) -> None:
    """Make the target adapter's trainable weights *be* the EMA shadow tensors (no copy, no swapping)."""
    target = dict(models.target_adapter.trainable_named_parameters())
    for name, param in target.items():
        param.data = ema.shadow[f"adapter.{name}"]  # the float32 master copy; autocast casts on use
    gc.collect()


# ------------------------------------------------------------------------------------------------ encoding


def item_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, indices, seed: int, scaling_factor: float) -> torch.Tensor:
    """VAE latents sampled with a per-item generator, so cached and on-the-fly latents are identical. ``vae=None`` (a
    pixel-space base): the latents are the pixels in [-1, 1] times ``scaling_factor`` (1.0 in the mini bundle)."""
    if vae is None:
        return pixels.float() * scaling_factor
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=item_generator(seed, int(i)))
                         for i in indices]).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * noise) * scaling_factor


# ------------------------------------------------------------------------------------------------ saving


def hint_preprocessing_of(dataset) -> dict:
    """``codi.hint_preprocessing``: how the training hints were built (the nodes build inference hints the same way).
    Several different conditions in one dataset are listed under ``"mixed"``."""
    from trainer.conditions import make_condition_builder

    kinds = {}
    for item in dataset.items:
        if (item.condition, item.condition_options) not in kinds:
            kinds[(item.condition, item.condition_options)] = (
                {"type": "paired"} if item.condition == "paired"
                else make_condition_builder(item.condition, **dict(item.condition_options)).hint_preprocessing())
    values = list(kinds.values())
    return values[0] if len(values) == 1 else {"type": "mixed", "conditions": values}


def adapter_metadata(args, models: Models, step: int, num_images: int, resolution,
                     hint_preprocessing: dict | None = None) -> dict[str, str]:
    base = models.base
    codi = cs.CoDiMetadata(
        task=args.task, adapter_type=models.adapter_type, unet_lora=models.unet_lora is not None,
        distill_grid=args.distill_grid, timestep_scaling=args.timestep_scaling, sigma_data=args.sigma_data,
        boundary=not args.no_boundary, prediction_type=base.prediction_type,
        guidance_mode="cfg" if args.cfg_range else "none",
        cfg_range=args.cfg_range or (1.0, 1.0), recommended_steps=min(args.recommended_steps, 8),
        recommended_cfg=float(args.cfg_range[0]) if args.cfg_range else 1.0,
        sampler_mode=args.sample_sampler, hint_preprocessing=hint_preprocessing or {"type": args.task},
        objective=args.loss,
    )
    return export.build_metadata(
        codi=codi, base_architecture=base.modelspec_architecture, adapter_type=models.adapter_type,
        title=args.output_name, resolution=resolution, prediction_type=base.prediction_type,
        provenance=None if args.no_metadata else {
            "ss_sd_model_name": os.path.basename(str(args.pretrained_model_name_or_path)),
            "ss_sd_model_hash": model_hash(args.pretrained_model_name_or_path)[:12],
            "ss_base_model_version": base.modelspec_architecture,
            "ss_resolution": f"({resolution[0]}, {resolution[1]})",
            "ss_num_train_images": str(num_images),
            "ss_steps": str(step),
            "ss_learning_rate": str(args.learning_rate),
            "ss_optimizer": args.optimizer_type,
            "ss_mixed_precision": args.mixed_precision,
            "ss_seed": str(args.seed),
            "ss_network_dim": str(args.network_dim) if models.adapter_type == "control-lora" else "",
            "ss_network_alpha": str(args.network_alpha) if models.adapter_type == "control-lora" else "",
            "ss_training_comment": args.training_comment or "",
        },
    )


def save_adapter_files(args, models: Models, ema: cs.EMA, step: int, dataset, resolution,
                       suffix: str = "") -> list[Path]:
    """Write the EMA adapter (and UNet LoRA) as safetensors with metadata; returns the paths."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_precision]
    ema_adapter = {n[len("adapter."):]: t for n, t in ema.shadow.items() if n.startswith("adapter.")}
    tensors = models.adapter.export_state_dict(ema_adapter, layout=args.controlnet_layout)
    metadata = adapter_metadata(args, models, step, len(dataset.items), resolution, hint_preprocessing_of(dataset))
    path = out_dir / f"{args.output_name}{suffix}.safetensors"
    export.save_adapter(path, tensors, metadata, dtype=save_dtype)
    paths = [path]
    if models.unet_lora is not None:
        ema_lora = {n[len("unet_lora."):]: t for n, t in ema.shadow.items() if n.startswith("unet_lora.")}
        lora_tensors = models.unet_lora.export_kohya_state_dict(ema_lora)
        lora_meta = export.build_metadata(
            codi=None, base_architecture=models.base.modelspec_architecture, adapter_type="lora",
            title=f"{args.output_name} UNet LoRA", resolution=resolution,
            prediction_type=models.base.prediction_type,
            provenance=None if args.no_metadata else {"ss_network_dim": str(args.unet_lora_dim),
                                                       "ss_network_alpha": str(args.unet_lora_alpha),
                                                       "ss_network_module": "networks.lora"})
        lora_path = out_dir / f"{args.output_name}_unet_lora{suffix}.safetensors"
        export.save_adapter(lora_path, lora_tensors, lora_meta, dtype=save_dtype)
        paths.append(lora_path)
    return paths


def prune_step_saves(args, step: int) -> None:
    """--save_last_n_steps: delete intermediate saves older than ``step - N`` (the final save is never pruned)."""
    if not args.save_last_n_steps:
        return
    out_dir = Path(args.output_dir)
    for path in list(out_dir.glob(f"{args.output_name}*-step*")):
        digits = path.name.split("-step")[-1].split(".")[0].split("-")[0]
        if digits.isdigit() and int(digits) < step - args.save_last_n_steps:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# ------------------------------------------------------------------------------------------------ training


def train(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from accelerate.state import AcceleratorState

    # accelerate keeps a process-wide singleton; a second train() in the same process (tests, notebooks) with other
    # precision settings must start from a clean one.
    AcceleratorState._reset_state(reset_partial_state=True)
    log_with = None if args.log_with is None else (["tensorboard", "wandb"] if args.log_with == "all"
                                                    else args.log_with)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=log_with,
                              project_dir=args.logging_dir or os.path.join(args.output_dir, "logs"))
    set_seed(args.seed)
    device = accelerator.device
    weight_dtype = DTYPES[args.mixed_precision]
    _print(accelerator, f"codi: {accelerator.num_processes} process(es), device {device}, "
                        f"mixed precision {args.mixed_precision}, num_processes == {accelerator.num_processes}")

    models = build_models(args, device, weight_dtype)
    base = models.base
    resolution = args.resolution or (base.default_resolution, base.default_resolution)
    schedule = cs.NoiseSchedule.from_config(base.scheduler)
    trainable = models.trainable
    ema = cs.EMA(trainable, decay=args.ema_decay).to(device)
    tie_target_to_ema(models, ema)
    optimizer = build_optimizer(args.optimizer_type, trainable.values(), args.learning_rate,
                                parse_optimizer_args(args.optimizer_args))

    n_trainable, n_frozen = memory.count_parameters([base.unet, models.adapter, *base.text_encoders, base.vae])
    _print(accelerator, f"codi: base {base.architecture} ({base.prediction_type}), adapter {models.adapter_type}"
                        f"{' + UNet LoRA' if models.unet_lora else ''}: {n_trainable:,} trainable, "
                        f"{n_frozen:,} frozen parameters")
    if args.dry_run:
        prediction = predict_memory(args, models, optimizer, resolution, weight_dtype, device)
        _print(accelerator, "codi: predicted memory for one training step "
                            f"(batch {args.train_batch_size}, {resolution[0]}x{resolution[1]}, "
                            f"{args.optimizer_type}, gradient checkpointing "
                            f"{'on' if args.gradient_checkpointing else 'off'}):\n" + prediction.report())
        return {"trainable": n_trainable, "frozen": n_frozen, "memory": prediction}

    dataset, validation_dataset = build_datasets(args, resolution)
    resolution = dataset.resolution  # a dataset TOML may set it
    _print(accelerator, "codi: " + dataset.summary())
    if validation_dataset is not None:
        _print(accelerator, "codi: " + validation_dataset.summary())
    batches = EpochBatches.from_dataset(dataset, args.train_batch_size, args.seed, accelerator.num_processes,
                                        accelerator.process_index)
    micro_per_epoch = len(batches)
    steps_per_epoch = max(1, micro_per_epoch // args.gradient_accumulation_steps)
    max_steps = args.max_train_steps if args.max_train_epochs is None else args.max_train_epochs * steps_per_epoch
    lr_scheduler = build_lr_scheduler(args.lr_scheduler, optimizer, args.lr_warmup_steps, max_steps)

    online = OnlineModel(base.unet, models.adapter)
    online, optimizer = accelerator.prepare(online, optimizer)

    latent_cache = text_cache = None
    if args.cache_latents or args.cache_latents_to_disk:
        latent_cache = LatentCache(dataset, base, args, device, accelerator)
        _print(accelerator, f"codi: cached latents for {len(dataset)} images ({latent_cache.encoded} encoded, "
                            f"{latent_cache.loaded} read from disk)")
    if args.cache_text_encoder_outputs:
        captions = [item.caption for item in dataset.items]
        if validation_dataset is not None:
            captions += [item.caption for item in validation_dataset.items]
        text_cache = TextCache(base, captions, device)
        base.text_encoders.clear()
        gc.collect()
    uncond_text = (text_cache.get([""], device) if text_cache else base.encode_text([""], device=device))

    loss_config = cs.CoDiLossConfig(
        prediction_type=base.prediction_type, distill_grid=args.distill_grid, shared_timestep=args.shared_timestep,
        ode_model=args.ode_model, eps_source=args.eps_source, consistency_space=args.consistency_space,
        guidance_weight=args.guidance_weight, min_snr_gamma=args.min_snr_gamma, boundary=not args.no_boundary,
        sigma_data=args.sigma_data, timestep_scaling=args.timestep_scaling,
        guidance_mode="cfg" if args.cfg_range else "none", cfg_range=args.cfg_range or (2.0, 8.0))

    def target_fn(z, t, cond, w=None):
        with ema_unet_lora(models, ema):
            return adapter_lib.adapted_unet_output(base.unet, models.target_adapter, z, t, cond)

    def base_fn(z, t, cond, w=None):
        with unet_lora_disabled(models):
            return adapter_lib.adapted_unet_output(base.unet, None, z, t, cond)

    def online_fn(z, t, cond, w=None):
        return online(z, t, cond)

    def teacher_fn(z, t, cond, w=None):
        with unet_lora_disabled(models):
            return adapter_lib.adapted_unet_output(base.unet, models.teacher_adapter, z, t, cond)

    # ---- resume
    step, micro_step, epoch, position = 0, 0, 0, 0
    if args.resume:
        progress = state.load_training_state(Path(args.resume), trainable, ema, optimizer.optimizer
                                             if hasattr(optimizer, "optimizer") else optimizer, lr_scheduler)
        step, micro_step = progress["step"], progress["micro_step"]
        epoch, position = progress["epoch"], progress["position"]
        _print(accelerator, f"codi: resumed from {args.resume} at step {step} (epoch {epoch}, batch {position})")

    if accelerator.is_main_process and log_with:
        accelerator.init_trackers(args.log_prefix or "codi", config={k: str(v) for k, v in vars(args).items()})

    sample_prompts = read_prompt_file(args.sample_prompts) if args.sample_prompts else None
    if sample_prompts and args.sample_at_first and step == 0:
        generate_samples(args, models, ema, schedule, sample_prompts, step, resolution, device, text_cache)

    nan_at = int(os.environ.get(NAN_AT_STEP_ENV, "0") or 0)
    progress_bar = tqdm(total=max_steps, initial=step, disable=not accelerator.is_main_process, desc="codi",
                        dynamic_ncols=True)
    start_time, start_step = time.time(), step
    last_saved: list[Path] = []
    losses = []
    reset_peak_memory(device)

    online.train()
    while step < max_steps:
        if position >= micro_per_epoch:
            epoch, position = epoch + 1, 0
        dataset.set_epoch(epoch)
        indices = batches.batch(epoch, position)
        with accelerator.accumulate(online):
            batch = collate([dataset.get(i, epoch, pixels=latent_cache is None) for i in indices])
            if latent_cache is not None:
                latents = latent_cache.get(indices, batch["flip"]).to(device, weight_dtype)
            else:
                latents = encode_latents(base.vae, batch["pixel_values"], indices, args.seed,
                                         base.vae_scaling_factor).to(device, weight_dtype)
            hints, captions = batch["hint"].to(device, weight_dtype), batch["caption"]
            text = text_cache.get(captions, device) if text_cache else base.encode_text(captions, device=device)
            cond = text_conditioning(text, hints)
            uncond = text_conditioning(cat_tree([uncond_text] * len(indices)), hints) if args.cfg_range else None
            generator = torch.Generator().manual_seed(
                hash((args.seed, micro_step, accelerator.process_index)) % (2**63))
            with accelerator.autocast():
                if args.loss == "diffusion":
                    loss, diag = cs.diffusion_loss(online_fn, latents, cond, schedule, base.prediction_type,
                                                   generator=generator)
                else:
                    loss, diag = cs.codi_loss(online_fn, target_fn, latents, cond, loss_config, schedule,
                                              base=base_fn, uncond=uncond, generator=generator,
                                              teacher=teacher_fn)
            if nan_at and step + 1 == nan_at:
                loss = loss * float("nan")
            finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1).float()).min().item() == 1.0
            if not finite:
                raise nan_stop(args, models, ema, step, last_saved, diag, dataset, resolution, accelerator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(list(trainable.values()), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro_step += 1
        position += 1
        losses.append(float(loss.detach()))
        if not accelerator.sync_gradients:
            continue

        lr_scheduler.step()
        ema.update(trainable)
        step += 1
        lr = lr_scheduler.get_last_lr()[0]
        window = losses[-args.gradient_accumulation_steps:]
        logs = {"loss": sum(window) / len(window), "loss_consistency": diag["loss_consistency"],
                "loss_guidance": diag["loss_guidance"], "lr": lr, "t": diag["t"][0]}
        progress_bar.update(1)
        progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
        if log_with:
            accelerator.log(logs, step=step)

        is_last = step >= max_steps
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and not is_last:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                last_saved = save_adapter_files(args, models, ema, step, dataset, resolution,
                                                suffix=f"-step{step:08d}")
                if args.save_state:
                    save_state_folder(args, f"{args.output_name}-step{step:08d}-state", trainable, ema,
                                      optimizer, lr_scheduler, step, micro_step, epoch, position)
                prune_step_saves(args, step)
        if sample_prompts and args.sample_every_n_steps and step % args.sample_every_n_steps == 0:
            generate_samples(args, models, ema, schedule, sample_prompts, step, resolution, device, text_cache)

    progress_bar.close()
    accelerator.wait_for_everyone()
    elapsed = time.time() - start_time
    final_paths = []
    if accelerator.is_main_process:
        final_paths = save_adapter_files(args, models, ema, step, dataset, resolution)
        if args.save_state or args.save_state_on_train_end:
            save_state_folder(args, f"{args.output_name}-state", trainable, ema, optimizer, lr_scheduler, step,
                              micro_step, epoch, position)
    if sample_prompts and args.sample_every_n_steps:
        generate_samples(args, models, ema, schedule, sample_prompts, step, resolution, device, text_cache)
    report = None
    if args.quality_report and accelerator.is_main_process:
        report = run_quality_report(args, models, ema, validation_dataset, text_cache, device)
        _print(accelerator, f"codi: quality report: {report['report']} (plot {report['plot']}, grid {report['grid']})")
    # Every rank reports a checksum of its weights: equal lines mean the processes stayed in sync.
    print(f"codi: rank {accelerator.process_index}/{accelerator.num_processes} trainable-weights checksum "
          f"{weights_checksum(trainable, ema)}", flush=True)
    peak = peak_memory_bytes(device)
    summary = {"steps": step, "steps_this_run": step - start_step, "seconds": elapsed,
               "peak_memory_gib": peak / memory.GIB, "final_loss": losses[-1] if losses else None,
               "first_loss": losses[0] if losses else None, "adapter": [str(p) for p in final_paths],
               "num_processes": accelerator.num_processes,
               "quality_report": None if report is None else {k: str(v) for k, v in report.items()}}
    _print(accelerator, f"codi: done: {step} steps ({step - start_step} this run) in {elapsed:.1f} s "
                        f"({(step - start_step) / max(elapsed, 1e-9):.2f} it/s), peak memory "
                        f"{peak / memory.GIB:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'} during "
                        f"training); "
                        f"adapter: {', '.join(summary['adapter'])}")
    accelerator.end_training()
    return summary


def save_state_folder(args, name, trainable, ema, optimizer, lr_scheduler, step, micro_step, epoch, position):
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    folder = Path(args.output_dir) / name
    state.save_training_state(folder, trainable, ema, inner, lr_scheduler,
                              {"step": step, "micro_step": micro_step, "epoch": epoch, "position": position,
                               "adapter_type": args.adapter_type, "seed": args.seed})
    return folder


def nan_stop(args, models, ema, step, last_saved, diag, dataset, resolution, accelerator) -> TrainingStopped:
    """Stop on a non-finite loss: nothing of this step was applied, so the current EMA weights are the last good
    ones; write them (step ``step``) and say where they are."""
    kept = []
    if accelerator.is_main_process:
        kept = save_adapter_files(args, models, ema, step, dataset, resolution, suffix="-last-good")
    where = ", ".join(str(p) for p in kept) or "(not written on this process)"
    earlier = f"; earlier saves: {', '.join(str(p) for p in last_saved)}" if last_saved else ""
    return TrainingStopped(
        f"loss is not finite at step {step + 1} (consistency {diag['loss_consistency']:.4g}, guidance "
        f"{diag['loss_guidance']:.4g}, t={diag['t'][0]}). Training stopped; the last good adapter (EMA weights "
        f"after step {step}) is kept at {where}{earlier}. Try a lower --learning_rate, --mixed_precision bf16 "
        f"instead of fp16, or --max_grad_norm 1.0.")


class ema_unet_lora:
    """Evaluate the UNet LoRA with its EMA weights (the LoRA lives inside the shared UNet, so swap it in)."""

    def __init__(self, models: Models, ema: cs.EMA):
        self.models, self.ema = models, ema

    def __enter__(self):
        if self.models.unet_lora is None:
            return
        self.params = {n: p for n, p in self.models.trainable.items() if n.startswith("unet_lora.")}
        self.backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.ema.shadow[n])

    def __exit__(self, *exc):
        if self.models.unet_lora is None:
            return
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.backup[n])


class unet_lora_disabled:
    """The frozen base: the UNet with its LoRA switched off."""

    def __init__(self, models: Models):
        self.lora = models.unet_lora

    def __enter__(self):
        if self.lora is not None:
            self.lora.set_enabled(False)

    def __exit__(self, *exc):
        if self.lora is not None:
            self.lora.set_enabled(True)


def weights_checksum(trainable: dict, ema: cs.EMA) -> str:
    digest = hashlib.sha256()
    for name in sorted(trainable):
        for tensor in (trainable[name], ema.shadow[name]):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def reset_peak_memory(device) -> None:
    """Start measuring the peak from here: CUDA's allocator peak, or (CPU) the process's peak RSS, which Linux resets
    when ``5`` is written to ``/proc/self/clear_refs``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # not Linux: the peak then covers model loading too


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ samples, dry run


@torch.no_grad()
def generate_samples(args, models, ema, schedule, prompts, step, resolution, device, text_cache) -> list[Path]:
    """Render the sample prompts with the EMA adapter and the CoDi sampler at the recommended steps."""
    base = models.base
    if base.vae is None and base.latent_downscale != 1:  # an SD checkpoint without its VAE: nothing to decode with
        return []
    out = []
    for number, sample in enumerate(prompts):
        hint = load_condition(sample, resolution).to(device, base.unet.dtype)
        text = (text_cache.get([sample.prompt], device) if text_cache and sample.prompt in text_cache.outputs
                else base.encode_text([sample.prompt], device=device))
        cfg = sample.cfg if sample.cfg is not None else 1.0
        uncond = None
        if cfg != 1.0:
            neg = (text_cache.get([sample.negative], device)
                   if text_cache and sample.negative in text_cache.outputs
                   else base.encode_text([sample.negative], device=device))
            uncond = text_conditioning(neg, hint)
        generator = torch.Generator().manual_seed(sample.seed if sample.seed is not None else args.seed + number)
        h, w = hint.shape[-2] // base.latent_downscale, hint.shape[-1] // base.latent_downscale
        noise = torch.randn((1, base.unet.config.in_channels, h, w), generator=generator).to(device, base.unet.dtype)
        steps = sample.steps or min(args.recommended_steps, 8)

        def denoise(z, t, cond):
            with ema_unet_lora(models, ema):
                return adapter_lib.adapted_unet_output(base.unet, models.target_adapter, z, t, cond)

        latents = cs.sample(denoise, noise, cs.codi_timesteps(steps, grid=args.distill_grid), base.prediction_type,
                            schedule=schedule, mode=args.sample_sampler, cond=text_conditioning(text, hint),
                            uncond=uncond, cfg=cfg, generator=generator, boundary=not args.no_boundary,
                            sigma_data=args.sigma_data, timestep_scaling=args.timestep_scaling)
        image = base.decode_latents(latents)
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        path = Path(args.output_dir) / "sample" / f"{args.output_name}_step{step:08d}_{number:02d}.png"
        save_image_grid(torch.cat([hint.float().cpu(), image.cpu()]), path)
        out.append(path)
    return out


def run_quality_report(args, models, ema, validation_dataset, text_cache, device) -> dict:
    """Score the EMA adapter on the validation pairs (``trainer/quality.py``) and write the report files."""
    from trainer.quality import evaluate_adapter, validation_pairs, write_report

    pairs = validation_pairs(validation_dataset, args.quality_max_pairs)
    # with --cache_text_encoder_outputs the text encoders are freed by now: read the cached outputs instead
    encode_text = None if text_cache is None else (lambda prompts, device=None, size=None:
                                                   text_cache.get(prompts, device))
    with ema_unet_lora(models, ema):
        result = evaluate_adapter(models.base, models.target_adapter, pairs, task=args.task,
                                  steps=args.quality_report_steps, grid=args.distill_grid,
                                  sampler_mode=args.sample_sampler, boundary=not args.no_boundary,
                                  sigma_data=args.sigma_data, timestep_scaling=args.timestep_scaling, seed=args.seed,
                                  reference_steps=args.quality_reference_steps, device=device,
                                  encode_text=encode_text)
    return write_report(result, Path(args.output_dir) / f"{args.output_name}-report",
                        title=f"CoDi quality report: {args.output_name} ({args.task}, step {ema.num_updates})")


def predict_memory(args, models, optimizer, resolution, weight_dtype, device) -> memory.MemoryPrediction:
    base = models.base
    trainable_count = sum(p.numel() for p in models.trainable.values())
    train_bytes = 2 if (args.full_fp16 or args.full_bf16) else 4
    frozen = memory.frozen_bytes([base.unet, models.adapter, base.vae, *base.text_encoders])
    compute_bytes = torch.tensor([], dtype=weight_dtype).element_size()
    text = base.encode_text([""] * args.train_batch_size, device=device)

    def probe(h, w):
        z = torch.randn(args.train_batch_size, base.unet.config.in_channels, h, w, device=device, dtype=weight_dtype)
        down = base.latent_downscale  # 1 for a pixel-space base bundle
        hint = torch.rand(args.train_batch_size, 3, h * down, w * down, device=device, dtype=weight_dtype)
        t = torch.full((args.train_batch_size,), 500, device=device)
        cond = text_conditioning(text, hint)
        return memory.saved_activation_bytes(
            lambda: adapter_lib.adapted_unet_output(base.unet, models.adapter, z, t, cond), compute_bytes)

    activations = memory.extrapolate_activations(probe, resolution, downscale=base.latent_downscale)
    return memory.MemoryPrediction(
        frozen_weights=frozen, trainable_weights=trainable_count * train_bytes,
        gradients=trainable_count * train_bytes,
        optimizer_state=int(trainable_count * optimizer_state_bytes_per_param(args.optimizer_type)),
        ema=trainable_count * 4, activations=activations)


def main(argv=None) -> int:
    from trainer.config import parse_args, to_toml

    args = parse_args(argv)
    if args.output_config is not None:
        path = Path(args.output_config or Path(args.output_dir) / f"{args.output_name}.toml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_toml(args))
        print(f"codi: wrote the effective configuration to {path}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train(args)
    except TrainingStopped as exc:
        print(f"codi: error: {exc}", file=sys.stderr, flush=True)
        return 3
    except (DataError, state.StateError, cs.MetadataError) as exc:
        print(f"codi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # checkpoint errors and other user-facing ValueErrors
        from trainer.checkpoints import CheckpointError

        if isinstance(exc, CheckpointError):
            print(f"codi: error: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
    return 0
