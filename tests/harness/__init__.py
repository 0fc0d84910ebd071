"""Test harness for the real ComfyUI (layer C). See ``comfyui.py`` for why ComfyUI runs in subprocesses."""

from .comfyui import (
    COMFYUI_VERSION, PACK_DIRNAME, REPO_ROOT, ComfyServer, ComfyUINotPrepared, InProcessRun, comfy_server,
    comfyui_dir, free_port, http_json, make_base_dir, require_comfyui, run_inprocess,
)

__all__ = [
    "COMFYUI_VERSION", "PACK_DIRNAME", "REPO_ROOT", "ComfyServer", "ComfyUINotPrepared", "InProcessRun",
    "comfy_server", "comfyui_dir", "free_port", "http_json", "make_base_dir", "require_comfyui", "run_inprocess",
]
