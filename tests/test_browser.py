"""Layer D (``docs/testing.md``): the real ComfyUI frontend in headless Chromium loads and queues every shipped UI
workflow.

One ComfyUI 0.3.75 server for the module (our pack in ``custom_nodes/``, the micro SD1.5 checkpoint and test adapters
under the file names the workflows expect: ``workflow_env``) serves its own frontend (``comfyui-frontend-package``
1.32.9, from the venv). Debian's ``chromium``, driven by Python Playwright (``executable_path``: Playwright's own
browser download does not work here), opens that page once; then for each ``workflows/<name>.json``:

* the file is dropped onto the canvas as a user drags it there (a ``drop`` event carrying the file: the frontend's
  document drop handler -> ``app.handleFile`` -> ``app.loadGraphData``, which opens it in a tab named after the file);
* the page shows no missing node types: no "This workflow has missing nodes" dialog, and every node of ``app.graph``
  has a type in ``LiteGraph.registered_node_types`` and no ``has_errors`` flag (the frontend puts a placeholder node
  with ``has_errors`` where a type is unknown); the graph holds exactly the file's node types; no alert toast (the
  frontend validates the file against its workflow schema and raises an alert when it does not conform);
* the Run button is clicked; the prompt the page posts to ``/api/prompt`` is the API twin ``workflows/api/<name>.json``
  (same nodes, classes and inputs: the real frontend's ``graphToPrompt`` agrees with our generator); ``/history``,
  polled over HTTP from the test, shows the prompt finished with success and one output image of the expected size;
* a screenshot (1600x900) is saved to ``test-artifacts/browser/<name>.png``; with ``CODI_UPDATE_SCREENSHOTS=1`` also to
  ``docs/screenshots/<name>.png`` (the README's pictures).

The missing-node check is shown to fail: a workflow with a node of type ``CoDiDoesNotExist`` is reported by it.

Without Chromium (``/usr/bin/chromium`` or ``chromium`` on PATH, or ``$CODI_CHROMIUM``) or without the ``playwright``
package the module skips and says why; with ``CODI_REQUIRE_BROWSER=1`` (set by ``.ci/run``) that is a failure instead.

The frontend's first-run state is settled the way a returning user's is: the server's user settings get
``Comfy.TutorialCompleted`` (no template browser on start) and ``Comfy.Minimap.Visible = false`` (cleaner screenshots),
and the page's local storage ``vueNodesBannerDismissed`` (the "Introducing Nodes 2.0" banner). Readiness: the frontend
assigns ``window.app`` only after ``app.setup()`` has registered every node definition from ``/object_info``, then
loads the default workflow; the test waits for ``window.app``, the ``#graph-canvas`` element and a non-empty graph.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workflow_env import NAMES, OUTPUT_NODE, SIZE, load_api, load_ui

from harness import REPO_ROOT, comfy_server
from harness.browser import browser_skip_reason, chromium_context

ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1600, "height": 900}
FAKE_TYPE = "CoDiDoesNotExist"
MISSING_NODES_TITLE = "This workflow has missing nodes"  # the 1.32.9 dialog's title (missingNodes.oss.title)
TIMEOUT_MS = 120_000  # generous: other test processes may share the 2 cores


_reason = browser_skip_reason("layer D")
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(wf_base):
    # a returning user's settings (ComfyUI keeps them in user/default/comfy.settings.json): no template browser on the
    # first start, no minimap over the graph
    settings = wf_base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}), encoding="utf-8")
    with comfy_server(wf_base) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console: list[str] = []
    with chromium_context(VIEWPORT) as context:
        try:
            context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            pg = context.pages[0] if context.pages else context.new_page()
            pg.set_default_timeout(TIMEOUT_MS)
            pg.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            pg.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            pg.goto(server.url + "/")
            # window.app is assigned after app.setup() (node definitions registered); the default graph comes next
            pg.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                                 " && document.querySelector('#graph-canvas') && window.app.graph._nodes.length > 0",
                                 timeout=TIMEOUT_MS)
            pg.locator("#graph-canvas").wait_for(state="visible")
            _close_overlays(pg)
            yield pg
        finally:
            (ARTIFACTS / "console.log").write_text("\n".join(console) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- helpers


def _close_overlays(pg) -> None:
    """Close open dialogs and toasts (Escape closes the top PrimeVue dialog; toasts have close buttons)."""
    for _ in range(5):
        if pg.locator(".p-dialog").count() == 0:
            break
        pg.keyboard.press("Escape")
        pg.wait_for_timeout(200)
    for button in pg.locator(".p-toast-close-button").all():
        if button.is_visible():
            button.click()
    pg.wait_for_timeout(200)


def _drop_workflow(pg, workflow: dict, file_name: str) -> None:
    """Drop ``workflow`` as a file onto the canvas (the frontend's drop handler -> app.handleFile) and wait until the
    graph holds its nodes."""
    pg.evaluate("""([text, name]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: 'application/json'}));
        document.querySelector('#graph-canvas').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [json.dumps(workflow), file_name])
    ids = sorted(node["id"] for node in workflow["nodes"])
    pg.wait_for_function("""(ids) => {
        const have = window.app.graph._nodes.map(n => n.id).sort((a, b) => a - b);
        return JSON.stringify(have) === JSON.stringify(ids);
    }""", arg=ids, timeout=TIMEOUT_MS)
    pg.wait_for_timeout(500)  # the missing-nodes dialog / validation toast open right after configure


