"""Layer F: the extension inside the real Forge and AUTOMATIC1111 v1.10.1 (``make webui``; harness in
``tests/harness/webui.py``), through their HTTP API as a user's script or a shared payload drives them.

Forge runs the micro SD1.5 (``micro_sd15_webui``) with CoDi adapters trained-looking (random, non-zero zero convs so
the hint matters) for it: an ldm-layout ControlNet and a Control-LoRA, one with an SDXL label, and a corrupt file.
A1111 runs Mikubill's sd-webui-controlnet, whose SD1.5 ControlNet config is full size: it gets a random full-size
SD1.5 and adapters for that. Each server starts once for its part of the module, with ``CODI_WEBUI_TRACE`` set: every
CoDi sampling writes what it started from, the sigmas and timesteps it stepped through, the text conditioning and
its result (``codi_webui.sampling``).

Checked:

* the samplers "CoDi" / "CoDi ODE" and the scheduler "CoDi" are listed;
* txt2img and img2img with a CoDi adapter in a ControlNet unit answer 200 with images; the infotext holds the CoDi
  fields and the ``ControlNet 0:`` entry, and the unit really ran (its hint is returned as the detected map: both
  UIs add it only after running the unit); the adapter's recommended steps, sampler and grid were used (the trace's
  timesteps are the CoDi grid, its sigmas the model's own at those timesteps);
* Forge's CoDi sampling equals :func:`ccd_sampler.sample` run here with the trainer's loaders on the same
  checkpoint, adapter, hint, text conditioning and starting noise (tolerance stated in the test);
* a pasted CoDi infotext (the API's ``infotext`` field) restores the panel;
* bad inputs -- an SDXL adapter on an SD1.5 checkpoint, a corrupt adapter file, 12 steps -- are refused with the
  reason (HTTP 400, the message in ``errors``/``detail``) and the server keeps serving;
* the Gradio page in headless Chromium (both servers also serve it): the CoDi panel is there; a user pastes a shared
  CoDi infotext into the prompt box and presses the paste button (sampler, steps, size and the panel's mode are
  restored), drops a low-resolution photo into ControlNet unit 0, enables it, picks the ``codi_sr`` preprocessor and
  model, and presses Generate: the result appears in the gallery with the CoDi infotext, and the trace shows the
  adapter's grid. Screenshots go to ``test-artifacts/webui/``, and with ``CODI_UPDATE_SCREENSHOTS=1`` also to
  ``docs/screenshots/`` (the README's pictures).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import ccd_sampler as cs
from harness import REPO_ROOT
from harness.browser import browser_skip_reason, chromium_context
from harness.webui import WebUINotPrepared, WebUIServer, require_webui

SIZE = 64
LOW = SIZE // 4


def _photo(size: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS))


def _b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_adapters(unet, folder: Path, architecture: str = "stable-diffusion-v1") -> dict[str, Path]:
    """CoDi adapters for ``unet``: ``codi_sr`` (ldm ControlNet, 2 steps, ode, SR 4x), ``codi_lora`` (Control-LoRA,
    1 step, consistency), ``codi_sdxl`` (the SR adapter labelled SDXL), ``codi_sr_x4`` (a link to ``codi_sr``: the
    name in the shared payloads) and ``codi_corrupt`` (random bytes)."""
    from trainer.adapters.controlnet import build_adapter
    from trainer.adapters.files import build_metadata, save_adapter

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    g = torch.Generator().manual_seed(1)
    for name, adapter_type, steps, mode in (("codi_sr", "controlnet", 2, "ode"),
                                            ("codi_lora", "control-lora", 1, "consistency")):
        adapter = build_adapter(unet, adapter_type, network_dim=4)
        with torch.no_grad():  # non-zero zero convs and LoRA factors: the hint changes the output
            for _, p in adapter.trainable_named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        codi = cs.CoDiMetadata(task="sr", adapter_type=adapter_type, recommended_steps=steps, recommended_cfg=1.0,
                               sampler_mode=mode, hint_preprocessing={"type": "sr", "scale": 4})
        tensors = adapter.export_state_dict()
        for arch, file_name in ((architecture, name), ("stable-diffusion-xl-v1-base", "codi_sdxl")):
            if file_name == "codi_sdxl" and name != "codi_sr":
                continue
            meta = build_metadata(base_architecture=arch, adapter_type=adapter_type, title=file_name, codi=codi)
            paths[file_name] = folder / f"{file_name}.safetensors"
            save_adapter(paths[file_name], tensors, meta, dtype=torch.float16)
    paths["codi_sr_x4"] = folder / "codi_sr_x4.safetensors"  # the name the shared payloads use
    paths["codi_sr_x4"].symlink_to(paths["codi_sr"].name)
    paths["codi_corrupt"] = folder / "codi_corrupt.safetensors"
    paths["codi_corrupt"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    return paths


def model_names(ui: WebUIServer) -> dict[str, str]:
    """Stem -> the name the UI lists (``stem [hash]``)."""
    status, body = ui.get("/controlnet/model_list?update=true")
    assert status == 200, body
    return {name.split(" [")[0]: name for name in body["model_list"] if name != "None"}


def unit(ui: WebUIServer, model: str, module: str, image: np.ndarray, **extra) -> dict:
    return {"enabled": True, "module": module, "model": model_names(ui)[model], "image": _b64(image), "weight": 1.0,
            "resize_mode": "Just Resize", "processor_res": 512, "threshold_a": -1, "threshold_b": -1,
            "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced", "pixel_perfect": False,
            "save_detected_map": True, **extra}


def txt2img(units: list[dict], panel=(True, 0, 0.0, "auto"), **extra) -> dict:
    return {"prompt": "", "negative_prompt": "", "steps": 20, "cfg_scale": 7.0, "sampler_name": "Euler a",
            "width": SIZE, "height": SIZE, "seed": 3, "batch_size": 1,
            "alwayson_scripts": {"controlnet": {"args": units}, "CoDi": {"args": list(panel)}}, **extra}


def infotext(body: dict) -> str:
    return json.loads(body["info"])["infotexts"][0]


class Traces:
    """The ``CODI_WEBUI_TRACE`` folder: the newest trace after each request."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def count(self) -> int:
        return len(list(self.folder.glob("trace-*.safetensors")))

    def last(self) -> dict[str, torch.Tensor]:
        return load_file(str(sorted(self.folder.glob("trace-*.safetensors"))[-1]))


