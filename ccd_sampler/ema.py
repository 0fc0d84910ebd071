"""Exponential moving average of trainable weights: ``psi^- <- mu_n psi^- + (1 - mu_n) psi``.

With ``warmup`` (the default) the decay of update ``n`` (0-based) is ``mu_n = min(mu, (1 + n) / (10 + n))``:
early updates move the average fast, so the saved weights are not mostly their initialisation -- without it, after
2,000 updates at ``mu = 0.999`` 13.5 % of every weight would still be its initial value (zero for a zero conv).

CoDi saves the EMA weights as the adapter, and (``ode_model="ema"``) also uses them as the ODE and target model.
The shadow copy is float32 whatever the training dtype, keyed by parameter name so it survives a save/resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _named(params) -> list[tuple[str, torch.nn.Parameter]]:
    if isinstance(params, torch.nn.Module):
        return [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    if isinstance(params, dict):
        return list(params.items())
    return list(params)


class EMA:
    """EMA of named parameters.

    ``params`` is a module (its trainable parameters), a ``{name: parameter}`` dict or an iterable of
    ``(name, parameter)`` pairs. ``update(params)`` takes the same kind of argument.
    """

    def __init__(self, params, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32).clone() for name, p in _named(params)
        }
        if not self.shadow:
            raise ValueError("EMA got no trainable parameters")

    def _checked(self, params) -> Iterator[tuple[str, torch.nn.Parameter]]:
        named = dict(_named(params))
        if named.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - named.keys())[:5]
            extra = sorted(named.keys() - self.shadow.keys())[:5]
            raise KeyError(f"EMA parameters do not match: missing {missing}, unexpected {extra}")
        return iter(named.items())

    @torch.no_grad()
    def update(self, params) -> None:
        """``shadow <- mu_n * shadow + (1 - mu_n) * param`` for every parameter (:meth:`current_decay`)."""
        decay = self.current_decay()
        for name, p in self._checked(params):
            shadow = self.shadow[name]
            if shadow.device != p.device:  # follow the model (e.g. after accelerate moved it)
                shadow = self.shadow[name] = shadow.to(p.device)
            shadow.lerp_(p.detach().to(torch.float32), 1.0 - decay)
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay the next update uses: ``min(decay, (1 + n) / (10 + n))`` with warm-up, else ``decay``."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def copy_to(self, params) -> None:
        """Overwrite the parameters with the EMA weights."""
        for name, p in self._checked(params):
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, params):
        """Temporarily load the EMA weights into the parameters (e.g. to sample or evaluate), restoring them after."""
        named = _named(params)
        backup = {name: p.detach().clone() for name, p in named}
        self.copy_to(named)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in named:
                    p.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "warmup": self.warmup,
                "shadow": {k: v.detach().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise KeyError("EMA state does not match the model's trainable parameters "
                           f"({len(state['shadow'])} saved vs {len(self.shadow)} now)")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.warmup = bool(state.get("warmup", False))  # states written before the warm-up existed had none
        with torch.no_grad():  # in place, so modules whose weights are views of the shadow keep seeing it
            for name, value in state["shadow"].items():
                self.shadow[name].copy_(value.to(self.shadow[name].device, torch.float32))

    def to(self, device) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def named_tensors(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The EMA weights (float32), all or only ``names``."""
        keys = list(names) if names is not None else list(self.shadow)
        return {k: self.shadow[k] for k in keys}
