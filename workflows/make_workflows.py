"""Writes the CoDi example workflows in both formats from one description per workflow.

* ``workflows/<name>.json``: UI (LiteGraph) format, what the ComfyUI frontend opens and what ComfyUI 0.3.75 lists as
  the pack's templates (``GET /workflow_templates``; served under ``/api/workflow_templates/<pack folder>/``).
* ``workflows/api/<name>.json``: API format (``{"id": {"class_type", "inputs"}}``), what ``POST /prompt`` executes.

Run ``python workflows/make_workflows.py`` after editing; ``tests/test_workflows.py`` checks that the files are what
this script writes, that each UI file and its API twin are the same graph, and that the UI widget order matches the
real ComfyUI node definitions (``/object_info``). Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
CKPT_MODEL = {"name": CKPT, "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
              "v1-5-pruned-emaonly-fp16.safetensors?download=true", "directory": "checkpoints"}
CONTROL = "control_after_generate"  # a UI-only widget value after a seed ("fixed" keeps the seed)
UPLOAD = "upload"                   # LoadImage's UI-only upload widget (value "image")


def N(id, type, pos, size, widgets=(), inputs=(), outputs=(), models=None, title=None):
    """A node: ``widgets`` [(name, value)] in the node's widget order; ``inputs`` [(name, type, (src_id, slot) or None,
    optional)]; ``outputs`` [(name, type)]."""
    return {"id": id, "type": type, "pos": list(pos), "size": list(size), "widgets": list(widgets),
            "inputs": list(inputs), "outputs": list(outputs), "models": models, "title": title}


def front(prompt: str, negative: str, image: str):
    """Checkpoint, prompts and the input image (ids 1-4)."""
    return [
        N(1, "CheckpointLoaderSimple", (20, 80), (320, 98), [("ckpt_name", CKPT)], [],
          [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], models=[CKPT_MODEL]),
        N(2, "CLIPTextEncode", (380, 40), (400, 160), [("text", prompt)], [("clip", "CLIP", (1, 1), False)],
          [("CONDITIONING", "CONDITIONING")], title="Positive"),
        N(3, "CLIPTextEncode", (380, 240), (400, 120), [("text", negative)], [("clip", "CLIP", (1, 1), False)],
          [("CONDITIONING", "CONDITIONING")], title="Negative"),
        N(4, "LoadImage", (20, 420), (320, 320), [("image", image), (UPLOAD, "image")], [],
          [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    ]


def adapter(file: str):
    # No properties.models entry: frontend 1.32.9's workflow schema requires a download `url` for every entry and
    # rejects the workflow without one; no CoDi adapter is published yet. The README names the file to train.
    return N(5, "CoDiAdapterLoader", (20, 240), (320, 82), [("adapter_name", file)], [],
             [("control_net", "CONTROL_NET"), ("codi_info", "CODI_INFO")])


def sample(image_src, latent_src=None, seed: int = 42, denoise: float = 1.0):
    return N(7, "CoDiSample", (840, 80), (320, 380),
             [("seed", seed), (CONTROL, "fixed"), ("steps", 0), ("cfg", 0.0), ("strength", 1.0), ("mode", "auto"),
              ("denoise", denoise), ("width", 0), ("height", 0)],
             [("model", "MODEL", (1, 0), False), ("positive", "CONDITIONING", (2, 0), False),
              ("negative", "CONDITIONING", (3, 0), False), ("control_net", "CONTROL_NET", (5, 0), False),
              ("image", "IMAGE", image_src, False), ("latent", "LATENT", latent_src, True),
              ("codi_info", "CODI_INFO", (5, 1), True)],
             [("latent", "LATENT")])


def decode_save(prefix: str, image_from=(8, 0), save_id: int = 9):
    return [
        N(8, "VAEDecode", (1200, 80), (210, 46), [], [("samples", "LATENT", (7, 0), False),
                                                     ("vae", "VAE", (1, 2), False)], [("IMAGE", "IMAGE")]),
        N(save_id, "SaveImage", (1460, 80), (400, 420), [("filename_prefix", prefix)],
          [("images", "IMAGE", image_from, False)], []),
    ]


WORKFLOWS = {
    # 4x super-resolution: low-res photo -> bicubic hint + empty latent at 4x -> CoDiSample
    "codi_sr_x4": [
        *front("a sharp, detailed photo", "blurry, lowres, jpeg artifacts", "codi_sr_input.png"),
        adapter("codi_sr_x4.safetensors"),
        N(6, "CoDiSuperResolutionInput", (380, 420), (320, 82), [("scale", "4")],
          [("image", "IMAGE", (4, 0), False), ("codi_info", "CODI_INFO", (5, 1), True)],
          [("hint", "IMAGE"), ("latent", "LATENT")]),
        sample((6, 0), (6, 1)),
        *decode_save("codi_sr_x4"),
    ],
    # 4x super-resolution started from the bicubic upscale instead of pure noise: the hint, VAE-encoded, is CoDi
    # Sample's latent, and denoise 0.5 runs the last half of the adapter's grid from alpha * bicubic + sigma * noise
    # (on the miniature benchmark the setting that beats bicubic on FD-patch with the photo's colours)
    "codi_sr_x4_from_bicubic": [
        *front("a sharp, detailed photo", "blurry, lowres, jpeg artifacts", "codi_sr_input.png"),
        adapter("codi_sr_x4.safetensors"),
        N(6, "CoDiSuperResolutionInput", (380, 420), (320, 82), [("scale", "4")],
          [("image", "IMAGE", (4, 0), False), ("codi_info", "CODI_INFO", (5, 1), True)],
          [("hint", "IMAGE"), ("latent", "LATENT")]),
        N(10, "VAEEncode", (840, 520), (210, 46), [],
          [("pixels", "IMAGE", (6, 0), False), ("vae", "VAE", (1, 2), False)], [("LATENT", "LATENT")],
          title="VAE Encode (start from the bicubic upscale)"),
        sample((6, 0), (10, 0), denoise=0.5),
        *decode_save("codi_sr_x4_from_bicubic"),
    ],
    # inpainting: the transparent area of the loaded PNG (or a mask drawn in the mask editor) is regenerated; the
    # result is pasted over the original outside the mask
    "codi_inpaint": [
        *front("a photo", "blurry, lowres", "codi_inpaint_input.png"),
        adapter("codi_inpaint.safetensors"),
        N(6, "CoDiInpaintInput", (380, 420), (320, 70), [],
          [("image", "IMAGE", (4, 0), False), ("mask", "MASK", (4, 1), False)],
          [("hint", "IMAGE"), ("mask", "MASK"), ("latent", "LATENT")]),
        sample((6, 0), (6, 2)),
        *decode_save("codi_inpaint", image_from=(10, 0)),
        N(10, "ImageCompositeMasked", (1200, 200), (230, 146), [("x", 0), ("y", 0), ("resize_source", False)],
          [("destination", "IMAGE", (4, 0), False), ("source", "IMAGE", (8, 0), False),
           ("mask", "MASK", (6, 1), True)], [("IMAGE", "IMAGE")]),
    ],
    # canny-to-image: edges of the loaded image (the adapter's trained thresholds) -> CoDiSample
    "codi_canny": [
        *front("a photo of a house by a lake", "blurry, lowres", "codi_canny_input.png"),
        adapter("codi_canny.safetensors"),
        N(6, "CoDiCanny", (380, 420), (320, 130),
          [("low_threshold", 100), ("high_threshold", 200), ("thresholds", "adapter")],
          [("image", "IMAGE", (4, 0), False), ("codi_info", "CODI_INFO", (5, 1), True)], [("edges", "IMAGE")]),
        sample((6, 0)),
        *decode_save("codi_canny"),
    ],
    # depth-to-image from the user's own depth map (paired adapter: the loaded image is the hint as it is)
    "codi_depth": [
        *front("a cozy living room, warm light", "blurry, lowres", "codi_depth_input.png"),
        adapter("codi_depth.safetensors"),
        sample((4, 0)),
        *decode_save("codi_depth"),
    ],
}


def _order(nodes) -> dict[int, int]:
    """Topological execution order (ties by id), as the frontend stores in ``order``."""
    deps = {n["id"]: {src[0] for _, _, src, _ in n["inputs"] if src} for n in nodes}
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def to_ui(nodes) -> dict:
    by_id = {n["id"]: n for n in nodes}
    order = _order(nodes)
    links, out_links = [], {}
    for n in sorted(nodes, key=lambda n: n["id"]):
        for slot, (_name, type_, src, _) in enumerate(n["inputs"]):
            if src:
                link_id = len(links) + 1
                links.append([link_id, src[0], src[1], n["id"], slot, type_])
                out_links.setdefault(src, []).append(link_id)
    ui_nodes = []
    link_of = {(link[3], link[4]): link[0] for link in links}
    for n in sorted(nodes, key=lambda n: n["id"]):
        inputs = []
        for slot, (name, type_, _src, optional) in enumerate(n["inputs"]):
            entry = {"name": name, "type": type_, "link": link_of.get((n["id"], slot))}
            if optional:
                entry["shape"] = 7  # the frontend's marker for optional inputs
            inputs.append(entry)
        outputs = [{"name": name, "type": type_, "links": out_links.get((n["id"], slot), []), "slot_index": slot}
                   for slot, (name, type_) in enumerate(n["outputs"])]
        properties = {"Node name for S&R": n["type"]}
        if n["models"]:
            properties["models"] = n["models"]
        node = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {},
                "order": order[n["id"]], "mode": 0, "inputs": inputs, "outputs": outputs, "properties": properties,
                "widgets_values": [value for _, value in n["widgets"]]}
        if n["title"]:
            node["title"] = n["title"]
        ui_nodes.append(node)
    assert set(by_id) == {n["id"] for n in ui_nodes}
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def to_api(nodes) -> dict:
    api = {}
    for n in sorted(nodes, key=lambda n: n["id"]):
        inputs = {name: value for name, value in n["widgets"] if name not in (CONTROL, UPLOAD)}
        for name, _, src, _ in n["inputs"]:
            if src:
                inputs[name] = [str(src[0]), src[1]]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                             "_meta": {"title": n["title"] or n["type"]}}
    return api


def render() -> dict[str, str]:
    """``{relative path: file text}`` for every workflow file."""
    files = {}
    for name, nodes in WORKFLOWS.items():
        files[f"{name}.json"] = json.dumps(to_ui(nodes), indent=2) + "\n"
        files[f"api/{name}.json"] = json.dumps(to_api(nodes), indent=2) + "\n"
    return files


def main() -> None:
    for rel, text in render().items():
        path = HERE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