def require(kind: str) -> None:
    try:
        require_webui(kind)
    except WebUINotPrepared as e:
        pytest.fail(str(e), pytrace=False)


# ------------------------------------------------------------------------------------------------ Forge

@pytest.fixture(scope="module")
def forge(micro_sd15_webui, tmp_path_factory):
    require("forge")
    root = tmp_path_factory.mktemp("codi-forge")
    yield from serve("forge", micro_sd15_webui.path, write_adapters(micro_sd15_webui.unet, root / "adapters"), root)


def serve(kind: str, checkpoint: Path, adapters: dict[str, Path], root: Path):
    """A running ``kind`` UI with ``adapters`` as its ControlNet models and the CoDi trace switched on."""
    traces = Traces(root / "traces")
    with WebUIServer(kind, checkpoint, controlnets=adapters.values(), data_dir=root / "data", webui=True,
                     env={"CODI_WEBUI_TRACE": str(traces.folder)}) as ui:
        ui.traces, ui.adapters = traces, adapters
        yield ui


def test_samplers_and_scheduler_are_listed(forge):
    status, samplers = forge.get("/sdapi/v1/samplers")
    assert status == 200 and {"CoDi", "CoDi ODE"} <= {s["name"] for s in samplers}, samplers
    status, schedulers = forge.get("/sdapi/v1/schedulers")
    assert status == 200, schedulers
    assert ("codi", "CoDi") in {(s["name"], s["label"]) for s in schedulers}, schedulers
    status, modules = forge.get("/controlnet/module_list")
    assert status == 200 and {"codi_sr", "codi_inpaint", "codi_canny"} <= set(modules["module_list"]), modules


def assert_ran(ui: WebUIServer, body: dict, before: int, expected_timesteps: list[int]) -> dict:
    """The generation sampled with CoDi on ``expected_timesteps`` and the ControlNet unit ran."""
    text = infotext(body)
    assert "ControlNet 0:" in text, text
    assert len(body["images"]) == 2, f"no detected map: the unit did not run\n{ui.log_tail(4000)}"
    assert ui.traces.count() == before + 1, "the CoDi sampler did not run"
    trace = ui.traces.last()
    assert trace["timesteps"].long().tolist() == expected_timesteps
    table = trace["sigma_table"]
    assert torch.allclose(trace["sigmas"][:-1], table[expected_timesteps], rtol=1e-6) and trace["sigmas"][-1] == 0
    return trace


