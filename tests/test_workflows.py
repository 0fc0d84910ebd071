"""The shipped workflows (``workflows/``): UI and API formats agree, and every API workflow runs in the real ComfyUI.

* The files are exactly what ``workflows/make_workflows.py`` writes.
* Each UI workflow (``workflows/<name>.json``) and its API twin (``workflows/api/<name>.json``) are the same graph:
  same node ids and types, the UI links are the API's link inputs, and the UI ``widgets_values`` -- read in the widget
  order of the real node definitions from the server's ``/object_info`` (plus the frontend's extra "control after
  generate" value after seeds and LoadImage's upload widget) -- are the API's widget inputs. Socket names/types match
  the node definitions; loader nodes name the files they load in ``properties.models``.
* A ComfyUI base dir holds the micro SD1.5 checkpoint and a test adapter (random ControlNet, 2 recommended steps, cfg 1)
  under exactly the file names the workflows expect (their ``properties.models``), plus small input PNGs from
  ``skimage.data`` under the names the workflows load. Every API workflow runs (1) in-process (``env.run_prompt``) and
  (2) through the HTTP server (``POST /prompt``, ``/history``, ``GET /view``); the images have the expected size, are
  finite, and are identical between the two paths (fixed seed).
* ComfyUI 0.3.75 lists ``workflows/*.json`` of a pack as its templates (``GET /workflow_templates``) and serves them
  under ``/api/workflow_templates/<pack folder>/``; the API twins in ``workflows/api/`` are not listed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from workflow_env import NAMES, OUTPUT_NODE, SIZE, WORKFLOW_DIR
from workflow_env import load_api as _api
from workflow_env import load_ui as _ui
from workflow_env import workflow_models as _models

from harness import PACK_DIRNAME, comfy_server, run_inprocess

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("codi_make_workflows", WORKFLOW_DIR / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- files (no ComfyUI)


def test_workflow_files_are_generated():
    gen = _load_generator()
    rendered = gen.render()
    assert set(rendered) == {f"{n}.json" for n in NAMES} | {f"api/{n}.json" for n in NAMES}
    for rel, text in rendered.items():
        assert (WORKFLOW_DIR / rel).read_text(encoding="utf-8") == text, \
            f"workflows/{rel} is stale: run `python workflows/make_workflows.py`"


def test_ui_format_shape():
    for name in NAMES:
        ui = _ui(name)
        assert set(ui) == {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
        assert ui["version"] == 0.4
        assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
        assert ui["last_link_id"] == max(link[0] for link in ui["links"])
        for node in ui["nodes"]:
            assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"} <= set(node), (name, node["id"])
            assert node["properties"]["Node name for S&R"] == node["type"]
        orders = sorted(n["order"] for n in ui["nodes"])
        assert orders == list(range(len(ui["nodes"])))
        by_id = {n["id"]: n for n in ui["nodes"]}
        for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
            out = by_id[src]["outputs"][src_slot]
            assert out["type"] == type_ and link_id in out["links"]
            assert by_id[dst]["inputs"][dst_slot]["link"] == link_id and by_id[dst]["inputs"][dst_slot]["type"] == type_
            assert by_id[src]["order"] < by_id[dst]["order"]
        # the checkpoint loader names its file, folder and download address (the frontend's schema requires the url;
        # CoDi adapters have none published yet, so they are named in the README instead)
        models = {(m["directory"], m["name"]) for m in _models(name)}
        for node in ui["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                assert ("checkpoints", node["widgets_values"][0]) in models
        assert {d for d, _ in models} == {"checkpoints"}
        assert all(m.get("url", "").startswith("https://") for m in _models(name))


def _widget_names(definition: dict) -> list[str]:
    """The frontend's widget order for a node definition from /object_info (V1 format)."""
    names = []
    for section in ("required", "optional"):
        for name in definition.get("input_order", {}).get(section, []):
            spec = definition["input"][section][name]
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            names.append(name)
            if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                names.append("<control_after_generate>")
            if options.get("image_upload"):
                names.append("<upload>")
    return names


def test_ui_and_api_describe_the_same_graph(object_info):
    for name in NAMES:
        ui, api = _ui(name), _api(name)
        assert {str(n["id"]) for n in ui["nodes"]} == set(api), name
        by_id = {n["id"]: n for n in ui["nodes"]}
        for node in ui["nodes"]:
            twin = api[str(node["id"])]
            assert twin["class_type"] == node["type"], (name, node["id"])
            definition = object_info[node["type"]]
            widget_names = _widget_names(definition)
            assert len(widget_names) == len(node["widgets_values"]), (name, node["type"], widget_names)
            widgets = {k: v for k, v in zip(widget_names, node["widgets_values"]) if not k.startswith("<")}
            links = {}
            for slot, entry in enumerate(node["inputs"]):
                if entry["link"] is not None:
                    (link,) = [lk for lk in ui["links"] if lk[0] == entry["link"]]
                    assert (link[3], link[4]) == (node["id"], slot)
                    links[entry["name"]] = [str(link[1]), link[2]]
            assert twin["inputs"] == {**widgets, **links}, (name, node["type"])
            # sockets as the node defines them
            all_inputs = {**definition["input"].get("required", {}), **definition["input"].get("optional", {})}
            for entry in node["inputs"]:
                assert all_inputs[entry["name"]][0] == entry["type"], (name, node["type"], entry)
                assert ("shape" in entry) == (entry["name"] in definition["input"].get("optional", {}))
            assert [(o["name"], o["type"]) for o in node["outputs"]] == \
                list(zip(definition["output_name"], definition["output"])), (name, node["type"])
            # every required input is given
            required = definition["input"].get("required", {})
            assert set(required) <= set(twin["inputs"]), (name, node["type"], set(required) - set(twin["inputs"]))
            for entry in node["inputs"]:
                if entry["link"] is not None:
                    assert by_id[int(links[entry["name"]][0])]


