"""``CoDiAdapterLoader``: a CoDi adapter (or any ControlNet / Control-LoRA file) -> CONTROL_NET + CODI_INFO.

Lists the pack's ``models/codi`` folder and the stock ``models/controlnet`` folder (a name present in both resolves to
the ``codi`` one). The file is loaded by ComfyUI's own ``comfy.controlnet.load_controlnet`` (ldm ControlNet and
Control-LoRA layouts both work there), so the CONTROL_NET also plugs into the stock Apply ControlNet nodes. The
safetensors header is read first with ``ccd_sampler.read_safetensors_header``: a truncated or non-safetensors file is a
``ValueError`` naming the file before ComfyUI tries to load it.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from .codi_info import CODI_FOLDER, read_codi_info, register_codi_folder
from .types import CoDiInfoType

logger = logging.getLogger("codi")

# The layer each architecture family's CLIP uses in ComfyUI by default, counted from the end.
DEFAULT_CLIP_SKIP = {"sd1": 1, "sd2": 2, "sdxl": 2}


def adapter_names() -> list[str]:
    import folder_paths

    register_codi_folder()
    return sorted(set(folder_paths.get_filename_list(CODI_FOLDER)) | set(folder_paths.get_filename_list("controlnet")))


def adapter_path(name: str) -> str:
    import folder_paths

    register_codi_folder()
    path = folder_paths.get_full_path(CODI_FOLDER, name) or folder_paths.get_full_path("controlnet", name)
    if path is None:
        raise ValueError(f"CoDi adapter {name!r} not found in models/{CODI_FOLDER} or models/controlnet")
    return path


def check_clip_layer(info, clip) -> str | None:
    """A warning when the workflow's CLIP conditions on another layer than the adapter was trained with (None when
    they agree or either is unknown)."""
    trained = info.metadata.clip_skip
    if not trained or clip is None:
        return None
    layer = getattr(clip, "layer_idx", None)
    used = -int(layer) if layer is not None else DEFAULT_CLIP_SKIP.get(info.family or "", 0)
    if not used or used == trained:
        return None
    return (f"CoDi: adapter {info.name} was trained on the text encoder's layer -{trained} (trainer --clip_skip "
            f"{trained}) but this workflow's CLIP uses layer -{used}: add a CLIP Set Last Layer node with "
            f"stop_at_clip_layer = -{trained} for the conditioning the adapter expects")


def load_adapter(name: str, clip=None):
    """``(control_net, info)`` for the adapter file ``name``; ``clip``: the workflow's CLIP, to check its layer."""
    import comfy.controlnet

    path = adapter_path(name)
    info = read_codi_info(path, name)
    try:
        control_net = comfy.controlnet.load_controlnet(path)
    except Exception as e:  # safetensors / torch errors do not name the file, and some say nothing useful
        what = "" if path.lower().endswith(".safetensors") else \
            "it is not a readable torch checkpoint (truncated, or not a model file?) "
        raise ValueError(f"CoDi adapter {name!r} ({path}) cannot be loaded by ComfyUI: {what}"
                         f"[{type(e).__name__}: {e}]") from None
    if control_net is None:
        raise ValueError(f"CoDi adapter {name!r} ({path}) holds no ControlNet, Control-LoRA or T2I-adapter weights")
    control_net.codi_info = info
    logger.info("CoDi: loaded %s as %s", info.describe(), type(control_net).__name__)
    warning = check_clip_layer(info, clip)
    if warning:
        logger.warning(warning)
    if info.metadata.objective == "diffusion":
        logger.warning("CoDi: %s was trained with the plain diffusion loss (an ordinary ControlNet, trainer --loss "
                       "diffusion), not distilled: sample it with many steps (KSampler, 20-50 steps); at 1-4 CoDi "
                       "steps it gives poor images", info.name)
    return control_net, info


class CoDiAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CoDiAdapterLoader",
            display_name="CoDi Adapter Loader",
            category="loaders/codi",
            description="Load a CoDi adapter (ControlNet or Control-LoRA layout) from models/codi or "
                        "models/controlnet. Outputs the CONTROL_NET (works with the stock Apply ControlNet nodes) "
                        "and its sampler facts (grid, boundary, recommended steps/cfg/mode) from the file's "
                        "codi.* metadata.",
            inputs=[io.Combo.Input("adapter_name", options=adapter_names()),
                    io.Clip.Input("clip", optional=True,
                                  tooltip="Optional: the workflow's CLIP, to warn when it conditions on another "
                                          "text-encoder layer than the adapter was trained with (clip skip).")],
            outputs=[io.ControlNet.Output(display_name="control_net"),
                     CoDiInfoType.Output(display_name="codi_info")],
        )

    @classmethod
    def execute(cls, adapter_name, clip=None) -> io.NodeOutput:
        return io.NodeOutput(*load_adapter(adapter_name, clip))
