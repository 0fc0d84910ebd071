"""Bad inputs to the CoDi nodes in the real ComfyUI 0.3.75 (each a clear node error), and the
documented behaviour for a hint of another aspect ratio.

``tests/test_nodes.py`` already covers: steps 0 / 9 typed into CoDiScheduler / CoDiSample (refused by ComfyUI's
validation against the widgets' min/max), a truncated adapter in CoDiAdapterLoader, an SDXL-labelled adapter given to
CoDiSample *with* its CODI_INFO, and a LoRA holding only text-encoder keys. This module adds, in one in-process ComfyUI
run (one start-up, the micro checkpoint loaded once):

* a condition image of another aspect ratio than the output: CoDiSample logs a warning and ComfyUI's ControlNet
  scales the hint and crops its centre -- the output has the latent's size and equals the result for the hint
  cropped beforehand (and differs from a squashed hint);
* mismatched adapter architecture through CoDiModelPatch with CODI_INFO (SDXL and SD2 adapters on SD1.5), through
  CoDiScheduler with CODI_INFO, and through CoDiSample with *no* CODI_INFO (facts attached to the CONTROL_NET);
* corrupt adapter files in CoDiAdapterLoader: random bytes named .safetensors, a garbage .pth, a safetensors file with
  no ControlNet weights, malformed ``codi.*`` metadata -- each error names the file;
* LoRAs: kohya UNet keys of blocks this model does not have (the error gives the count), a corrupt LoRA file;
* an RGBA condition image (JoinImageWithAlpha) sampled as its RGB image;
* steps outside 1..8 arriving through a link (PrimitiveInt): ComfyUI validates ranges of widget values only, so the
  nodes' own check must catch it at execution.

Every error must be the executor's ``execution_error`` for the right node, a ``ValueError`` raised by our pack (the
last traceback frame is in the pack, not deep inside ComfyUI), with a message that says what is wrong.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from harness import PACK_DIRNAME, REPO_ROOT, make_base_dir, run_inprocess

CKPT = "micro_sd15.safetensors"
SIZE = 64          # output pixels (latent 8x8)
WIDE = (96, 48)    # width x height of the wide hint (aspect 2:1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, micro_sd15, comfyui_dir):
    from ccd_sampler.metadata import CoDiMetadata
    from trainer.adapters.controlnet import build_adapter
    from trainer.adapters.files import build_metadata, save_adapter

    base = make_base_dir(tmp_path_factory.mktemp("codi-node-errors") / "base")
    models = base / "models"
    for sub in ("checkpoints", "controlnet", "codi", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    (models / "checkpoints" / CKPT).symlink_to(micro_sd15.path)

    adapter = build_adapter(micro_sd15.unet, "controlnet")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero zero-convs: the hint changes the output
        for _, p in adapter.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    state = adapter.export_state_dict()
    codi = CoDiMetadata(task="paired", adapter_type="controlnet", recommended_steps=1, recommended_cfg=1.0)

    def meta(arch="stable-diffusion-v1"):
        return build_metadata(base_architecture=arch, adapter_type="controlnet", title="test", codi=codi)

    save_adapter(models / "codi" / "good.safetensors", state, meta())
    save_adapter(models / "codi" / "sdxl.safetensors", state, meta("stable-diffusion-xl-v1-base"))
    save_adapter(models / "controlnet" / "sd2.safetensors", state, meta("stable-diffusion-v2-512"))
    bad_meta = meta()
    bad_meta["codi.recommended_steps"] = "many"
    save_file(state, str(models / "codi" / "bad_metadata.safetensors"), metadata=bad_meta)
    rng = np.random.default_rng(0)
    (models / "codi" / "random_bytes.safetensors").write_bytes(rng.integers(0, 256, 4096, np.uint8).tobytes())
    (models / "controlnet" / "garbage.pth").write_bytes(b"this is not a torch file\n" * 50)
    save_file({"some.other.weight": torch.zeros(3, 3)}, str(models / "controlnet" / "no_weights.safetensors"))

    # kohya UNet names of blocks a one-level UNet does not have (as an SDXL / full SD1.5 LoRA would have)
    foreign = {}
    for block in ("input_blocks_7_1_transformer_blocks_0_attn1_to_q", "output_blocks_5_1_proj_in"):
        foreign[f"lora_unet_{block}.lora_down.weight"] = torch.zeros(4, 320)
        foreign[f"lora_unet_{block}.lora_up.weight"] = torch.zeros(320, 4)
        foreign[f"lora_unet_{block}.alpha"] = torch.tensor(4.0)
    save_file(foreign, str(models / "loras" / "foreign_lora.safetensors"))
    (models / "loras" / "corrupt_lora.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")

    inputs = base / "input"
    wide = rng.integers(0, 256, size=(WIDE[1], WIDE[0], 3), dtype=np.uint8)
    wide[:, WIDE[0] // 2 - 12: WIDE[0] // 2 + 12] = 255  # structure in the centre
    wide[:, :16] = 0                                     # and at the sides (cropped away)
    Image.fromarray(wide).save(inputs / "wide.png")
    left = (WIDE[0] - WIDE[1]) // 2
    Image.fromarray(wide[:, left: left + WIDE[1]]).save(inputs / "wide_centre.png")  # ComfyUI's centre crop
    Image.fromarray(wide).resize((WIDE[1], WIDE[1]), Image.BILINEAR).save(inputs / "wide_squashed.png")
    Image.fromarray(wide[:, left: left + WIDE[1]]).resize((SIZE // 2, SIZE // 2), Image.BILINEAR).save(
        inputs / "square_small.png")
    return base


# ------------------------------------------------------------------------------------------------------ graphs


def _front(adapter: str, image: str = "wide_centre.png") -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a barn", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "hint": {"class_type": "LoadImage", "inputs": {"image": image}},
        "adapter": {"class_type": "CoDiAdapterLoader", "inputs": {"adapter_name": adapter}},
    }


def sample_graph(prefix: str, adapter: str = "good.safetensors", image: str = "wide_centre.png", steps=1,
                 codi_info: bool = True, size: int = SIZE, lora: str | None = None) -> dict:
    g = _front(adapter, image)
    model = ["ckpt", 0]
    if lora:
        g["patch"] = {"class_type": "CoDiModelPatch", "inputs": {"model": model, "boundary": "auto",
                                                                 "lora_name": lora, "lora_strength": 1.0}}
        model = ["patch", 0]
    if isinstance(steps, int) and not 0 <= steps <= 8:  # out of the widget's range: feed it through a link
        g["steps"] = {"class_type": "PrimitiveInt", "inputs": {"value": steps}}
        steps = ["steps", 0]
    g["sample"] = {"class_type": "CoDiSample", "inputs": {
        "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["adapter", 0],
        "image": ["hint", 0], "seed": 7, "steps": steps, "cfg": 1.0, "strength": 1.0, "mode": "ode",
        "denoise": 1.0, "width": size, "height": size}}
    if codi_info:
        g["sample"]["inputs"]["codi_info"] = ["adapter", 1]
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return g


def patch_graph(adapter: str, *, scheduler_steps=None, lora: str = "None", via_scheduler: bool = False) -> dict:
    """CoDiAdapterLoader -> CoDiModelPatch(codi_info) [-> CoDiScheduler] -> sampling in SamplerCustom."""
    g = _front(adapter)
    info = ["adapter", 1]
    g["patch"] = {"class_type": "CoDiModelPatch", "inputs": {"model": ["ckpt", 0], "boundary": "auto",
                                                             "lora_name": lora, "lora_strength": 1.0}}
    if not via_scheduler:
        g["patch"]["inputs"]["codi_info"] = info
    steps = 2 if scheduler_steps is None else scheduler_steps
    if not 1 <= steps <= 8:
        g["steps"] = {"class_type": "PrimitiveInt", "inputs": {"value": steps}}
        steps = ["steps", 0]
    g.update({
        "sigmas": {"class_type": "CoDiScheduler", "inputs": {"model": ["patch", 0], "steps": steps, "grid": 0,
                                                             "end": "zero", "denoise": 1.0}},
        "sampler": {"class_type": "CoDiSampler", "inputs": {"mode": "ode", "noise_seed": 0, "start": "codi"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["patch", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["empty", 0]}},
        "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "p"}},
    })
    if via_scheduler:
        g["sigmas"]["inputs"]["codi_info"] = info
    return g


def loader_graph(adapter: str) -> dict:
    return sample_graph("loader", adapter=adapter)


def rgba_hint_graph(prefix: str) -> dict:
    """sample_graph with the hint made RGBA by the stock JoinImageWithAlpha node."""
    g = sample_graph(prefix, image="wide_centre.png")
    g["rgba"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["hint", 0], "alpha": ["hint", 1]}}
    g["sample"]["inputs"]["image"] = ["rgba", 0]
    return g


GOOD = {
    "rgba_hint": rgba_hint_graph("rgba_hint"),
    "aspect_wide": sample_graph("aspect_wide", image="wide.png"),
    "aspect_centre": sample_graph("aspect_centre", image="wide_centre.png"),
    "aspect_squashed": sample_graph("aspect_squashed", image="wide_squashed.png"),
    "aspect_same_smaller": sample_graph("aspect_same", image="square_small.png"),
}
BAD = {  # name -> (graph, node type that must fail, substrings of its message)
    "arch_patch_sdxl": (patch_graph("sdxl.safetensors"), "CoDiModelPatch",
                        ["CoDiModelPatch", "'sdxl.safetensors'", "made for SDXL", "model is SD1.x"]),
    "arch_patch_sd2": (patch_graph("sd2.safetensors"), "CoDiModelPatch",
                       ["'sd2.safetensors'", "made for SD2.x", "model is SD1.x", "stable-diffusion-v2-512"]),
    "arch_scheduler_sdxl": (patch_graph("sdxl.safetensors", via_scheduler=True), "CoDiScheduler",
                            ["CoDiScheduler", "'sdxl.safetensors'", "made for SDXL", "model is SD1.x"]),
    "arch_sample_no_info": (sample_graph("x", adapter="sdxl.safetensors", codi_info=False), "CoDiSample",
                            ["CoDiSample", "'sdxl.safetensors'", "made for SDXL", "model is SD1.x"]),
    "corrupt_random_bytes": (loader_graph("random_bytes.safetensors"), "CoDiAdapterLoader",
                             ["'random_bytes.safetensors'", "cannot be read"]),
    "corrupt_pth": (loader_graph("garbage.pth"), "CoDiAdapterLoader",
                    ["'garbage.pth'", "cannot be loaded by ComfyUI"]),
    "corrupt_no_weights": (loader_graph("no_weights.safetensors"), "CoDiAdapterLoader",
                           ["'no_weights.safetensors'", "holds no ControlNet"]),
    "corrupt_metadata": (loader_graph("bad_metadata.safetensors"), "CoDiAdapterLoader",
                         ["'bad_metadata.safetensors'", "invalid codi.* metadata", "codi.recommended_steps",
                          "many"]),
    "lora_foreign_keys": (patch_graph("good.safetensors", lora="foreign_lora.safetensors"), "CoDiModelPatch",
                          ["'foreign_lora.safetensors'", "0 of its 2 modules", "6 tensors", "lora_unet_"]),
    "lora_corrupt": (sample_graph("y", lora="corrupt_lora.safetensors"), "CoDiModelPatch",
                     ["'corrupt_lora.safetensors'", "cannot be read"]),
    "steps_linked_scheduler_9": (patch_graph("good.safetensors", scheduler_steps=9), "CoDiScheduler",
                                 ["CoDiScheduler", "steps must be an integer in 1..8", "got 9"]),
    "steps_linked_scheduler_0": (patch_graph("good.safetensors", scheduler_steps=0), "CoDiScheduler",
                                 ["steps must be an integer in 1..8", "got 0"]),
    "steps_linked_sample_12": (sample_graph("z", steps=12), "CoDiSample",
                               ["CoDiSample", "steps must be an integer in 1..8", "got 12"]),
}

INPROCESS = r'''
import json, traceback
spec = json.load(open(SPEC_PATH))
results = {}
for name, prompt in spec["prompts"].items():
    n_log = len(env.log_records)
    res = env.run_prompt(prompt)
    errors = []
    for kind, data in res["messages"]:
        if kind == "execution_error":
            tb = data.get("traceback") or []
            errors.append({"node_type": data.get("node_type"), "type": data.get("exception_type"),
                           "message": data.get("exception_message"), "last_frame": tb[-1] if tb else ""})
    results[name] = {"valid": res["valid"], "success": res["success"], "node_errors": res["node_errors"],
                     "outputs": res["outputs"], "errors": errors, "log": env.log_records[n_log:]}
RESULT = results
'''


@pytest.fixture(scope="module")
def results(files):
    spec = files / "errors_spec.json"
    prompts = {**GOOD, **{name: graph for name, (graph, _, _) in BAD.items()}}
    spec.write_text(json.dumps({"prompts": prompts}))
    run = run_inprocess(f"SPEC_PATH = {str(spec)!r}\n" + INPROCESS, files, timeout=600)
    assert run.result is not None, run.log[-10000:]
    return SimpleNamespace(**{"by_name": run.result, "log": run.log, "base": files})


def _latent(results, name) -> torch.Tensor:
    res = results.by_name[name]
    assert res["success"], (name, res["errors"], res["node_errors"], results.log[-5000:])
    entry = res["outputs"]["save_latent"]["latents"][0]
    return load_file(str(results.base / "output" / entry["subfolder"] / entry["filename"]))["latent_tensor"]


def _image_shape(results, name) -> tuple:
    entry = results.by_name[name]["outputs"]["save"]["images"][0]
    with Image.open(results.base / "output" / entry["subfolder"] / entry["filename"]) as im:
        return np.asarray(im.convert("RGB")).shape


# ------------------------------------------------------------------------------------------------------- tests


def test_hint_of_another_aspect_ratio_is_centre_cropped_with_a_warning(results):
    warning = (f"CoDiSample: the condition image ({WIDE[0]}x{WIDE[1]}) has another aspect ratio than the output "
               f"({SIZE}x{SIZE}); ComfyUI scales it and crops its centre")
    wide = results.by_name["aspect_wide"]
    assert any(warning in line for line in wide["log"]), wide["log"]
    assert warning in results.log  # and it reaches ComfyUI's own log output
    latent = _latent(results, "aspect_wide")
    assert latent.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all()
    assert _image_shape(results, "aspect_wide") == (SIZE, SIZE, 3)
    # what ComfyUI does with it: scale to cover, crop the centre == giving the centre crop yourself
    assert torch.equal(latent, _latent(results, "aspect_centre"))
    assert (latent - _latent(results, "aspect_squashed")).abs().max() > 1e-4  # not squashed (and the hint matters)
    # same aspect ratio at another size: scaled, no warning
    for name in ("aspect_centre", "aspect_same_smaller", "aspect_squashed"):
        assert not any("aspect ratio" in line for line in results.by_name[name]["log"]), name
        assert _latent(results, name).shape == (1, 4, SIZE // 8, SIZE // 8)


def test_rgba_hint_is_sampled_as_its_rgb(results):
    """An RGBA condition image (ComfyUI's JoinImageWithAlpha) reaches CoDiSample: its alpha channel is dropped, so
    the result equals the RGB image's, instead of a conv2d channel error deep inside the ControlNet."""
    assert torch.equal(_latent(results, "rgba_hint"), _latent(results, "aspect_centre"))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_clear_node_error(results, name):
    _, node_type, parts = BAD[name]
    res = results.by_name[name]
    assert res["valid"], (name, res["node_errors"])  # ComfyUI's validation lets it through: the node must refuse
    assert not res["success"], name
    assert len(res["errors"]) == 1, res["errors"]
    err = res["errors"][0]
    print(f"{name}: {err['node_type']}: {err['type']}: {err['message']}")
    assert err["node_type"] == node_type, err
    assert err["type"].endswith("ValueError"), err
    for part in parts:
        assert part in err["message"], (part, err["message"])
    # raised by our pack with its own message, not a traceback from deep inside ComfyUI / torch / safetensors
    frame = err["last_frame"]
    in_pack = f"custom_nodes/{PACK_DIRNAME}/" in frame or str(REPO_ROOT) in frame
    assert in_pack and "/comfy/" not in frame.split(",")[0], frame
    assert "Traceback" not in err["message"] and len(err["message"]) < 600, err["message"]