# ------------------------------------------------------------------------------------------------- ComfyUI runs


INPROCESS = r'''
import json
spec = json.load(open(SPEC_PATH))
results = {}
for name, prompt in spec["prompts"].items():
    res = env.run_prompt(prompt)
    results[name] = {"valid": res["valid"], "success": res["success"], "node_errors": res["node_errors"],
                     "outputs": res["outputs"],
                     "errors": [m[1].get("exception_message") for m in res["messages"] if m[0] == "execution_error"]}
RESULT = results
'''


def _prompt(name: str, prefix: str) -> dict:
    prompt = _api(name)
    prompt[OUTPUT_NODE]["inputs"]["filename_prefix"] = prefix
    return prompt


@pytest.fixture(scope="module")
def inprocess_results(wf_base) -> dict:
    spec_path = wf_base / "wf_spec.json"
    spec_path.write_text(json.dumps({"prompts": {n: _prompt(n, f"inproc_{n}") for n in NAMES}}))
    run = run_inprocess(f"SPEC_PATH = {str(spec_path)!r}\n" + INPROCESS, wf_base, timeout=600)
    assert run.result is not None, run.log[-10000:]
    for name, res in run.result.items():
        assert res["success"], (name, res["node_errors"], res["errors"], run.log[-5000:])
    return run.result


@pytest.fixture(scope="module")
def server(wf_base, inprocess_results):
    """One server for the module (started after the in-process run: the two never compete for the CPU)."""
    with comfy_server(wf_base) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get_json("/object_info")


def _image_from_file(base: Path, entry: dict) -> np.ndarray:
    with Image.open(base / "output" / entry["subfolder"] / entry["filename"]) as im:
        return np.asarray(im.convert("RGB"))


def _view(server, entry: dict) -> np.ndarray:
    query = urllib.parse.urlencode({"filename": entry["filename"], "subfolder": entry["subfolder"],
                                    "type": entry["type"]})
    with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=30) as resp:
        assert resp.status == 200
        data = resp.read()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def http_results(server) -> dict:
    ids = {name: server.queue_prompt(_prompt(name, f"http_{name}")) for name in NAMES}
    out = {}
    for name, prompt_id in ids.items():
        entry = server.wait_for_history(prompt_id, timeout=300)
        assert entry["status"]["status_str"] == "success", (name, entry["status"], server.log()[-5000:])
        (image,) = entry["outputs"][OUTPUT_NODE]["images"]
        out[name] = SimpleNamespace(entry=image, pixels=_view(server, image))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_in_process_and_over_http_identically(wf_base, inprocess_results, http_results, name):
    (entry,) = inprocess_results[name]["outputs"][OUTPUT_NODE]["images"]
    local = _image_from_file(wf_base, entry)
    remote = http_results[name].pixels
    assert local.shape == (SIZE, SIZE, 3), (name, local.shape)
    assert remote.shape == (SIZE, SIZE, 3), (name, remote.shape)
    assert np.isfinite(local.astype(np.float64)).all()
    assert local.std() > 0, name  # not a blank image
    # the HTTP image is the file the server wrote, and equals the in-process one for the same seed
    assert np.array_equal(remote, _image_from_file(wf_base, http_results[name].entry))
    diff = int(np.abs(local.astype(int) - remote.astype(int)).max())
    assert diff == 0, (name, diff)


def test_inpaint_keeps_the_unmasked_pixels(wf_base, inprocess_results):
    """ImageCompositeMasked puts the generated pixels only where the mask is: elsewhere the output is the input."""
    (entry,) = inprocess_results["codi_inpaint"]["outputs"][OUTPUT_NODE]["images"]
    out = _image_from_file(wf_base, entry).astype(int)
    with Image.open(wf_base / "input" / "codi_inpaint_input.png") as im:
        rgba = np.asarray(im.convert("RGBA")).astype(int)
    keep = rgba[..., 3] == 255
    assert np.abs(out[keep] - rgba[..., :3][keep]).max() <= 1
    assert np.abs(out[~keep] - rgba[..., :3][~keep]).max() > 10  # the hole was regenerated


def test_workflows_are_served_as_templates(server):
    """0.3.75 lists ``<pack>/workflows/*.json`` (no subfolders) and serves the folder statically."""
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_DIRNAME, [])) == sorted(NAMES), listed
    for name in NAMES:
        assert server.get_json(f"/api/workflow_templates/{PACK_DIRNAME}/{name}.json") == _ui(name)
