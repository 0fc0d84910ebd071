"""Full training state for ``--save_state`` / ``--resume``: live and EMA weights, optimizer, LR scheduler, RNG
states, step and data position. Written atomically (a temporary folder renamed into place), read without
unpickling anything but plain tensors/containers (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.disk import write_safetensors
from trainer.errors import CodiError

STATE_FILES = ("trainable.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
               "trainer_state.json")


class StateError(CodiError):
    """A state folder given to --resume is missing, incomplete or from a different setup."""


def save_training_state(folder: Path, trainable: dict[str, torch.Tensor], ema, optimizer, lr_scheduler,
                        progress: dict) -> Path:
    """Write the state to ``folder`` (replacing it atomically). ``progress`` is JSON: step, epoch, position, ..."""
    folder = Path(folder)
    # a name of this process's own: two trainers (or a killed one's leftovers) never share a temporary folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_safetensors({k: v.detach().float().cpu().contiguous() for k, v in trainable.items()},
                          tmp / "trainable.safetensors")
        write_safetensors({k: v.detach().cpu().contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**progress, "ema_num_updates": ema.num_updates,
                                                           "ema_decay": ema.decay, "ema_warmup": ema.warmup},
                                                          indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written state behind
        raise
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_interrupted_saves(output_dir, output_name: str) -> list[str]:
    """Tidy what a trainer killed inside :func:`save_training_state` left in ``output_dir`` for ``output_name``: its
    hidden ``.<state>.tmp-<pid>`` / ``.<state>.old-<pid>`` folders. When the state folder itself is missing, a
    complete temporary folder (killed just before the rename) or the previous one (killed between the two renames)
    becomes the state folder again, so nothing already saved is lost; the rest is removed. Call it only while holding
    the output lock (no other trainer is saving there). Returns one line per action, for the log."""
    pattern = re.compile(r"\.(" + re.escape(output_name) + r"(?:-step\d+)?-state)\.(tmp|old)-\d+")
    actions = []
    leftovers = sorted(Path(output_dir).glob(f".{output_name}*-state.*-*"), key=lambda p: ".old-" in p.name)
    for path in leftovers:  # complete temporaries first: they are newer than the old copies
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        target = path.with_name(match.group(1))
        if not target.exists() and all((path / f).is_file() for f in STATE_FILES):
            os.replace(path, target)
            actions.append(f"recovered {target.name} from {path.name}, left by an interrupted save")
        else:
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed {path.name}, left by an interrupted save")
    return actions


def latest_step_state(output_dir, output_name: str) -> Path | None:
    """The newest complete ``<output_name>-stepNNNNNNNN-state`` folder that ``--save_every_n_steps`` + ``--save_state``
    wrote in ``output_dir`` (a run killed while saving leaves an incomplete one, skipped), or None."""
    pattern = re.compile(re.escape(output_name) + r"-step(\d+)-state")
    found = []
    for path in Path(output_dir).glob(f"{output_name}-step*-state"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and all((path / f).is_file() for f in STATE_FILES):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def read_progress(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise StateError(f"--resume {folder}: not a folder (give a state folder written with --save_state)")
    missing = [name for name in STATE_FILES if not (folder / name).is_file()]
    if missing:
        raise StateError(f"--resume {folder}: incomplete state, missing {', '.join(missing)}")
    try:
        progress = json.loads((folder / "trainer_state.json").read_text())
        for key in ("step", "micro_step", "epoch", "position", "ema_decay", "ema_num_updates"):
            progress[key]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"--resume {folder}: trainer_state.json is damaged ({type(exc).__name__}: {exc}); resume "
                         "from an earlier state folder") from None
    return progress


def _read(folder: Path, name: str, reader):
    """One file of a state folder, or a :class:`StateError` naming it (truncated, overwritten, not ours)."""
    try:
        return reader(folder / name)
    except Exception as exc:  # safetensors, torch and pickle each raise their own types for a damaged file
        raise StateError(f"--resume {folder}: {name} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); resume from an earlier state folder") \
            from None


def load_training_state(folder: Path, trainable: dict[str, torch.nn.Parameter], ema, optimizer,
                        lr_scheduler) -> dict:
    """Restore everything saved by :func:`save_training_state` in place; returns the progress dict."""
    folder = Path(folder)
    progress = read_progress(folder)
    weights = _read(folder, "trainable.safetensors", lambda p: load_file(str(p)))
    if weights.keys() != trainable.keys():
        missing = sorted(trainable.keys() - weights.keys())[:5]
        extra = sorted(weights.keys() - trainable.keys())[:5]
        raise StateError(f"--resume {folder}: the saved weights belong to another adapter setup "
                         f"(missing {missing}, unexpected {extra}); resume with the same adapter flags")
    with torch.no_grad():
        for name, param in trainable.items():
            if param.shape != weights[name].shape:
                raise StateError(f"--resume {folder}: {name} has shape {tuple(weights[name].shape)} in the "
                                 f"state but {tuple(param.shape)} now (different --network_dim?)")
            param.copy_(weights[name].to(param.device, param.dtype))
    ema.load_state_dict({"decay": progress["ema_decay"], "num_updates": progress["ema_num_updates"],
                         "warmup": progress.get("ema_warmup", False),
                         "shadow": _read(folder, "ema.safetensors", lambda p: load_file(str(p)))})

    def torch_file(path):
        return torch.load(path, map_location="cpu", weights_only=True)

    try:
        optimizer.load_state_dict(_read(folder, "optimizer.pt", torch_file))
    except (KeyError, ValueError) as exc:  # another --optimizer_type wrote it
        raise StateError(f"--resume {folder}: the optimizer state does not fit this optimizer ({exc}); resume with "
                         "the --optimizer_type of the run that saved it") from None
    lr_scheduler.load_state_dict(_read(folder, "scheduler.pt", torch_file))
    rng = _read(folder, "rng.pt", torch_file)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return progress
