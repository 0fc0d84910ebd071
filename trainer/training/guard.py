"""What keeps a run from losing work: checks of the output folder before anything is loaded, a lock so two trainers
never write one output name, what a run is (its identity) for ``--resume`` to compare, and Ctrl-C / SIGTERM handling
that saves a resumable state instead of dying with a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from trainer.errors import CodiError
from trainer.training.config import SAFE_RESUME_CHANGES
from trainer.training.settings import Settings

GIB = 1024 ** 3
# Defaults that changed (old, new): a state written before the change resumes only with the old value, and the error
# says which flag restores it (ε-space consistency became the default after the miniature benchmark's ablation).
CHANGED_DEFAULTS = {"consistency_space": ("x", "eps")}


class OutputError(CodiError):
    """The output folder cannot take the run's files."""


class Interrupted(CodiError):
    """Ctrl-C or SIGTERM: the message says what was saved and how to continue."""

    exit_code = 130


def check_output_folder(output_dir: str) -> None:
    """Create ``output_dir`` and write a probe file in it, before any model is loaded: a folder under a file, a
    read-only folder or a missing mount stops the run now, with everything still to do."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".codi-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"--output_dir {folder}: cannot write there ({exc.strerror or exc}); choose a folder you "
                          "can write to") from None


def check_free_space(output_dir: str, needed_bytes: int) -> None:
    """Stop before training when the output folder's disk cannot hold what the run will write."""
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OutputError(f"--output_dir {output_dir}: {free / GIB:.2f} GiB free, but this run writes about "
                          f"{needed_bytes / GIB:.2f} GiB (adapter files, states); free space or use "
                          "--save_last_n_steps / fewer --save_every_n_steps")


def expected_bytes(trainable_params: int, save_bytes_per_param: int, optimizer_bytes_per_param: float,
                   saves: int, states: int) -> int:
    """What a run writes at most at one time: ``saves`` adapter files and ``states`` resumable states (weights +
    EMA in float32 and the optimizer state), with 10 % to spare."""
    adapter = trainable_params * save_bytes_per_param
    state = trainable_params * (8 + optimizer_bytes_per_param)
    return int(1.1 * (saves * adapter + states * state))


class OutputLock:
    """``<output_dir>/.<output_name>.lock`` while a run writes that name: a second trainer on the same name stops
    with the first one's process id instead of mixing files with it. A lock left by a process that no longer runs
    is taken over."""

    def __init__(self, output_dir: str, output_name: str):
        self.path = Path(output_dir) / f".{output_name}.lock"
        self.held = False

    def __enter__(self):
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text().split() if self.path.is_file() else []
                if owner and owner[1:] == [socket.gethostname()] and not _alive(int(owner[0])):
                    self.path.unlink(missing_ok=True)  # stale: that process is gone
                    continue
                who = f"process {owner[0]} on {owner[1]}" if len(owner) == 2 else "another process"
                raise OutputError(f"{who} is already writing `{self.path.stem[1:]}` in {self.path.parent} (lock "
                                  f"{self.path}); wait for it, or pick another --output_name or --output_dir") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(me)
            self.held = True
            return self
        raise OutputError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_identity(settings: Settings, adapter_type: str, base_hash: str) -> dict:
    """The settings that make a run what it is: resuming with another value would continue a different run (or
    fail deep inside the optimizer), so ``--resume`` compares them."""
    data, codi, opt = settings.data, settings.codi, settings.optimizer
    adapter = asdict(settings.adapter)
    return {"base": os.path.basename(str(settings.model.pretrained_model_name_or_path)), "base_hash": base_hash,
            "clip_skip": settings.model.clip_skip, "zero_terminal_snr": settings.model.zero_terminal_snr,
            "task": data.task, "resolution": list(data.resolution) if data.resolution else None,
            "train_data_dir": data.train_data_dir, "conditioning_data_dir": data.conditioning_data_dir,
            "dataset_config": data.dataset_config, "condition_args": list(data.condition_args),
            "sr_scale": data.sr_scale, "canny_low": data.canny_low, "canny_high": data.canny_high,
            "train_batch_size": settings.run.train_batch_size,
            "gradient_accumulation_steps": settings.run.gradient_accumulation_steps, "seed": settings.run.seed,
            "adapter_type": adapter_type, "network_dim": adapter["network_dim"],
            "network_alpha": adapter["network_alpha"], "unet_lora_dim": adapter["unet_lora_dim"],
            "conditioning_embedding_channels": list(adapter["conditioning_embedding_channels"]),
            "optimizer_type": opt.optimizer_type, "optimizer_args": list(opt.optimizer_args),
            "learning_rate": opt.learning_rate, "lr_scheduler": opt.lr_scheduler,
            "lr_warmup_steps": opt.lr_warmup_steps,
            "max_grad_norm": opt.max_grad_norm, "mixed_precision": settings.run.mixed_precision,
            "loss": codi.loss, "distill_grid": codi.distill_grid, "shared_timestep": codi.shared_timestep,
            "ode_model": codi.ode_model, "eps_source": codi.eps_source, "consistency_space": codi.consistency_space,
            "guidance_weight": codi.guidance_weight, "cfg_range": list(codi.cfg_range) if codi.cfg_range else None,
            "ema_decay": codi.ema_decay, "ema_warmup": codi.ema_warmup, "no_boundary": codi.no_boundary}


def check_resume_identity(saved: dict | None, now: dict, allowed: tuple[str, ...], folder) -> list[str]:
    """Compare the identity saved in a state with this run's; returns the differences allowed by
    ``--resume_changes``, raises one error naming every other one."""
    if saved is None:
        return []
    differences = {k: (saved.get(k), now[k]) for k in now if k in saved and saved.get(k) != now[k]}
    refused = {k: v for k, v in differences.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {old!r} in the state, {new!r} now" for k, (old, new) in refused.items())
        safe = [k for k in refused if k in SAFE_RESUME_CHANGES]
        hint = (f" To continue anyway with the new value of {', '.join(safe)}, add --resume_changes "
                f"{','.join(safe)}." if safe else "")
        old_defaults = [f"--{k} {old}" for k, (old, new) in refused.items() if CHANGED_DEFAULTS.get(k) == (old, new)]
        if old_defaults:
            hint += (f" The default changed since the state was written: add {' '.join(old_defaults)} to continue "
                     "that run.")
        raise CodiError(f"--resume {folder}: this run differs from the one that wrote the state ({listed}). Resume "
                        f"with the same settings, or start a new run.{hint}")
    return sorted(differences)


class Interrupts:
    """Within the block, the first Ctrl-C (SIGINT) or SIGTERM sets :attr:`requested` -- the loop saves a resumable
    state after the step in progress and stops -- and a second one ends the process at once."""

    def __init__(self):
        self.requested: str | None = None
        self.armed = False  # before training starts there is nothing to save: the first signal stops at once
        self.previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(f"{name} before training started: stopped, nothing was written")
        if self.requested:
            sys.stderr.write(f"\ncodi: {name} again: stopping now, without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self.requested = name
        sys.stderr.write(f"\ncodi: {name}: saving a resumable state after this step (press Ctrl-C again to stop "
                         "without saving)\n")
        sys.stderr.flush()

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a notebook's worker): keep the default handling
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
