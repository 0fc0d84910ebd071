"""Layer F harness: the real Forge and AUTOMATIC1111 v1.10.1 (``make webui``) come up headless and offline on the CPU
with this repository linked as ``extensions/codi``, answer their HTTP API and generate, and are gone afterwards.

Each UI starts once for the module (``webui`` fixture, parametrized); the test checkpoint is the micro SD1.5 with the
config A1111 needs beside it (``micro_sd15_webui``, built once per session). Random weights decode to NaN pixels:
the tests check statuses, the image container and the infotext, never pixel values.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.webui import (
    EXTENSION_NAME, KINDS, REPO_ROOT, WebUINotPrepared, WebUIServer, group_alive, require_webui,
    run_extension_installer,
)

TXT2IMG = {"prompt": "a photo of a cat", "negative_prompt": "", "steps": 2, "width": 64, "height": 64, "seed": 1,
           "cfg_scale": 5, "sampler_name": "Euler", "scheduler": "Karras", "batch_size": 1, "n_iter": 1}


@pytest.fixture(scope="module", params=KINDS)
def webui(request, micro_sd15_webui, tmp_path_factory) -> Iterator[WebUIServer]:
    """One server per UI for the whole module; after it stops, its process group must be gone."""
    kind = request.param
    try:
        require_webui(kind)
    except WebUINotPrepared as e:
        pytest.fail(str(e), pytrace=False)
    server = WebUIServer(kind, micro_sd15_webui.path, data_dir=tmp_path_factory.mktemp(f"webui-{kind}"))
    with server:
        print(f"{kind}: started in {server.startup_seconds:.1f} s")
        yield server
    assert not server.running() and not group_alive(server.pid), \
        f"{kind} is still running after the context exited (pid {server.pid})"


def test_api_answers(webui):
    status, samplers = webui.get("/sdapi/v1/samplers")
    assert status == 200, samplers
    assert "Euler" in {s["name"] for s in samplers}
    status, schedulers = webui.get("/sdapi/v1/schedulers")
    assert status == 200, schedulers
    assert {"automatic", "karras"} <= {s["name"] for s in schedulers}


def test_checkpoint_listed(webui, micro_sd15_webui):
    status, models = webui.get("/sdapi/v1/sd-models")
    assert status == 200, models
    stem = micro_sd15_webui.path.stem
    assert [m["model_name"] for m in models] == [stem], models
    assert Path(models[0]["filename"]).resolve() == micro_sd15_webui.path.resolve()


def has_origin_remote(repo: Path) -> bool:
    out = subprocess.run(["git", "-C", str(repo), "remote"], capture_output=True, text=True)
    return "origin" in out.stdout.split()


def test_extension_linked(webui):
    """The UI found the repository as ``extensions/codi``. ``/sdapi/v1/extensions`` lists only extensions whose git
    repository has an ``origin`` remote (a user's clone has one; a checkout without one makes the UI log "Failed
    reading extension data from Git repository (codi)" instead, which shows it read the folder all the same)."""
    link = webui.data_dir / "extensions" / EXTENSION_NAME
    assert link.is_symlink() and link.resolve() == REPO_ROOT
    status, extensions = webui.get("/sdapi/v1/extensions")
    assert status == 200, extensions
    ours = [e for e in extensions if e["name"] == EXTENSION_NAME]
    log = webui.log_text()
    if has_origin_remote(REPO_ROOT):
        assert ours and ours[0]["enabled"], extensions
    else:
        assert not ours and f"Failed reading extension data from Git repository ({EXTENSION_NAME})" in log
    # a script of ours that raises on import is only reported in the log ("*** Error loading script: codi.py")
    failed = [p.name for p in (REPO_ROOT / "scripts").glob("*.py") if f"Error loading script: {p.name}" in log]
    assert not failed, f"{webui.kind} could not load {failed}:\n{webui.log_tail()}"


def test_txt2img(webui, micro_sd15_webui):
    status, body = webui.post("/sdapi/v1/txt2img", TXT2IMG)
    assert status == 200, f"{body}\n{webui.log_tail()}"
    assert len(body["images"]) == 1
    assert base64.b64decode(body["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads(body["info"])
    infotext = info["infotexts"][0]
    assert infotext.startswith(TXT2IMG["prompt"] + "\n"), infotext
    for part in ("Steps: 2", "Sampler: Euler", "Schedule type: Karras", "Seed: 1", "Size: 64x64",
                 f"Model: {micro_sd15_webui.path.stem}"):
        assert part in infotext, infotext
    assert info["sd_model_hash"] and f"Model hash: {info['sd_model_hash']}" in infotext


def test_controlnet_api(webui):
    """A1111: Mikubill's sd-webui-controlnet is loaded. Forge: its built-in ControlNet serves the same API, except
    ``/controlnet/version``."""
    status, models = webui.get("/controlnet/model_list")
    assert status == 200 and isinstance(models["model_list"], list), models
    status, modules = webui.get("/controlnet/module_list")
    assert status == 200 and modules["module_list"], modules
    status, version = webui.get("/controlnet/version")
    if webui.kind == "a1111":
        assert status == 200 and isinstance(version["version"], int), version
    else:
        assert status == 404, version


def test_install_py_under_the_launcher(webui, tmp_path):
    """Our ``install.py`` as the launcher runs it on a normal start (the harness's start skips installers); a broken
    one is reported, so the check can fail."""
    run_extension_installer(webui.kind, webui.data_dir / "extensions" / EXTENSION_NAME)
    broken = tmp_path / "broken-extension"
    broken.mkdir()
    (broken / "install.py").write_text("import launch\nraise SystemExit('planted failure')\n")
    with pytest.raises(AssertionError, match="planted failure"):
        run_extension_installer(webui.kind, broken)


@pytest.mark.parametrize("kind", KINDS)
def test_gradio_page(kind, micro_sd15_webui, tmp_path):
    """With ``webui=True`` (``--api`` without ``--nowebui``) the UI starts headless too and serves its page at the
    root URL; its ``/internal/sysinfo`` lists the extensions the UI loaded, ours among them."""
    with WebUIServer(kind, micro_sd15_webui.path, data_dir=tmp_path, webui=True) as ui:
        status, page = ui.get_text("/")
        assert status == 200 and page.lstrip().lower().startswith("<!doctype html>"), page[:200]
        status, sysinfo = ui.get("/internal/sysinfo")
        assert status == 200, sysinfo
        assert EXTENSION_NAME in {e["name"] for e in sysinfo["Extensions"]}, sysinfo["Extensions"]
        status, _ = ui.get("/sdapi/v1/samplers")
        assert status == 200
    assert not group_alive(ui.pid)


def test_not_prepared_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("CODI_FORGE_DIR", str(tmp_path / "nothing"))
    with pytest.raises(WebUINotPrepared, match="Run `make webui`"):
        require_webui("forge")


def test_dead_server_is_reported(micro_sd15_webui, tmp_path):
    """A UI that exits during start-up raises at once with its log (here: a flag it does not know)."""
    require_webui("forge")
    server = WebUIServer("forge", micro_sd15_webui.path, data_dir=tmp_path, extra_args=("--no-such-flag",))
    with pytest.raises(AssertionError, match="exited with") as info:
        server.start()
    assert "--no-such-flag" in str(info.value)
    assert not group_alive(server.pid)
