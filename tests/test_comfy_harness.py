"""Layer C smoke tests: the real ComfyUI 0.3.75 runs here, in-process and as a server, with our pack loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import PACK_DIRNAME, comfy_server, make_base_dir, run_inprocess

# A graph of stock nodes only: EmptyImage -> SaveImage (writes a PNG to the base directory's output folder).
STOCK_PROMPT = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16711680}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "codi_harness"}},
}


def _pack_import_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if f"custom_nodes/{PACK_DIRNAME}" in line]


def _pack_failures(log: str) -> list[str]:
    # ComfyUI's own audio nodes fail to import here on purpose (torchaudio is not installed: it would pull another
    # torch)
    return [line for line in _pack_import_lines(log) if "IMPORT FAILED" in line or "Cannot import" in line
            or "Error while calling comfy_entrypoint" in line]


def test_inprocess_runs_stock_prompt_and_loads_pack(comfy_base_dir: Path):
    run = run_inprocess(
        f"""
        import json
        prompt = json.loads({json.dumps(STOCK_PROMPT)!r})
        res = env.run_prompt(prompt)
        import comfyui_version, torch, comfy.model_management as mm
        from comfy_config import config_parser
        pack = env.folder_paths.get_folder_paths("custom_nodes")[0] + "/{PACK_DIRNAME}"
        cfg = config_parser.extract_node_configuration(pack)
        RESULT = {{
            "pyproject": [cfg.project.name, cfg.project.version, cfg.tool_comfy.publisher_id,
                          cfg.tool_comfy.display_name],
            "run": res,
            "output_dir": env.folder_paths.get_output_directory(),
            "custom_nodes": env.custom_node_results,
            "loaded_dirs": dict(env.nodes.LOADED_MODULE_DIRS),
            "version": comfyui_version.__version__,
            "device": str(mm.get_torch_device()),
            "nodes_module": env.nodes.__file__,
            "stock_nodes": len(env.nodes.NODE_CLASS_MAPPINGS),
        }}
        """,
        comfy_base_dir,
    )
    r = run.result
    assert r["version"] == "0.3.75"
    assert r["device"] == "cpu"
    # ComfyUI's own nodes.py, not our repo's nodes/ package
    assert Path(r["nodes_module"]).name == "nodes.py", r["nodes_module"]
    assert r["stock_nodes"] > 100
    # ComfyUI's own pyproject parser (used by the registry/manager and for web folders) reads our metadata
    assert r["pyproject"] == ["codi-distill", "0.1.0", "codi", "CoDi — few-step conditional adapters"]

    pack_path = str(comfy_base_dir / "custom_nodes" / PACK_DIRNAME)
    assert r["custom_nodes"].get(pack_path) is True, (r["custom_nodes"], run.log[-5000:])
    assert r["loaded_dirs"].get(PACK_DIRNAME) == pack_path
    assert not _pack_failures(run.log), run.log[-5000:]

    res = r["run"]
    assert res["valid"] and res["success"], res
    images = res["outputs"]["2"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    png = Path(r["output_dir"]) / images[0]["subfolder"] / images[0]["filename"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(r["output_dir"]).resolve() == (comfy_base_dir / "output").resolve()

    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (64, 48)
        assert im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_inprocess_reports_invalid_prompt(comfy_base_dir: Path):
    run = run_inprocess(
        """
        RESULT = env.run_prompt({"1": {"class_type": "NoSuchNodeCoDi", "inputs": {}}})
        """,
        comfy_base_dir,
    )
    assert run.result["valid"] is False
    assert "NoSuchNodeCoDi" in run.result["error"]["message"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfyui_dir):
    base = make_base_dir(tmp_path_factory.mktemp("comfy-server-base"))
    with comfy_server(base) as srv:
        yield srv


def test_server_object_info_and_pack_loaded(server):
    info = server.get_json("/object_info")
    for stock in ("KSampler", "CheckpointLoaderSimple", "ControlNetApplyAdvanced", "EmptyImage", "SaveImage"):
        assert stock in info, stock
    assert "127.0.0.1" in server.url

    log = server.log()
    lines = _pack_import_lines(log)
    assert lines, f"our pack did not appear in the custom node import list; log:\n{log[-5000:]}"
    assert not _pack_failures(log), log[-5000:]


def test_server_runs_stock_prompt(server):
    prompt_id = server.queue_prompt(STOCK_PROMPT)
    entry = server.wait_for_history(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    image = entry["outputs"]["2"]["images"][0]
    png = server.base_dir / "output" / image["subfolder"] / image["filename"]
    assert png.is_file()


def test_inprocess_detects_a_broken_pack(comfy_base_dir: Path, tmp_path: Path):
    # the checks above are not vacuous: a pack whose import raises is recorded as failed, ours still loads
    broken = tmp_path / "broken_pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('codi harness: deliberately broken pack')\n")
    make_base_dir(comfy_base_dir, pack_source=broken, pack_name="broken_pack")
    run = run_inprocess("RESULT = env.custom_node_results", comfy_base_dir)
    custom_nodes = comfy_base_dir / "custom_nodes"
    assert run.result == {str(custom_nodes / PACK_DIRNAME): True, str(custom_nodes / "broken_pack"): False}
    assert any("IMPORT FAILED" in line for line in run.log.splitlines() if "broken_pack" in line)
