"""Optimizers (kohya names) and learning-rate schedules."""

from __future__ import annotations

import ast

import torch

from trainer.errors import CodiError


def parse_optimizer_args(pairs: list[str]) -> dict:
    """``["weight_decay=0.01", "betas=0.9,0.99"]`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.99)}``."""
    out = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"--optimizer_args entries must be KEY=VALUE, got {pair!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # a bare word, e.g. a string option
        out[key.strip()] = parsed
    return out


def build_optimizer(name: str, params, lr: float, extra: dict | None = None) -> torch.optim.Optimizer:
    """AdamW (torch), AdamW8bit / PagedAdamW8bit / Lion8bit / Lion (bitsandbytes), Adafactor (transformers)."""
    extra = dict(extra or {})
    params = list(params)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, **extra)
    if name in ("AdamW8bit", "PagedAdamW8bit", "Lion8bit", "Lion"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise CodiError(f"--optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from None
        cls = {"AdamW8bit": bnb.optim.AdamW8bit, "PagedAdamW8bit": bnb.optim.PagedAdamW8bit,
               "Lion8bit": bnb.optim.Lion8bit, "Lion": bnb.optim.Lion}[name]
        return cls(params, lr=lr, **extra)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        extra.setdefault("scale_parameter", False)
        extra.setdefault("relative_step", False)
        extra.setdefault("warmup_init", False)
        return Adafactor(params, lr=lr, **extra)
    raise ValueError(f"unknown optimizer {name!r}")


def build_lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def optimizer_state_bytes_per_param(name: str) -> float:
    """Bytes of optimizer state per trainable parameter (for the --dry_run memory prediction)."""
    return {"AdamW": 8.0, "AdamW8bit": 2.0, "PagedAdamW8bit": 2.0, "Lion8bit": 1.0, "Lion": 4.0,
            "Adafactor": 4.0}[name]
