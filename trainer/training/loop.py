"""The CoDi training loop: set a run up, repeat the CoDi step, save and report.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Each micro-batch draws its timesteps, noise and
(CFG) guidance scales from a generator seeded by ``(seed, micro-batch index, rank)``, and the data order is a function
of ``(seed, epoch)``, so a run resumed from a saved state continues exactly as if it had never stopped. The step
itself (``ccd_sampler.codi_loss``) is written out in ``docs/algorithm.md``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ccd_sampler as cs
from trainer.adapters.controlnet import text_conditioning
from trainer.data.caches import LatentCache, TextCache, cat_tree, encode_latents
from trainer.data.dataset import EpochBatches, build_datasets, collate
from trainer.data.prompts import read_prompt_file
from trainer.data.errors import DataError
from trainer.models import model_hash
from trainer.training import guard, memory, state
from trainer.training.networks import DTYPES, Networks, OnlineModel, build_networks, tie_target_to_ema
from trainer.training.optim import (build_lr_scheduler, build_optimizer, optimizer_state_bytes_per_param,
                                    parse_optimizer_args)
from trainer.training.samples import generate_samples, run_quality_report
from trainer.training.saving import (DIVERGED_MAGNITUDE, AdapterWriter, TrainingStopped, diverged, non_finite_loss,
                                     provenance, prune_step_saves, save_state_folder, step_suffix)
from trainer.training.settings import Settings

NAN_AT_STEP_ENV = "CODI_DEBUG_NAN_AT_STEP"  # tests: make the loss NaN at this optimizer step


@dataclass
class Run:
    """Everything a run carries from one step to the next."""

    settings: Settings
    accelerator: object
    networks: Networks
    ema: cs.EMA
    optimizer: object
    schedule: cs.NoiseSchedule
    weight_dtype: torch.dtype
    resolution: tuple[int, int]
    dataset: object = None
    validation_dataset: object = None
    batches: EpochBatches | None = None
    lr_scheduler: object = None
    max_steps: int = 0
    latent_cache: LatentCache | None = None
    text_cache: TextCache | None = None
    uncond_text: dict | None = None
    loss_config: cs.CoDiLossConfig | None = None
    writer: AdapterWriter | None = None
    sample_prompts: list | None = None
    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    position: int = 0
    losses: list = field(default_factory=list)
    last_saved: list = field(default_factory=list)
    diag: dict = field(default_factory=dict)  # the last step's loss diagnostics
    identity: dict = field(default_factory=dict)  # what --resume compares (guard.run_identity)

    @property
    def device(self):
        return self.accelerator.device

    def say(self, *parts) -> None:
        if self.accelerator.is_main_process:
            print(*parts, flush=True)

    def progress(self) -> dict:
        return {"step": self.step, "micro_step": self.micro_step, "epoch": self.epoch, "position": self.position,
                "adapter_type": self.networks.adapter_type, "seed": self.settings.run.seed,
                "identity": self.identity}


# ------------------------------------------------------------------------------------------------ setup


def start_run(settings: Settings) -> Run:
    """Accelerator, networks, EMA and optimizer: enough for ``--dry_run``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    run_settings = settings.run
    # accelerate keeps a process-wide singleton; a second train() in the same process (tests, notebooks) with other
    # precision settings must start from a clean one.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(gradient_accumulation_steps=run_settings.gradient_accumulation_steps,
                              mixed_precision=run_settings.mixed_precision, log_with=_trackers(run_settings.log_with),
                              project_dir=run_settings.logging_dir or os.path.join(run_settings.output_dir, "logs"))
    set_seed(run_settings.seed)
    weight_dtype = DTYPES[run_settings.mixed_precision]
    print_main = accelerator.is_main_process
    if print_main:
        print(f"codi: {accelerator.num_processes} process(es), device {accelerator.device}, mixed precision "
              f"{run_settings.mixed_precision}, num_processes == {accelerator.num_processes}", flush=True)
    networks = build_networks(settings.model, settings.adapter, accelerator.device, weight_dtype)
    base = networks.base
    resolution = settings.data.resolution or (base.default_resolution, base.default_resolution)
    ema = cs.EMA(networks.trainable, decay=settings.codi.ema_decay,
                 warmup=settings.codi.ema_warmup).to(accelerator.device)
    tie_target_to_ema(networks, ema)
    opt = settings.optimizer
    optimizer = build_optimizer(opt.optimizer_type, networks.trainable.values(), opt.learning_rate,
                                parse_optimizer_args(list(opt.optimizer_args)))
    return Run(settings=settings, accelerator=accelerator, networks=networks, ema=ema, optimizer=optimizer,
               schedule=base.noise_schedule(), weight_dtype=weight_dtype, resolution=resolution)