def test_txt2img_uses_the_adapters_settings(forge):
    before = forge.traces.count()
    status, body = forge.post("/sdapi/v1/txt2img", txt2img([unit(forge, "codi_sr", "codi_sr", _photo(LOW))]))
    assert status == 200, f"{body}\n{forge.log_tail(4000)}"
    text = infotext(body)
    for part in ("Steps: 2", "Sampler: CoDi ODE", "Schedule type: CoDi", "CFG scale: 1.0",
                 "CoDi adapter: codi_sr", "CoDi steps: 2", "CoDi mode: ode", "CoDi grid: 50", "CoDi boundary: on"):
        assert part in text, text
    assert_ran(forge, body, before, [980, 480])


def test_forge_sampling_equals_ccd_sampler(forge, micro_sd15_webui, sd1_tokenizer_dir):
    """The same model, adapter, hint, conditioning and starting noise through ``ccd_sampler.sample`` (z space,
    diffusers UNet + our adapter) and through Forge (sigma space, Forge's UNet and ControlNet)."""
    from codi_webui.preprocessors import sr_input_hint
    from trainer.adapters.controlnet import adapted_unet_output
    from trainer.adapters.files import load_adapter
    from trainer.models.loading import load_base_model

    before = forge.traces.count()
    low = _photo(LOW)
    status, body = forge.post("/sdapi/v1/txt2img", txt2img([unit(forge, "codi_sr", "codi_sr", low)]))
    assert status == 200, body
    trace = assert_ran(forge, body, before, [980, 480])
    assert "cond" in trace, "Forge's text conditioning was not traced"
    base = load_base_model(micro_sd15_webui.path, tokenizer_path=sd1_tokenizer_dir)
    adapter = load_adapter(base, forge.adapters["codi_sr"]).adapter
    hint = sr_input_hint(low, (SIZE, SIZE))
    cond = {"encoder_hidden_states": trace["cond"], "hint": hint}

    def denoise(z, t, c):
        return adapted_unet_output(base.unet, adapter, z, t, c)

    sigma0 = trace["sigmas"][0]
    z_start = trace["x_start"] / torch.sqrt(1 + sigma0 ** 2)
    with torch.no_grad():
        reference = cs.sample(denoise, z_start, [980, 480], "epsilon", cs.NoiseSchedule.stable_diffusion(),
                              mode="ode", cond=cond)
    scale = float(reference.abs().max())
    worst = float((trace["result"] - reference).abs().max())
    print(f"Forge CoDi vs ccd_sampler.sample: max |difference| {worst:.3g} (output scale {scale:.3g})")
    assert worst <= 1e-3 * max(scale, 1.0)


def img2img_runs_the_grid_tail(ui: WebUIServer) -> None:
    """img2img with the 2-step ``codi_sr`` at strength 0.5 samples CoDi's way: the last round(0.5 * 2) = 1 timestep
    of the adapter's grid (the UI alone would run both, from t = 980)."""
    before = ui.traces.count()
    payload = txt2img([unit(ui, "codi_sr", "codi_sr", _photo(LOW))], init_images=[_b64(_photo(SIZE))],
                      denoising_strength=0.5)
    status, body = ui.post("/sdapi/v1/img2img", payload)
    assert status == 200, f"{body}\n{ui.log_tail(4000)}"
    text = infotext(body)
    assert "Sampler: CoDi ODE" in text and "CoDi adapter: codi_sr" in text, text
    assert ui.traces.count() == before + 1
    assert ui.traces.last()["timesteps"].long().tolist() == [480]


def test_img2img_with_a_codi_adapter(forge):
    img2img_runs_the_grid_tail(forge)


def test_control_lora_adapter_and_panel_overrides(forge):
    before = forge.traces.count()
    payload = txt2img([unit(forge, "codi_lora", "codi_sr", _photo(LOW))], panel=(True, 4, 2.0, "ode"))
    status, body = forge.post("/sdapi/v1/txt2img", payload)
    assert status == 200, f"{body}\n{forge.log_tail(4000)}"
    text = infotext(body)
    for part in ("Steps: 4", "Sampler: CoDi ODE", "CFG scale: 2.0", "CoDi adapter: codi_lora"):
        assert part in text, text
    assert_ran(forge, body, before, [980, 720, 460, 200])


