"""The CoDi preprocessor nodes (CoDiSuperResolutionInput, CoDiInpaintInput, CoDiCanny) in the real ComfyUI 0.3.75.

One in-process ComfyUI run loads small PNGs with the stock LoadImage node (exactly what a workflow feeds the nodes),
calls each node's ``execute`` and saves the hints; the pytest process builds the same hints with the trainer's
condition builders (``trainer.data.conditions``) from the same uint8 pixels and mask. The two sides must be
identical (max abs difference 0: both call ``ccd_sampler.hints`` on the same float32 values, ``uint8 / 255``
computed in float32 by LoadImage and by ``image_to_tensor``). Bad inputs run as real prompts and must fail with a
clear node error.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skdata

from harness import PACK_DIRNAME, make_base_dir, run_inprocess
from trainer.data.conditions import CannyCondition, InpaintCondition, SuperResolutionCondition

SIZE = 64
LOW = 16  # the low-res SR input: 16x16 -> 32/64/128


def _photo(size: int) -> np.ndarray:
    return cv2.resize(skdata.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def _mask() -> np.ndarray:
    """``HxW`` float32 {0, 1}: a box and a stroke to inpaint."""
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[10:30, 20:50] = 1.0
    mask[40:44, 5:60] = 1.0
    return mask


INPROCESS = r'''
import importlib, json
import torch
from safetensors.torch import save_file
spec = json.load(open(SPEC_PATH))
pack = spec["pack"].replace(".", "_x_")  # ComfyUI's sys.modules name for a custom node folder
codi_info = importlib.import_module(pack + ".nodes.codi_info")
CoDiMetadata = importlib.import_module(pack + ".ccd_sampler").CoDiMetadata
N = env.nodes.NODE_CLASS_MAPPINGS
load = env.nodes.LoadImage()

def out(node_output):
    return node_output.result if hasattr(node_output, "result") else node_output

low = load.load_image("low.png")[0]
photo, alpha_mask = load.load_image("photo_rgba.png")[:2]
plain = load.load_image("photo.png")[0]
def info(**prep):
    meta = CoDiMetadata(task=prep.get("type", "paired"), hint_preprocessing=prep)
    return codi_info.CoDiInfo(name="test.safetensors", has_codi_metadata=True, metadata=meta)
sr_info = info(type="sr", scale=2)
canny_info = info(type="canny", low_threshold=50, high_threshold=150)

t = {}
shapes = {}
for scale in ("2", "4", "8"):
    hint, latent = out(N["CoDiSuperResolutionInput"].execute(low, scale))
    t["sr_" + scale] = hint
    shapes["sr_latent_" + scale] = list(latent["samples"].shape)
hint, latent = out(N["CoDiSuperResolutionInput"].execute(low, "auto", sr_info))
t["sr_auto_info"] = hint
shapes["sr_latent_auto_info"] = list(latent["samples"].shape)
t["sr_auto_none"] = out(N["CoDiSuperResolutionInput"].execute(low, "auto"))[0]

hint, mask, latent = out(N["CoDiInpaintInput"].execute(photo, alpha_mask))
t["inpaint"], t["inpaint_mask"] = hint, mask
shapes["inpaint_latent"] = list(latent["samples"].shape)
t["inpaint_2d_mask"] = out(N["CoDiInpaintInput"].execute(photo, alpha_mask[0]))[0]
batch = torch.cat([photo, plain])
hint, mask, _ = out(N["CoDiInpaintInput"].execute(batch, alpha_mask))
t["inpaint_batch"], t["inpaint_batch_mask"] = hint, mask

t["canny_default"] = out(N["CoDiCanny"].execute(plain, 100, 200, "adapter"))[0]
t["canny_manual"] = out(N["CoDiCanny"].execute(plain, 50, 150, "manual", canny_info))[0]
t["canny_info"] = out(N["CoDiCanny"].execute(plain, 100, 200, "adapter", canny_info))[0]
t["photo_in"], t["low_in"] = plain, low
# an RGBA IMAGE (JoinImageWithAlpha makes one) and a one-channel grey IMAGE (some custom nodes do)
rgba_low = out(N["JoinImageWithAlpha"].execute(low, torch.zeros(low.shape[:3])))[0]
rgba = out(N["JoinImageWithAlpha"].execute(plain, alpha_mask))[0]
grey = plain[..., :1].clone()
shapes["rgba"] = list(rgba.shape)
t["sr_rgba"] = out(N["CoDiSuperResolutionInput"].execute(rgba_low, "4"))[0]
t["inpaint_rgba"] = out(N["CoDiInpaintInput"].execute(rgba, alpha_mask))[0]
t["canny_rgba"] = out(N["CoDiCanny"].execute(rgba, 100, 200, "adapter"))[0]
t["canny_grey"] = out(N["CoDiCanny"].execute(grey, 100, 200, "adapter"))[0]
t["canny_grey3"] = out(N["CoDiCanny"].execute(grey.repeat(1, 1, 1, 3), 100, 200, "adapter"))[0]
t["inpaint_ref"] = out(N["CoDiInpaintInput"].execute(plain, alpha_mask))[0]
messages = {}
try:
    N["CoDiCanny"].execute(plain[..., :2], 100, 200, "adapter")
except ValueError as e:
    messages["two_channels"] = str(e)
inputs_before = {k: v.clone() for k, v in (("photo", photo), ("low", low), ("mask", alpha_mask))}
save_file({k: v.contiguous() for k, v in t.items()}, spec["tensors_path"])

def run(prompt):
    res = env.run_prompt(prompt)
    errors = [{"node_type": m[1].get("node_type"), "message": m[1].get("exception_message")}
              for m in res["messages"] if m[0] == "execution_error"]
    return {"valid": res["valid"], "success": res["success"], "node_errors": res["node_errors"], "errors": errors}

results = {name: run(prompt) for name, prompt in spec["prompts"].items()}
info_v1 = {k: N[k].GET_NODE_INFO_V1() for k in ("CoDiSuperResolutionInput", "CoDiInpaintInput", "CoDiCanny")}
RESULT = {"shapes": shapes, "results": results, "object_info": info_v1, "messages": messages,
          "inputs_unchanged": all(torch.equal(v, w) for v, w in
                                  zip(inputs_before.values(), (photo, low, alpha_mask)))}
'''


def _prompts() -> dict:
    def preview(src):
        return {"class_type": "PreviewImage", "inputs": {"images": [src, 0]}}

    return {
        "ok_sr": {"img": {"class_type": "LoadImage", "inputs": {"image": "low.png"}},
                  "sr": {"class_type": "CoDiSuperResolutionInput", "inputs": {"image": ["img", 0], "scale": "4"}},
                  "out": preview("sr")},
        "bad_sr_size": {"img": {"class_type": "LoadImage", "inputs": {"image": "odd.png"}},
                        "sr": {"class_type": "CoDiSuperResolutionInput", "inputs": {"image": ["img", 0],
                                                                                    "scale": "2"}},
                        "out": preview("sr")},
        "bad_inpaint_mask_size": {
            "img": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "mask": {"class_type": "LoadImageMask", "inputs": {"image": "small_mask.png", "channel": "red"}},
            "inp": {"class_type": "CoDiInpaintInput", "inputs": {"image": ["img", 0], "mask": ["mask", 0]}},
            "out": preview("inp")},
        "bad_canny_thresholds": {
            "img": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "canny": {"class_type": "CoDiCanny", "inputs": {"image": ["img", 0], "low_threshold": 200,
                                                            "high_threshold": 100, "thresholds": "manual"}},
            "out": preview("canny")},
        "bad_canny_range": {
            "img": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "canny": {"class_type": "CoDiCanny", "inputs": {"image": ["img", 0], "low_threshold": 100,
                                                            "high_threshold": 300, "thresholds": "manual"}},
            "out": preview("canny")},
    }


@pytest.fixture(scope="module")
def pre_run(tmp_path_factory, comfyui_dir):
    base = make_base_dir(tmp_path_factory.mktemp("codi-pre") / "base")
    inp = base / "input"
    photo = _photo(SIZE)
    low = _photo(LOW)
    mask = _mask()
    Image.fromarray(photo).save(inp / "photo.png")
    Image.fromarray(low).save(inp / "low.png")
    rgba = np.dstack([photo, np.where(mask > 0.5, 0, 255).astype(np.uint8)])  # transparent = inpaint
    Image.fromarray(rgba, "RGBA").save(inp / "photo_rgba.png")
    Image.fromarray(_photo(13)).save(inp / "odd.png")  # x2 -> 26: not a multiple of 8
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(inp / "small_mask.png")
    spec_path, tensors_path = base / "spec.json", base / "pre_tensors.safetensors"
    spec_path.write_text(json.dumps({"prompts": _prompts(), "tensors_path": str(tensors_path),
                                     "pack": str(base / "custom_nodes" / PACK_DIRNAME)}))
    run = run_inprocess(f"SPEC_PATH = {str(spec_path)!r}\n" + INPROCESS, base, timeout=300)
    assert run.result is not None, run.log[-10000:]
    return SimpleNamespace(**run.result, t=load_file(str(tensors_path)), photo=photo, low=low, mask=mask,
                           log=run.log)


def _hwc(tensor: torch.Tensor, i: int = 0) -> np.ndarray:
    return tensor[i].numpy()


def _assert_same(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    diff = float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())
    print(f"{what}: max |node - trainer builder| = {diff}")
    assert diff == 0.0, (what, diff)


def test_inputs_reach_the_nodes_as_the_trainer_sees_them(pre_run):
    """LoadImage's float pixels are exactly the trainer's ``uint8 / 255`` (so the comparisons below are fair)."""
    from trainer.data.conditions import image_to_tensor

    assert torch.equal(pre_run.t["photo_in"][0], image_to_tensor(pre_run.photo)[0].permute(1, 2, 0))
    assert pre_run.inputs_unchanged


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_super_resolution_hint_equals_the_trainer(pre_run, scale):
    expect = SuperResolutionCondition(scale=scale).hint_from_low_res(pre_run.low)
    _assert_same(_hwc(pre_run.t[f"sr_{scale}"]), expect, f"sr x{scale}")
    assert pre_run.shapes[f"sr_latent_{scale}"] == [1, 4, LOW * scale // 8, LOW * scale // 8]


def test_super_resolution_scale_from_adapter(pre_run):
    _assert_same(_hwc(pre_run.t["sr_auto_info"]), SuperResolutionCondition(scale=2).hint_from_low_res(pre_run.low),
                 "sr auto (adapter scale 2)")
    assert pre_run.shapes["sr_latent_auto_info"] == [1, 4, LOW * 2 // 8, LOW * 2 // 8]
    _assert_same(_hwc(pre_run.t["sr_auto_none"]), SuperResolutionCondition(scale=4).hint_from_low_res(pre_run.low),
                 "sr auto (no adapter: 4)")


def _inpaint_builder_hint(target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The trainer's inpaint builder, its random mask replaced by ``mask``."""
    builder = InpaintCondition()
    builder.make_mask = lambda shape, rng: mask
    cond = builder(target, np.random.default_rng(0))
    assert np.array_equal(cond.mask, mask)
    return cond.hint


