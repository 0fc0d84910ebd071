"""The ControlNet units of a generation and their model files, in both web UIs' ControlNets.

* Forge's built-in ControlNet keeps one argument per unit in ``p.script_args`` (a ``ControlNetUnit`` dataclass from
  the UI, a dict from the API; ``enabled`` defaults to true) and maps ``"name [hash]"`` to a file in
  ``lib_controlnet.global_state.controlnet_filename_dict``.
* Mikubill's sd-webui-controlnet (A1111) lists them with ``internal_controlnet.external_code.
  get_all_units_in_processing`` (``enabled`` defaults to false) and maps names in ``scripts.global_state.cn_models``.

Both modules are looked up in ``sys.modules`` (never imported from here: importing them a second time under another
name would build a second registry). A name whose hash part does not match (the hash of every file under 1 MiB is
the same ``e3b0c442``; API users often leave it out) falls back to the file's stem.
"""

from __future__ import annotations

import os
import re
import sys

REGISTRIES = (("lib_controlnet.global_state", "controlnet_filename_dict"),  # Forge
              ("scripts.global_state", "cn_models"))                        # Mikubill's sd-webui-controlnet
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,}\]$")


def _field(unit, name: str, default):
    if isinstance(unit, dict):
        return unit.get(name, default)
    return getattr(unit, name, default)


def _mikubill_units(p):
    module = sys.modules.get("internal_controlnet.external_code")
    if module is None or not hasattr(module, "get_all_units_in_processing"):
        return None
    return module.get_all_units_in_processing(p)


def _script_units(p, title: str = "controlnet") -> list:
    scripts = getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []
    script = next((s for s in scripts if str(s.title()).lower() == title), None)
    if script is None:
        return []
    return list(p.script_args[script.args_from:script.args_to])


def enabled_units(p) -> list:
    """The enabled ControlNet units of ``p`` (dataclasses, pydantic models or API dicts), in unit order."""
    units = _mikubill_units(p)
    if units is not None:
        return [u for u in units if _field(u, "enabled", False)]
    return [u for u in _script_units(p) if _field(u, "enabled", True)]


def unit_model(unit) -> str | None:
    model = _field(unit, "model", None)
    return None if model in (None, "", "None", "none") else str(model)


def known_model_files() -> dict[str, str]:
    """``"name [hash]" -> path`` of the ControlNet models the running UI lists."""
    for module_name, attribute in REGISTRIES:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, attribute, None), dict):
            return {k: v for k, v in getattr(module, attribute).items() if v and k != "None" and os.path.isfile(v)}
    return {}


def model_file(name: str, files: dict[str, str]) -> str | None:
    """The file of a unit's model name: the exact ``name [hash]`` key, else the file whose stem is the name without
    its hash (case-insensitive)."""
    if name in files:
        return files[name]
    stem = _HASH.sub("", name).strip().lower()
    for path in files.values():
        if os.path.splitext(os.path.basename(path))[0].lower() == stem:
            return path
    return None