def _trackers(log_with: str | None):
    return None if log_with is None else (["tensorboard", "wandb"] if log_with == "all" else log_with)


def prepare_training(run: Run) -> None:
    """Data, batches, LR schedule, the DDP-wrapped online model, caches, the adapter writer, a resumed state."""
    settings, accelerator, networks = run.settings, run.accelerator, run.networks
    base, device = networks.base, run.device
    run.dataset, run.validation_dataset = build_datasets(settings.data, run.resolution)
    run.resolution = run.dataset.resolution  # a dataset TOML may set it
    run.say("codi: " + run.dataset.summary())
    if run.validation_dataset is not None:
        run.say("codi: " + run.validation_dataset.summary())
    run.batches = EpochBatches.from_dataset(run.dataset, settings.run.train_batch_size, settings.run.seed,
                                            accelerator.num_processes, accelerator.process_index)
    steps_per_epoch = max(1, len(run.batches) // settings.run.gradient_accumulation_steps)
    run.max_steps = (settings.run.max_train_steps if settings.run.max_train_epochs is None
                     else settings.run.max_train_epochs * steps_per_epoch)
    run.lr_scheduler = build_lr_scheduler(settings.optimizer.lr_scheduler, run.optimizer,
                                          settings.optimizer.lr_warmup_steps, run.max_steps)
    networks.online, run.optimizer = accelerator.prepare(OnlineModel(base.unet, networks.adapter), run.optimizer)

    if settings.run.cache_latents or settings.run.cache_latents_to_disk:
        run.latent_cache = LatentCache(run.dataset, base, seed=settings.run.seed,
                                       to_disk=settings.run.cache_latents_to_disk,
                                       is_main_process=accelerator.is_main_process)
        run.say(f"codi: cached latents for {len(run.dataset)} images ({run.latent_cache.encoded} encoded, "
                f"{run.latent_cache.loaded} read from disk)")
    if settings.run.cache_text_encoder_outputs:
        captions = [item.caption for item in run.dataset.items]
        if run.validation_dataset is not None:
            captions += [item.caption for item in run.validation_dataset.items]
        run.text_cache = TextCache(base, captions, device)
        base.text_encoders.clear()
        gc.collect()
    run.uncond_text = encode_text(run, [""])
    run.loss_config = settings.codi.loss_config(base.prediction_type)
    base_hash = model_hash(settings.model.pretrained_model_name_or_path)[:12]
    run.writer = AdapterWriter(settings.save, settings.codi, networks, run.dataset, run.resolution,
                               provenance(settings, networks.adapter_type, len(run.dataset.items), run.resolution,
                                          base_hash),
                               (settings.adapter.unet_lora_dim, settings.adapter.unet_lora_alpha))
    run.identity = guard.run_identity(settings, networks.adapter_type, base_hash)
    if accelerator.is_main_process:
        guard.check_free_space(settings.save.output_dir, expected_output_bytes(run))

    if settings.run.resume:
        folder = Path(settings.run.resume)
        changed = guard.check_resume_identity(state.read_progress(folder).get("identity"), run.identity,
                                              settings.run.resume_changes, folder)
        if changed:
            run.say(f"codi: resuming with changed {', '.join(changed)} (--resume_changes)")
        inner = run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer
        progress = state.load_training_state(folder, networks.trainable, run.ema, inner, run.lr_scheduler)
        run.step, run.micro_step = progress["step"], progress["micro_step"]
        run.epoch, run.position = progress["epoch"], progress["position"]
        run.say(f"codi: resumed from {settings.run.resume} at step {run.step} (epoch {run.epoch}, batch "
                f"{run.position})")
    if accelerator.is_main_process and settings.run.log_with:
        accelerator.init_trackers(settings.run.log_prefix or "codi", config=settings.flags)


def expected_output_bytes(run: Run) -> int:
    """The most a run keeps on disk at one time: its adapter saves and resumable states."""
    save, trainable = run.settings.save, sum(p.numel() for p in run.networks.trainable.values())
    every = save.save_every_n_steps
    kept = run.max_steps // every if every else 0
    if every and save.save_last_n_steps:
        kept = min(kept, save.save_last_n_steps // every + 1)
    states = (kept if save.save_state else 0) + int(save.save_state or save.save_state_on_train_end)
    return guard.expected_bytes(trainable, {"float": 4}.get(save.save_precision, 2),
                                optimizer_state_bytes_per_param(run.settings.optimizer.optimizer_type),
                                saves=kept + 2, states=states)


def encode_text(run: Run, captions: list[str]) -> dict:
    """Text conditioning of ``captions``: from the text cache when the encoders were freed for it."""
    if run.text_cache is not None:
        return run.text_cache.get(captions, run.device)
    return run.networks.base.encode_text(captions, device=run.device)


# ------------------------------------------------------------------------------------------------ the step


def micro_batch_loss(run: Run, indices: list[int]) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch (CoDi, or the plain diffusion loss of the ``--loss diffusion`` baseline)."""
    settings, networks, device = run.settings, run.networks, run.device
    batch = collate([run.dataset.get(i, run.epoch, pixels=run.latent_cache is None) for i in indices])
    if run.latent_cache is not None:
        latents = run.latent_cache.get(indices, batch["flip"]).to(device, run.weight_dtype)
    else:
        latents = encode_latents(networks.base.vae, batch["pixel_values"], indices, settings.run.seed,
                                 networks.base.vae_scaling_factor).to(device, run.weight_dtype)
    if not torch.isfinite(latents).all():
        vae = networks.base.vae
        raise TrainingStopped(
            f"the VAE encoded {', '.join(run.dataset.items[i].image_path.name for i in indices)} to non-finite "
            f"latents in {'float32' if vae is None else str(vae.dtype).replace('torch.', '')}: the VAE overflows in "
            "half precision; add --no_half_vae (or --cache_latents with it, to encode once)")
    hints = batch["hint"].to(device, run.weight_dtype)
    text = with_size_conditioning(encode_text(run, batch["caption"]), batch["size_cond"])
    cond = text_conditioning(text, hints)
    uncond = None
    if settings.codi.cfg_range:
        uncond_text = with_size_conditioning(cat_tree([run.uncond_text] * len(indices)), batch["size_cond"])
        uncond = text_conditioning(uncond_text, hints)
    generator, timestep_generator = step_generators(settings.run.seed, run.micro_step, run.accelerator.process_index)
    # torch's own autocast rather than accelerate's, which is a no-op for fp16 on a CPU: the Control-LoRA's frozen
    # half-precision encoder and its float32 LoRA factors meet inside one module, so every device needs it
    half = run.weight_dtype != torch.float32
    with torch.autocast(run.device.type, dtype=run.weight_dtype, enabled=half):
        if settings.codi.loss == "diffusion":
            return cs.diffusion_loss(networks.denoiser("online"), latents, cond, run.schedule,
                                     networks.base.prediction_type, generator=generator)
        return cs.codi_loss(networks.denoiser("online"), networks.denoiser("target", run.ema), latents, cond,
                            run.loss_config, run.schedule, base=networks.denoiser("base"), uncond=uncond,
                            generator=generator, teacher=networks.denoiser("teacher"),
                            timestep_generator=timestep_generator if settings.codi.shared_timestep else None)


def step_generators(seed: int, micro_step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """``(noise generator, timestep generator)`` of one micro-batch: a pure function of its arguments, so a resumed
    run draws what an uninterrupted one would. The noise differs per process; the timestep generator is the same on
    every process, so one t per batch is one t for all of them."""
    return (torch.Generator().manual_seed(hash((seed, micro_step, rank)) % (2**63)),
            torch.Generator().manual_seed(hash((seed, micro_step, -1)) % (2**63)))


def with_size_conditioning(text: dict, size_cond: torch.Tensor) -> dict:
    """SDXL's text conditioning with each sample's own size conditioning (original size, crop, target size) as
    ``time_ids``, instead of the default resolution the text encoder's output carries; other bases unchanged."""
    added = text.get("added_cond_kwargs")
    if added is None:
        return text
    time_ids = size_cond.to(added["time_ids"].device, added["time_ids"].dtype)
    return {**text, "added_cond_kwargs": {**added, "time_ids": time_ids}}


def training_step(run: Run, nan_at: int = 0) -> bool:
    """One micro-batch: forward, backward and (at the end of an accumulation window) the optimizer update. Returns
    True when an optimizer step completed. A non-finite loss on any rank stops the run with the last good adapter
    written."""
    accelerator, trainable = run.accelerator, run.networks.trainable
    if run.position >= len(run.batches):
        run.epoch, run.position = run.epoch + 1, 0
    run.dataset.set_epoch(run.epoch)
    indices = run.batches.batch(run.epoch, run.position)
    with accelerator.accumulate(run.networks.online):
        try:
            loss, diag = micro_batch_loss(run, indices)
        except DataError as exc:  # a file that became unreadable since the checks before training
            raise stop_with_state(run, f"{exc}") from None
        if nan_at and run.step + 1 == nan_at:
            loss = loss * float("nan")
        finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1).float()).min().item() == 1.0
        if not finite:
            kept = run.writer.save(run.ema, run.step, suffix="-last-good") if accelerator.is_main_process else []
            raise non_finite_loss(run.step, diag, kept, run.last_saved)
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.settings.optimizer.max_grad_norm:
            accelerator.clip_grad_norm_(list(trainable.values()), run.settings.optimizer.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.micro_step += 1
    run.position += 1
    run.losses.append(float(loss.detach()))
    if not accelerator.sync_gradients:
        return False
    bad = diverged(trainable)
    if bad:
        # a finite loss can still come with an update that overflows the weights (--learning_rate 1e30): the EMA
        # has not taken this step yet, so it is the last good adapter
        kept = run.writer.save(run.ema, run.step, suffix="-last-good") if accelerator.is_main_process else []
        raise TrainingStopped(
            f"the weights diverged in the update of step {run.step + 1} ({len(bad)} tensors not finite or above "
            f"{DIVERGED_MAGNITUDE:g}; the loss was "
            f"{run.losses[-1]:.4g}): training stopped; the last good adapter (EMA weights after step {run.step}) is "
            f"kept at {', '.join(map(str, kept)) or '(main process)'}. Try a lower --learning_rate or "
            "--max_grad_norm 1.0")
    run.lr_scheduler.step()
    run.ema.update(trainable)
    run.step += 1
    run.diag = diag
    return True


def stop_with_state(run: Run, why: str, error=TrainingStopped) -> Exception:
    """Save the adapter so far and a resumable state (also without ``--save_state``), then the error to raise: it
    says what happened, where everything is and how to continue."""
    if not run.accelerator.is_main_process:
        return error(why)
    try:
        adapters, folder = save_step(run, adapter=run.step > 0)
    except OSError as exc:
        adapters, folder = rescue(run, exc)
    kept = f"the adapter so far is {adapters[0]}; " if adapters else ""
    return error(f"{why}. Stopped after step {run.step}: {kept}continue with --resume {folder}")


def rescue(run: Run, exc: OSError) -> tuple[list[Path], Path]:
    """Saving in the output folder failed (disk full, folder gone): the adapter and the state go to a folder of
    the temporary directory instead, so the training is not lost."""
    save = run.settings.save
    folder = Path(tempfile.gettempdir()) / f"codi-rescue-{save.output_name}-{guard.timestamp()}"
    run.say(f"codi: could not write in {save.output_dir} ({exc.strerror or exc}): saving to {folder} instead")
    return save_step(run, folder=folder)


def save_step(run: Run, folder: Path | None = None, adapter: bool = True, with_state: bool = True
              ) -> tuple[list[Path], Path | None]:
    """The EMA adapter after this step (``<output_name>-stepNNNNNNNN.safetensors``; not with ``adapter`` False) and
    its resumable state (``...-stepNNNNNNNN-state``; not with ``with_state`` False), in the output folder or in
    ``folder``; returns ``(adapter paths, state folder or None)``. An OSError (disk full, folder gone) propagates."""
    save, suffix = run.settings.save, step_suffix(run.step)
    adapters = run.writer.save(run.ema, run.step, suffix=suffix, folder=folder) if adapter else []
    state_folder = None
    if with_state:
        state_folder = save_state_folder(save, f"{save.output_name}{suffix}-state", run.networks.trainable,
                                         run.ema, run.optimizer, run.lr_scheduler, run.progress(), folder=folder)
    return adapters, state_folder


def after_step(run: Run, progress_bar) -> None:
    """Progress, logs, periodic saves and samples after an optimizer step."""
    settings, accelerator = run.settings, run.accelerator
    lr = run.lr_scheduler.get_last_lr()[0]
    window = run.losses[-settings.run.gradient_accumulation_steps:]
    logs = {"loss": sum(window) / len(window), "loss_consistency": run.diag["loss_consistency"],
            "loss_guidance": run.diag["loss_guidance"], "lr": lr, "t": run.diag["t"][0]}
    progress_bar.update(1)
    progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
    if settings.run.log_with:
        accelerator.log(logs, step=run.step)
    save = settings.save
    if save.save_every_n_steps and run.step % save.save_every_n_steps == 0 and run.step < run.max_steps:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            try:
                run.last_saved, _ = save_step(run, with_state=save.save_state)
            except OSError as exc:
                adapters, folder = rescue(run, exc)
                raise TrainingStopped(f"could not save step {run.step} in {save.output_dir} ({exc.strerror or exc}); "
                                      f"the adapter so far is {adapters[0]}, continue with --resume {folder} once "
                                      "there is room") from None
            prune_step_saves(save, run.step)
    every = settings.samples.sample_every_n_steps
    if run.sample_prompts and every and run.step % every == 0:
        render_samples(run)


def render_samples(run: Run) -> None:
    settings = run.settings
    generate_samples(run.networks, run.ema, settings.codi, run.sample_prompts, run.step, run.resolution, run.device,
                     run.text_cache, seed=settings.run.seed, out_dir=Path(settings.save.output_dir),
                     name=settings.save.output_name)


# ------------------------------------------------------------------------------------------------ the run


def train(settings: Settings) -> dict:
    """Train an adapter; returns a summary (steps, seconds, peak memory, files written). The output folder is
    checked and locked before anything is loaded; Ctrl-C / SIGTERM save a resumable state."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    if not settings.run.dry_run:
        guard.check_output_folder(settings.save.output_dir)
    prompts = None
    if settings.samples.sample_prompts:  # every line checked before the models load
        prompts = read_prompt_file(settings.samples.sample_prompts, max_steps=min(8, settings.codi.distill_grid))
    lock = guard.OutputLock(settings.save.output_dir, settings.save.output_name) \
        if main_process and not settings.run.dry_run else contextlib.nullcontext()
    with lock, guard.Interrupts() as interrupts:
        if main_process and not settings.run.dry_run:
            for line in state.recover_interrupted_saves(settings.save.output_dir, settings.save.output_name):
                print(f"codi: {line}", flush=True)
        return _train(settings, interrupts, prompts)


def _train(settings: Settings, interrupts: guard.Interrupts, sample_prompts: list | None) -> dict:
    from tqdm.auto import tqdm

    run = start_run(settings)
    run.sample_prompts = sample_prompts
    networks, accelerator = run.networks, run.accelerator
    base = networks.base
    n_trainable, n_frozen = memory.count_parameters([base.unet, networks.adapter, *base.text_encoders, base.vae])
    detected = ", ".join(f"{k} from {v}" for k, v in base.detection.items())
    run.say(f"codi: base {base.architecture}: {base.prediction_type}"
            f"{', zero terminal SNR' if base.scheduler.get('rescale_betas_zero_snr') else ''} ({detected})")
    run.say(f"codi: base {base.architecture} ({base.prediction_type}), adapter {networks.adapter_type}"
            f"{' + UNet LoRA' if networks.unet_lora else ''}: {n_trainable:,} trainable, {n_frozen:,} frozen "
            "parameters")
    if settings.run.dry_run:
        return dry_run(run, n_trainable, n_frozen)

    prepare_training(run)
    if run.sample_prompts and settings.samples.sample_at_first and run.step == 0:
        render_samples(run)
    nan_at = int(os.environ.get(NAN_AT_STEP_ENV, "0") or 0)
    progress_bar = tqdm(total=run.max_steps, initial=run.step, disable=not accelerator.is_main_process,
                        desc="codi", dynamic_ncols=True)
    start_time, start_step = time.time(), run.step
    memory.reset_peak_memory(run.device)

    networks.online.train()
    interrupts.armed = True  # from here on a Ctrl-C saves the run instead of stopping at once
    while run.step < run.max_steps:
        if training_step(run, nan_at):
            after_step(run, progress_bar)
        if interrupts.requested and run.accelerator.sync_gradients:
            progress_bar.close()
            raise stop_with_state(run, f"{interrupts.requested} received", guard.Interrupted)
    progress_bar.close()
    return finish(run, time.time() - start_time, start_step)


def dry_run(run: Run, n_trainable: int, n_frozen: int) -> dict:
    settings = run.settings
    prediction = memory.predict_memory(run.networks, batch_size=settings.run.train_batch_size,
                                       optimizer_type=settings.optimizer.optimizer_type,
                                       resolution=run.resolution,
                                       weight_dtype=run.weight_dtype, device=run.device)
    run.say("codi: predicted memory for one training step "
            f"(batch {settings.run.train_batch_size}, {run.resolution[0]}x{run.resolution[1]}, "
            f"{settings.optimizer.optimizer_type}, gradient checkpointing "
            f"{'on' if settings.model.gradient_checkpointing else 'off'}):\n" + prediction.report())
    return {"trainable": n_trainable, "frozen": n_frozen, "memory": prediction}


def finish(run: Run, elapsed: float, start_step: int) -> dict:
    """The final adapter (and state), the last samples, the quality report, and the summary."""
    settings, accelerator = run.settings, run.accelerator
    save = settings.save
    accelerator.wait_for_everyone()
    final_paths = []
    if accelerator.is_main_process:
        try:
            final_paths = run.writer.save(run.ema, run.step)
            if save.save_state or save.save_state_on_train_end:
                save_state_folder(save, f"{save.output_name}-state", run.networks.trainable, run.ema,
                                  run.optimizer, run.lr_scheduler, run.progress())
        except OSError as exc:
            adapters, folder = rescue(run, exc)
            raise TrainingStopped(f"training finished but {save.output_dir} could not take the adapter "
                                  f"({exc.strerror or exc}): it is at {adapters[0]}, with a resumable state in "
                                  f"{folder}") from None
    if run.sample_prompts and settings.samples.sample_every_n_steps:
        render_samples(run)
    report = None
    if settings.report.quality_report and accelerator.is_main_process:
        report = run_quality_report(run.networks, run.ema, settings.codi, settings.report, run.validation_dataset,
                                    run.text_cache, run.device, seed=settings.run.seed,
                                    out_dir=Path(save.output_dir), name=save.output_name)
        run.say(f"codi: quality report: {report['report']} (plot {report['plot']}, grid {report['grid']})")
    # Every rank reports a checksum of its weights: equal lines mean the processes stayed in sync.
    print(f"codi: rank {accelerator.process_index}/{accelerator.num_processes} trainable-weights checksum "
          f"{weights_checksum(run.networks.trainable, run.ema)}", flush=True)
    peak = memory.peak_memory_bytes(run.device)
    steps = run.step - start_step
    summary = {"steps": run.step, "steps_this_run": steps, "seconds": elapsed,
               "peak_memory_gib": peak / memory.GIB, "final_loss": run.losses[-1] if run.losses else None,
               "first_loss": run.losses[0] if run.losses else None, "adapter": [str(p) for p in final_paths],
               "num_processes": accelerator.num_processes,
               "quality_report": None if report is None else {k: str(v) for k, v in report.items()}}
    run.say(f"codi: done: {run.step} steps ({steps} this run) in {elapsed:.1f} s ({steps / max(elapsed, 1e-9):.2f} "
            f"it/s), peak memory {peak / memory.GIB:.2f} GiB "
            f"({'GPU allocated' if run.device.type == 'cuda' else 'process RSS'} during training); "
            f"adapter: {', '.join(summary['adapter'])}")
    accelerator.end_training()
    return summary


def weights_checksum(trainable: dict, ema: cs.EMA) -> str:
    digest = hashlib.sha256()
    for name in sorted(trainable):
        for tensor in (trainable[name], ema.shadow[name]):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