def test_inpaint_hint_equals_the_trainer(pre_run):
    expect = _inpaint_builder_hint(pre_run.photo, pre_run.mask)
    _assert_same(_hwc(pre_run.t["inpaint"]), expect, "inpaint (LoadImage alpha mask)")
    _assert_same(_hwc(pre_run.t["inpaint_2d_mask"]), expect, "inpaint ([H, W] mask)")
    assert np.array_equal(pre_run.t["inpaint_mask"][0].numpy(), pre_run.mask)
    assert pre_run.shapes["inpaint_latent"] == [1, 4, SIZE // 8, SIZE // 8]
    # a batch of 2 images with one mask: the mask is broadcast
    _assert_same(_hwc(pre_run.t["inpaint_batch"], 1), _inpaint_builder_hint(pre_run.photo, pre_run.mask),
                 "inpaint (batch, image 2)")
    assert list(pre_run.t["inpaint_batch_mask"].shape) == [2, SIZE, SIZE]


def test_canny_hint_equals_the_trainer(pre_run):
    _assert_same(_hwc(pre_run.t["canny_default"]), CannyCondition()(pre_run.photo).hint, "canny 100/200")
    lower = CannyCondition(50, 150)(pre_run.photo).hint
    _assert_same(_hwc(pre_run.t["canny_manual"]), lower, "canny manual 50/150")
    _assert_same(_hwc(pre_run.t["canny_info"]), lower, "canny from adapter 50/150")
    assert not np.array_equal(lower, CannyCondition()(pre_run.photo).hint)  # the thresholds matter here


def test_nodes_are_listed(pre_run):
    info = pre_run.object_info
    expect = {
        "CoDiSuperResolutionInput": (["image", "scale"], ["codi_info"], ["IMAGE", "LATENT"]),
        "CoDiInpaintInput": (["image", "mask"], [], ["IMAGE", "MASK", "LATENT"]),
        "CoDiCanny": (["image", "low_threshold", "high_threshold", "thresholds"], ["codi_info"], ["IMAGE"]),
    }
    for node, (required, optional, outputs) in expect.items():
        entry = info[node]
        assert list(entry["input"]["required"]) == required, node
        assert list(entry["input"].get("optional", {})) == optional, node
        assert list(entry["output"]) == outputs, node
        assert entry["category"] == "image/codi", node
    low = info["CoDiCanny"]["input"]["required"]["low_threshold"][1]
    assert (low["default"], low["min"], low["max"]) == (100, 0, 255)
    assert info["CoDiCanny"]["input"]["required"]["high_threshold"][1]["default"] == 200


def test_rgba_and_grey_images_are_converted(pre_run):
    """An RGBA IMAGE loses its alpha channel and a one-channel IMAGE is repeated to RGB, in every preprocessor and
    CoDiSample (the same helper); two channels are refused with the node's own message."""
    t = pre_run.t
    assert pre_run.shapes["rgba"][-1] == 4
    assert torch.equal(t["sr_rgba"], t["sr_4"])
    assert torch.equal(t["inpaint_rgba"], t["inpaint_ref"])
    assert torch.equal(t["canny_rgba"], t["canny_default"])
    assert torch.equal(t["canny_grey"], t["canny_grey3"]) and t["canny_grey"].shape[-1] == 3
    message = pre_run.messages["two_channels"]
    assert message.startswith("CoDiCanny: image must be a ComfyUI IMAGE") and "[1, 64, 64, 2]" in message


def test_bad_inputs_are_clear_errors(pre_run):
    r = pre_run.results
    assert r["ok_sr"]["success"], r["ok_sr"]

    def error(name):
        assert r[name]["valid"] and not r[name]["success"], (name, r[name])
        (err,) = r[name]["errors"]
        return err

    err = error("bad_sr_size")
    assert err["node_type"] == "CoDiSuperResolutionInput", err
    assert "26x26" in err["message"] and "13x13" in err["message"] and "multiple of 8" in err["message"], err
    err = error("bad_inpaint_mask_size")
    assert err["node_type"] == "CoDiInpaintInput", err
    assert "48x48" in err["message"] and "64x64" in err["message"], err
    err = error("bad_canny_thresholds")
    assert err["node_type"] == "CoDiCanny" and "must not exceed" in err["message"], err
    # out of the widget range: refused by ComfyUI's validation before running
    assert not r["bad_canny_range"]["valid"]
    assert "high_threshold" in json.dumps(r["bad_canny_range"]["node_errors"])