def test_pasted_infotext_restores_the_panel(forge):
    """The API's ``infotext`` field is parsed as a pasted infotext: the CoDi fields set the panel (1 step)."""
    before = forge.traces.count()
    pasted = "a photo\nSteps: 1, Sampler: CoDi ODE, CoDi steps: 1, CoDi cfg: 1.0, CoDi mode: ode"
    # "styles" given: Forge's infotext reader would otherwise fail on the empty "Styles array" every infotext parses
    # to (isinstance against List[str], a TypeError in its API)
    payload = txt2img([unit(forge, "codi_sr", "codi_sr", _photo(LOW))], infotext=pasted, styles=[])
    payload["alwayson_scripts"].pop("CoDi")
    status, body = forge.post("/sdapi/v1/txt2img", payload)
    assert status == 200, f"{body}\n{forge.log_tail(4000)}"
    assert "CoDi steps: 1" in infotext(body), infotext(body)
    assert_ran(forge, body, before, [980])


@pytest.mark.parametrize("case", ["sdxl adapter", "corrupt adapter", "12 steps", "sr size"])
def test_bad_inputs_are_refused_and_the_server_goes_on(case, forge):
    low = _photo(LOW)
    payload = {
        "sdxl adapter": lambda: txt2img([unit(forge, "codi_sdxl", "codi_sr", low)]),
        "corrupt adapter": lambda: txt2img([unit(forge, "codi_corrupt", "codi_sr", low)]),
        "12 steps": lambda: txt2img([unit(forge, "codi_sr", "codi_sr", low)], panel=(True, 12, 0.0, "auto")),
        "sr size": lambda: txt2img([unit(forge, "codi_sr", "codi_sr", _photo(24))]),
    }[case]()
    expected = {"sdxl adapter": "was made for SDXL", "corrupt adapter": "cannot be read",
                "12 steps": "steps must be in 1..8", "sr size": "the low-res image is 24x24 but the output is 64x64"}
    status, body = forge.post("/sdapi/v1/txt2img", payload)
    print(case, "->", status, body)
    assert status == 400, f"{status} {body}\n{forge.log_tail(3000)}"
    # A1111 puts the message in "errors", Forge in "message"; both in "detail" (the exception's own field)
    assert expected[case] in body.get("errors", body.get("message", "")) and expected[case] in body["detail"], body
    status, body = forge.post("/sdapi/v1/txt2img", txt2img([unit(forge, "codi_sr", "codi_sr", low)]))
    assert status == 200, body


# ------------------------------------------------------------------------------------------------ A1111

@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    """A1111 with Mikubill's sd-webui-controlnet, whose SD1.5 ControlNet config is full size: a random full-size
    SD1.5 (float16 file) and adapters for it (the ControlNet in the ldm layout, ~720 MB, and a Control-LoRA)."""
    from model_builders import build_full_sd15

    require("a1111")
    root = tmp_path_factory.mktemp("codi-a1111")
    checkpoint = build_full_sd15(root / "full_sd15.safetensors")
    adapters = write_adapters(checkpoint.unet, root / "adapters")
    del checkpoint.unet
    try:
        yield from serve("a1111", checkpoint.path, adapters, root)
    finally:  # ~3.4 GB: pytest keeps the last three runs' temporary folders, which would fill a small disk
        checkpoint.path.unlink(missing_ok=True)
        shutil.rmtree(root / "adapters", ignore_errors=True)


def test_a1111_lists_the_samplers_and_preprocessors(a1111):
    status, samplers = a1111.get("/sdapi/v1/samplers")
    assert status == 200 and {"CoDi", "CoDi ODE"} <= {s["name"] for s in samplers}, samplers
    status, schedulers = a1111.get("/sdapi/v1/schedulers")
    assert ("codi", "CoDi") in {(s["name"], s["label"]) for s in schedulers}, schedulers
    status, modules = a1111.get("/controlnet/module_list")
    assert status == 200 and {"codi_sr", "codi_inpaint", "codi_canny"} <= set(modules["module_list"]), modules


