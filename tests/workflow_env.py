"""Shared setup for the tests that run the shipped workflows (``workflows/``) in the real ComfyUI.

``tests/test_workflows.py`` (layer C: in-process and HTTP) and ``tests/test_browser.py`` (layer D: the real frontend in
headless Chromium) both need a ComfyUI base directory holding every file the workflows name: the micro SD1.5
checkpoint and a test adapter (random ControlNet, 2 recommended steps, cfg 1) under exactly the file names in the
workflows' ``properties.models``, plus small input PNGs from ``skimage.data`` under the names the workflows load.
:func:`populate_workflow_base` writes them; the ``wf_base`` fixture below wraps it (module scope: each test module gets
its own base dir and server).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from harness import REPO_ROOT, make_base_dir

WORKFLOW_DIR = REPO_ROOT / "workflows"
NAMES = ("codi_sr_x4", "codi_sr_x4_from_bicubic", "codi_inpaint", "codi_canny", "codi_depth")
SIZE = 64          # output images are 64x64 (latents 8x8)
SR_LOW = SIZE // 4  # the 4x SR input
OUTPUT_NODE = "9"   # SaveImage in every workflow

TASK_PREPROCESSING = {
    "codi_sr_x4.safetensors": ("sr", {"type": "sr", "scale": 4, "upsample": "bicubic", "antialias": False}),
    "codi_inpaint.safetensors": ("inpaint", {"type": "inpaint", "masked_value": -1.0, "mask_threshold": 0.5}),
    "codi_canny.safetensors": ("canny", {"type": "canny", "low_threshold": 100, "high_threshold": 200}),
    "codi_depth.safetensors": ("depth", {"type": "depth"}),
}


def load_ui(name: str) -> dict:
    """The UI-format workflow ``workflows/<name>.json``."""
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))


def load_api(name: str) -> dict:
    """The API-format workflow ``workflows/api/<name>.json``."""
    return json.loads((WORKFLOW_DIR / "api" / f"{name}.json").read_text(encoding="utf-8"))


def workflow_models(name: str) -> list[dict]:
    """The model files a UI workflow names (its loader nodes' ``properties.models``)."""
    return [m for node in load_ui(name)["nodes"] for m in node["properties"].get("models", [])]


def required_files(name: str) -> list[dict]:
    """Every model file a UI workflow needs (``{"directory", "name"}``): its ``properties.models`` plus the file each
    CoDi Adapter Loader selects (``models/codi/``), whether or not the node lists it in ``properties.models``."""
    files = [{"directory": m["directory"], "name": m["name"]} for m in workflow_models(name)]
    for node in load_ui(name)["nodes"]:
        if node["type"] == "CoDiAdapterLoader":
            entry = {"directory": "codi", "name": node["widgets_values"][0]}
            if entry not in files:
                files.append(entry)
    return files


def _photo(size: int) -> np.ndarray:
    return cv2.resize(skdata.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def write_inputs(folder: Path) -> None:
    """The input images the workflows' LoadImage nodes name, written into ``folder`` (a base dir's ``input/``)."""
    Image.fromarray(_photo(SR_LOW)).save(folder / "codi_sr_input.png")
    photo = _photo(SIZE)
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[16:40, 20:48] = 0  # transparent = inpaint
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(folder / "codi_inpaint_input.png")
    Image.fromarray(cv2.resize(skdata.camera(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)).convert("RGB").save(
        folder / "codi_canny_input.png")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    depth = (255 * (1 - yy / (SIZE - 1)) * 0.7 + 60 * ((xx - 32) ** 2 + (yy - 40) ** 2 < 150)).clip(0, 255)
    Image.fromarray(depth.astype(np.uint8), "L").save(folder / "codi_depth_input.png")  # a grey depth map


def populate_workflow_base(base: Path, checkpoint: Path, tokenizer_dir: Path) -> Path:
    """Put every model file the workflows name into ``base/models`` (the checkpoint as a symlink to ``checkpoint``,
    one random-ControlNet test adapter per task with that task's metadata) and their input images into
    ``base/input``."""
    from ccd_sampler.metadata import CoDiMetadata
    from trainer.adapters.controlnet import build_adapter
    from trainer.adapters.files import build_metadata, save_adapter
    from trainer.models import load_base_model

    base_model = load_base_model(checkpoint, tokenizer_path=tokenizer_dir)
    adapter = build_adapter(base_model.unet, "controlnet")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in adapter.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    state = adapter.export_state_dict()
    for name in NAMES:
        for model in required_files(name):
            path = base / "models" / model["directory"] / model["name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                continue
            if model["directory"] == "checkpoints":
                path.symlink_to(Path(checkpoint).resolve())
                continue
            task, prep = TASK_PREPROCESSING[model["name"]]
            codi = CoDiMetadata(task=task, adapter_type="controlnet", recommended_steps=2, recommended_cfg=1.0,
                                hint_preprocessing=prep)
            save_adapter(path, state, build_metadata(base_architecture="stable-diffusion-v1",
                                                     adapter_type="controlnet", title=model["name"], codi=codi))
    write_inputs(base / "input")
    return base


@pytest.fixture(scope="module")
def wf_base(tmp_path_factory, micro_sd15, sd1_tokenizer_dir, comfyui_dir) -> Path:
    """A base dir with every file the workflows name (properties.models) and the input images they load."""
    base = make_base_dir(tmp_path_factory.mktemp("codi-wf") / "base")
    return populate_workflow_base(base, micro_sd15.path, sd1_tokenizer_dir)
