"""Installer hook for ComfyUI-Manager (runs it after ``requirements.txt`` on install/update) and Automatic1111/Forge
(runs it on every launch), so it is idempotent and fast: it reads ``requirements.txt`` beside it, checks each entry
against the installed distributions (``importlib.metadata``) and installs only what is missing or too old — through
``launch.run_pip`` under A1111/Forge, through ``python -m pip`` otherwise.

Today the node pack needs nothing beyond ComfyUI's own requirements, so ``requirements.txt`` lists no package and this
script checks nothing and installs nothing. ``python install.py --dry-run`` prints what it would install.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    if not path.is_file():
        return []
    reqs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):  # options (-r, --index-url, ...) are not followed here
            reqs.append(line)
    return reqs


def is_satisfied(requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no packaging: a name check is all we can do
        name = re.split(r"[\s<>=!~;\[@]", requirement, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return True  # not meant for this platform
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return not req.specifier or req.specifier.contains(installed, prereleases=True)


def missing_requirements(path: Path = REQUIREMENTS) -> list[str]:
    return [r for r in read_requirements(path) if not is_satisfied(r)]


def _a1111_launch():
    try:
        import launch  # Automatic1111 / Forge put their launch module on sys.path for extension installers
    except ImportError:
        return None
    return launch if hasattr(launch, "run_pip") else None


def install(requirements: list[str]) -> None:
    launch = _a1111_launch()
    for req in requirements:
        if launch is not None:
            launch.run_pip(f'install "{req}"', f"CoDi requirement: {req}")
        else:
            subprocess.check_call([sys.executable, "-m", "pip", "install", req])


def main(argv: list[str]) -> int:
    missing = missing_requirements()
    if not missing:
        return 0
    if "--dry-run" in argv:
        print("CoDi would install: " + " ".join(missing))
        return 0
    install(missing)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