@pytest.mark.parametrize("adapter, steps, sampler", [("codi_sr", [980, 480], "CoDi ODE"),
                                                     ("codi_lora", [980], "CoDi")])
def test_a1111_txt2img_with_both_layouts(adapter, steps, sampler, a1111):
    """The ldm ControlNet and the Control-LoRA load in sd-webui-controlnet (it reads the Control-LoRA's SD1.5 marker
    key and the base's biases and norms from the file) and sample with the adapter's settings."""
    before = a1111.traces.count()
    status, body = a1111.post("/sdapi/v1/txt2img", txt2img([unit(a1111, adapter, "codi_sr", _photo(LOW))]))
    assert status == 200, f"{body}\n{a1111.log_tail(4000)}"
    text = infotext(body)
    for part in (f"Sampler: {sampler}", "Schedule type: CoDi", f"CoDi adapter: {adapter}", "CoDi grid: 50"):
        assert part in text, text
    assert_ran(a1111, body, before, steps)
    assert "Using ControlNet lora (SD15)" in a1111.log_text() or adapter != "codi_lora"


def test_a1111_img2img_and_a_refusal(a1111):
    img2img_runs_the_grid_tail(a1111)
    status, body = a1111.post("/sdapi/v1/txt2img", txt2img([unit(a1111, "codi_sdxl", "codi_sr", _photo(LOW))]))
    assert status == 400 and "was made for SDXL" in body["errors"], body


# ------------------------------------------------------------------------------------------------ the pages

SHARED_INFOTEXT = ("a photo\nSteps: 2, Sampler: CoDi ODE, Schedule type: CoDi, CFG scale: 1.0, Seed: 3, "
                   f"Size: {SIZE}x{SIZE}, CoDi mode: ode")
ARTIFACTS = REPO_ROOT / "test-artifacts" / "webui"
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
PAGE_TIMEOUT_MS = 180_000  # the 2 cores may be shared with other test processes
page_test = pytest.mark.skipif(browser_skip_reason("layer F") is not None,
                               reason=str(browser_skip_reason("layer F")))


def choose(pg, dropdown: str, value: str) -> None:
    """Pick ``value`` in a Gradio dropdown as a user does: click it, type, Enter (Gradio 3 and 4 alike)."""
    box = pg.locator(f"{dropdown} input").first
    box.click()
    box.fill(value)
    pg.wait_for_timeout(300)
    box.press("Enter")
    pg.wait_for_timeout(300)


