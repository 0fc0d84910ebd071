"""The ComfyUI pack's files: entry point shape, packaging metadata, licence, installer hook."""

from __future__ import annotations

import ast
import subprocess
import sys

import tomllib

from harness import REPO_ROOT


def test_entry_point_is_v3_only():
    tree = ast.parse((REPO_ROOT / "__init__.py").read_text(encoding="utf-8"))
    names = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    assert "NODE_CLASS_MAPPINGS" not in names  # ComfyUI would ignore comfy_entrypoint then
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert isinstance(funcs.get("comfy_entrypoint"), ast.AsyncFunctionDef)
    # only what ComfyUI provides at the top level: relative imports for our own code
    top = {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 0}
    top |= {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert top <= {"comfy_api", "comfy", "torch", "numpy", "safetensors", "folder_paths", "__future__", "os",
                   "sys", "logging"}, top


def test_pyproject_metadata():
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = data["project"], data["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert project["version"].count(".") == 2 and project["license"] == "GPL-3.0-or-later"
    assert project["dependencies"] == []
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert comfy["requires-comfyui"] == ">=0.3.48"


def test_license_is_gpl3():
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3, 29 June 2007" in text
    assert len(text.splitlines()) > 600


def test_install_hook_is_a_fast_noop():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "install.py"), "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_install_hook_finds_missing_requirements(tmp_path):
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import install
    finally:
        sys.path.remove(str(REPO_ROOT))
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\npytest\ncodi-no-such-package-xyz>=1\npytest>=9999\npytest; python_version < '3'\n")
    assert install.missing_requirements(reqs) == ["codi-no-such-package-xyz>=1", "pytest>=9999"]
