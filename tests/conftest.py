"""Shared pytest fixtures. Keep this small: fixtures for one area live in that area's test modules or helpers.

The real ComfyUI (layer C) is prepared by ``make comfyui`` (``make test`` does it first); tests that need it use the
``comfyui_dir`` fixture, which fails with instructions when it is missing rather than skipping silently.
"""

from __future__ import annotations

import os

# One intra-op thread: on the 2-core test machines torch with 2 threads runs these small models 10-60x slower (thread
# contention with the other processes the suite starts). Subprocesses (trainer runs, ComfyUI) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

from harness import REPO_ROOT, ComfyUINotPrepared, make_base_dir, require_comfyui  # noqa: E402

# session fixtures: random-weight checkpoints (micro_sd15, small_sd2v, small_sdxl, ...), the workflow tests' wf_base
# and the trainer tests' gray_pairs
pytest_plugins = ["model_builders", "workflow_env", "trainer_helpers"]


class _RepoRootIsNotATestPackage:
    """The repo root has an ``__init__.py`` (the ComfyUI entry point, which imports ``comfy_api``): pytest would collect
    the root as a Package and import that file, failing outside ComfyUI. Collect the root as a plain directory."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent):
        if path == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config: pytest.Config) -> None:
    # registered as a global plugin: conftest hooks only see paths below tests/, and the root is collected before them
    config.pluginmanager.register(_RepoRootIsNotATestPackage(), "codi-repo-root-is-not-a-test-package")


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    try:
        return require_comfyui()
    except ComfyUINotPrepared as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def comfy_base_dir(comfyui_dir: Path, tmp_path: Path) -> Path:
    """A fresh ComfyUI ``--base-directory`` with our pack linked as ``custom_nodes/codi``."""
    return make_base_dir(tmp_path / "comfy-base")