def generate_from_the_page(ui: WebUIServer, photo: Path) -> tuple[str, str]:
    """The user's steps in txt2img (module docstring); returns the infotext under the result and the panel's mode
    after the paste. Screenshots: ``test-artifacts/webui/<kind>.png`` (full page) and ``<kind>_top.png``."""
    unit0 = "#txt2img_controlnet_ControlNet-0"
    with chromium_context({"width": 1600, "height": 1000}) as context:
        pg = context.pages[0] if context.pages else context.new_page()
        pg.set_default_timeout(PAGE_TIMEOUT_MS)
        pg.goto(ui.url + "/")
        pg.locator("#txt2img_generate").wait_for(state="visible")
        assert pg.locator("#script_txt2img_codi_accordion").count() == 1, "the CoDi panel is missing from txt2img"
        assert pg.locator("#script_img2img_codi_accordion").count() == 1, "the CoDi panel is missing from img2img"

        pg.fill("#txt2img_prompt textarea", SHARED_INFOTEXT)
        pg.locator("#tab_txt2img #paste").click()
        pg.wait_for_function("() => document.querySelector('#txt2img_steps input[type=number]').value === '2'")
        pg.click("#script_txt2img_codi_accordion .label-wrap")
        pg.click("#txt2img_controlnet .label-wrap")
        if not pg.locator(f"{unit0}_controlnet_enable_checkbox").is_visible():  # Forge folds each unit
            pg.locator("#txt2img_controlnet").get_by_role("button", name="ControlNet Unit 0").first.click()
        pg.locator(f"{unit0}_input_image input[type=file]").first.set_input_files(str(photo))
        enable = pg.locator(f"{unit0}_controlnet_enable_checkbox input")
        if not enable.is_checked():  # both UIs enable a unit when an image is dropped in; a user checks it if not
            enable.check()
        choose(pg, f"{unit0}_controlnet_preprocessor_dropdown", "codi_sr")
        choose(pg, f"{unit0}_controlnet_model_dropdown", "codi_sr")
        mode = pg.locator("#script_txt2img_codi_mode input").first.input_value()

        before = ui.traces.count()
        pg.click("#txt2img_generate")
        pg.locator("#txt2img_gallery img").first.wait_for(state="visible")
        info = pg.locator("#html_info_txt2img").first
        pg.wait_for_function("(el) => el.innerText.includes('Steps:')", arg=info.element_handle())
        text = info.inner_text()
        pg.wait_for_timeout(1500)  # the progress bar fades out
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / f"{ui.kind}.png"), full_page=True)
        pg.screenshot(path=str(ARTIFACTS / f"{ui.kind}_top.png"), full_page=True,
                      clip={"x": 0, "y": 0, "width": 1600, "height": 1500})
        assert ui.traces.count() == before + 1, f"no CoDi sampling ran for the page's generation\n{ui.log_tail(4000)}"
    if os.environ.get("CODI_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ARTIFACTS / f"{ui.kind}_top.png", SCREENSHOTS / f"webui_{ui.kind}.png")
    return text, mode


@page_test
@pytest.mark.parametrize("kind", ["forge", "a1111"])
def test_generation_from_the_page(kind, request, tmp_path):
    ui = request.getfixturevalue(kind)
    photo = tmp_path / "low.png"
    Image.fromarray(_photo(LOW)).save(photo)
    text, mode = generate_from_the_page(ui, photo)
    assert mode == "ode", f"the pasted infotext did not set the CoDi panel's mode (it shows {mode!r})"
    for part in ("Sampler: CoDi ODE", "Steps: 2", "Schedule type: CoDi", "CoDi adapter: codi_sr", "ControlNet 0:",
                 "Module: codi_sr"):
        assert part in text, text
    assert ui.traces.last()["timesteps"].long().tolist() == [980, 480]


# ------------------------------------------------------------------------------------------------ shared payloads

PAYLOADS = REPO_ROOT / "workflows" / "webui"


def load_send():
    spec = importlib.util.spec_from_file_location("codi_send", PAYLOADS / "send.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["forge", "a1111"])
@pytest.mark.parametrize("payload, timesteps", [("txt2img_codi_sr_x4.json", [980, 480]),
                                                ("img2img_codi_sr_x4.json", [480])])
def test_shared_payloads_run_as_shipped(kind, payload, timesteps, request, tmp_path, capsys):
    """``workflows/webui/send.py`` fills each payload's placeholders and sends it (only the size is made small for
    the CPU): an image comes back, sampled with the adapter's settings."""
    ui = request.getfixturevalue(kind)
    Image.fromarray(_photo(LOW)).save(tmp_path / "low.png")
    Image.fromarray(_photo(SIZE)).save(tmp_path / "init.png")
    before = ui.traces.count()
    code = load_send().main([str(PAYLOADS / payload), "--url", ui.url, "--image", str(tmp_path / "low.png"),
                             "--init", str(tmp_path / "init.png"), "--width", str(SIZE), "--height", str(SIZE),
                             "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, f"{out.err}\n{ui.log_tail(4000)}"
    assert (tmp_path / "out" / f"{Path(payload).stem}_0.png").is_file() and "CoDi adapter: codi_sr_x4" in out.out
    assert ui.traces.count() == before + 1 and ui.traces.last()["timesteps"].long().tolist() == timesteps


def test_send_reports_a_refusal_in_one_line(forge, tmp_path, capsys):
    payload = json.loads((PAYLOADS / "txt2img_codi_sr_x4.json").read_text())
    payload["alwayson_scripts"]["controlnet"]["args"][0]["model"] = "codi_sdxl"
    (tmp_path / "sdxl.json").write_text(json.dumps(payload))
    Image.fromarray(_photo(LOW)).save(tmp_path / "low.png")
    send = load_send()
    code = send.main([str(tmp_path / "sdxl.json"), "--url", forge.url, "--image", str(tmp_path / "low.png"),
                      "--width", str(SIZE), "--height", str(SIZE), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "HTTP 400" in err and "was made for SDXL" in err and "Traceback" not in err, err
    assert send.main([str(PAYLOADS / "txt2img_codi_sr_x4.json"), "--url", forge.url]) == 1
    assert "needs an image: pass --image" in capsys.readouterr().err