def _node_report(pg) -> dict:
    """What the page says about the loaded graph: each node's type and whether the frontend knows it, dialog and
    toast texts."""
    return pg.evaluate("""() => {
        const nodes = window.app.graph._nodes.map(n => ({
            id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
            has_errors: !!n.has_errors}));
        return {
            nodes,
            missing: nodes.filter(n => !n.registered || n.has_errors).map(n => n.type),
            dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText),
            toasts: [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText),
        };
    }""")


def _missing_node_types(report: dict) -> list[str]:
    """The missing-node check: node types the frontend does not know, plus any missing-nodes dialog."""
    missing = list(report["missing"])
    if any(MISSING_NODES_TITLE.lower() in d.lower() for d in report["dialogs"]):
        missing.append(f"<dialog: {MISSING_NODES_TITLE}>")
    return missing


def _screenshot(pg, name: str) -> Path:
    """Fit the graph to the window (the zoom controls' "Fit View" command), then save the page as a test artifact
    (and as the README's picture with CODI_UPDATE_SCREENSHOTS=1)."""
    pg.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    pg.wait_for_timeout(500)
    path = ARTIFACTS / f"{name}.png"
    pg.screenshot(path=str(path))
    if os.environ.get("CODI_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"{name}.png")
    return path


def _prompt_view(prompt: dict) -> dict:
    """An API prompt without titles: {node id: (class_type, inputs)}."""
    return {str(k): (v["class_type"], v["inputs"]) for k, v in prompt.items()}


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_and_runs_in_the_real_frontend(server, page, name):
    workflow = load_ui(name)
    _close_overlays(page)
    _drop_workflow(page, workflow, f"{name}.json")
    report = _node_report(page)

    assert _missing_node_types(report) == [], (name, report)
    assert sorted(n["type"] for n in report["nodes"]) == sorted(n["type"] for n in workflow["nodes"]), report
    assert report["dialogs"] == [], (name, report["dialogs"])
    assert report["toasts"] == [], (name, report["toasts"])  # e.g. "Invalid workflow against zod schema"
    assert page.evaluate("() => window.app.extensionManager.workflow.activeWorkflow?.filename") == name

    # queue from the page: the Run button (the split button's main part)
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                              timeout=TIMEOUT_MS) as posted:
        page.locator('[data-testid="queue-button"] button').first.click()
    response = posted.value
    assert response.ok, (name, response.status, response.text())
    prompt_id = response.json()["prompt_id"]
    sent = response.request.post_data_json["prompt"]
    assert _prompt_view(sent) == _prompt_view(load_api(name)), name  # the frontend's graphToPrompt = our API twin

    entry = server.wait_for_history(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", (name, entry["status"], server.log()[-5000:])
    (image,) = entry["outputs"][OUTPUT_NODE]["images"]
    with Image.open(server.base_dir / "output" / image["subfolder"] / image["filename"]) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.std() > 0, (name, pixels.shape)

    # the page shows the result in the Save Image node (websocket "executed"), then the screenshot
    page.wait_for_function("(id) => (window.app.graph.getNodeById(id)?.imgs?.length ?? 0) > 0",
                           arg=int(OUTPUT_NODE), timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)
    _screenshot(page, name)


def test_missing_node_check_reports_an_unknown_type(page):
    workflow = copy.deepcopy(load_ui("codi_canny"))
    fake = next(n for n in workflow["nodes"] if n["type"] == "CoDiCanny")
    fake["type"] = FAKE_TYPE
    _close_overlays(page)
    _drop_workflow(page, workflow, "codi_fake_node.json")
    report = _node_report(page)
    try:
        missing = _missing_node_types(report)
        assert FAKE_TYPE in missing, report
        assert f"<dialog: {MISSING_NODES_TITLE}>" in missing, report["dialogs"]
        assert any(FAKE_TYPE in d for d in report["dialogs"]), report["dialogs"]  # the dialog names the type
        assert [n["type"] for n in report["nodes"] if n["has_errors"]] == [FAKE_TYPE], report
        page.screenshot(path=str(ARTIFACTS / "missing_node.png"))  # an artifact only, never a README picture
    finally:
        _close_overlays(page)
