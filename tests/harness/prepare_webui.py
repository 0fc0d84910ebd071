"""Prepare a real Stable Diffusion web UI for the layer-F tests (``make webui``): Forge or AUTOMATIC1111 v1.10.1.

Usage: ``python tests/harness/prepare_webui.py {forge|a1111} DEST``

Everything comes from local source archives (never from GitHub or Hugging Face at run time), found in
``$CODI_WEBUI_ARCHIVES``, else ``<repo>/../shared/webui``, else ``/work/shared/webui`` (its README lists each archive,
its commit and where it goes). The script

1. unpacks the UI into DEST and the repositories its launcher would ``git clone`` into ``DEST/repositories/`` (A1111
   also gets Mikubill's sd-webui-controlnet in ``DEST/extensions/sd-webui-controlnet``); the launchers then run with
   ``--skip-prepare-environment``, so they never try to clone or install anything;
2. writes ``DEST/requirements-codi.txt``: the UI's pinned requirements with torch/torchvision replaced by the torch
   pins of this machine (a plain ``torch`` line makes pip fetch a CUDA build from the internet) and ``setuptools``
   re-pinned (the UIs' ``setuptools==69.5.1`` conflicts with torch 2.14 and sends pip backtracking into other torch
   releases), plus what the UI needs beyond its file (see ``KINDS``), and installs it into ``DEST/venv``; A1111's
   ControlNet extension's requirements follow in a second pip call (``DEST/requirements-codi-extensions.txt``), as
   its ``install.py`` would install them after the UI's;
3. A1111 only: seeds the ``openai/clip-vit-large-patch14`` tokenizer and text-encoder config into a Hugging Face
   cache of its own, ``DEST/hf-home`` (A1111 reads them at start-up even when the checkpoint holds the weights; the
   files are taken from Forge's archive, which ships them under ``backend/huggingface/``);
4. writes ``DEST/.codi-prepared`` holding a hash of every input (archives, requirements, this recipe, the Python),
   so a second run with the same inputs returns at once.

Resumable: the stamp is removed before anything else and written last, so a half-finished prepare is never taken
for a finished one; the sources are re-extracted unless their own step finished, and an interrupted ``pip install``
is resumed in the same venv. AGPL/GPL code: it is unpacked as a test fixture under ``.cache/`` (git-ignored), never
copied into this repository. Only the standard library is used (run by any Python 3.11; the venv uses that
Python's base interpreter).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STAMP = ".codi-prepared"
STEPS_DIR = ".codi-steps"  # one marker file per finished step (sources, venv)
REQUIREMENTS_FILE = "requirements-codi.txt"
EXTENSION_REQUIREMENTS_FILE = "requirements-codi-extensions.txt"
HF_HOME = "hf-home"
# Bump when the recipe below changes in a way the hashed inputs do not show.
RECIPE_VERSION = 1

TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
# torch 2.14 wants setuptools >= 77.0.3; the UIs pin 69.5.1 ("temp fix"), which sends pip backtracking.
SETUPTOOLS_PIN = "setuptools>=77.0.3,<81"
REPLACED = {"torch", "torchvision", "torchaudio", "setuptools"}

CLIP_L_REPO = "models--openai--clip-vit-large-patch14"
# Any 40-hex id works offline: huggingface_hub reads refs/main and opens snapshots/<id>/.
CLIP_L_SNAPSHOT = hashlib.sha1(b"codi seeded openai/clip-vit-large-patch14").hexdigest()
FORGE_SD15 = "backend/huggingface/runwayml/stable-diffusion-v1-5/"
CLIP_L_FILES = {  # file in the HF snapshot: file in Forge's tree
    "vocab.json": FORGE_SD15 + "tokenizer/vocab.json",
    "merges.txt": FORGE_SD15 + "tokenizer/merges.txt",
    "special_tokens_map.json": FORGE_SD15 + "tokenizer/special_tokens_map.json",
    "tokenizer_config.json": FORGE_SD15 + "tokenizer/tokenizer_config.json",
    "config.json": FORGE_SD15 + "text_encoder/config.json",
}


@dataclass(frozen=True)
class Kind:
    """What one UI needs: its archive, what its launcher clones (archive -> folder), its requirements."""

    name: str
    archive: str
    places: dict[str, str]  # folder in DEST: archive
    requirement_files: tuple[str, ...]  # relative to DEST, concatenated after the torch lines are replaced
    extra_requirements: tuple[str, ...] = ()
    # installed by a second pip call, as the launcher runs an extension's install.py after the UI's requirements
    # (so the extension may move a UI pin, e.g. protobuf for mediapipe, as it does for users)
    extension_requirement_files: tuple[str, ...] = ()
    extension_extra_requirements: tuple[str, ...] = ()
    no_deps: tuple[str, ...] = ()  # installed afterwards with --no-deps
    seed_clip_l: bool = False


KINDS = {
    "forge": Kind(
        name="Forge f2.0.1v1.10.1 (dfdcbab6)",
        archive="stable-diffusion-webui-forge-dfdcbab6.tar.gz",
        places={
            "repositories/stable-diffusion-webui-assets": "stable-diffusion-webui-assets-6f7db241.tar.gz",
            "repositories/huggingface_guess": "huggingface_guess-84826248.tar.gz",
            "repositories/BLIP": "BLIP-48211a15.tar.gz",
        },
        requirement_files=("requirements_versions.txt",),
        # extensions-builtin/soft-inpainting imports joblib, which the requirements do not list
        extra_requirements=("joblib",),
    ),
    "a1111": Kind(
        name="AUTOMATIC1111 v1.10.1 (82a973c0) + sd-webui-controlnet v1.1.455 (56cec5b2)",
        archive="stable-diffusion-webui-82a973c0.tar.gz",
        places={
            "repositories/stable-diffusion-webui-assets": "stable-diffusion-webui-assets-6f7db241.tar.gz",
            "repositories/stable-diffusion-stability-ai": "stablediffusion-cf1d67a6.tar.gz",
            "repositories/generative-models": "generative-models-45c443b3.tar.gz",
            "repositories/k-diffusion": "k-diffusion-ab527a9a.tar.gz",
            "repositories/BLIP": "BLIP-48211a15.tar.gz",
            "extensions/sd-webui-controlnet": "sd-webui-controlnet-56cec5b2.tar.gz",
        },
        requirement_files=("requirements_versions.txt",),
        # sd-webui-controlnet's requirements alone resolve to numpy 2.x (the UI needs 1.26) and a mediapipe without
        # `solutions`; opencv >= 4.12 wants numpy 2. mediapipe 0.10.14 needs protobuf 4 where the UI pins 3.20.0:
        # the extension's install.py upgrades it for users too (open-clip-torch's protobuf<4 is not enforced).
        extension_requirement_files=("extensions/sd-webui-controlnet/requirements.txt",),
        extension_extra_requirements=("numpy==1.26.2", "mediapipe==0.10.14", "opencv-python-headless<4.12",
                                      "opencv-python<4.12", "opencv-contrib-python<4.12"),
        # k-diffusion imports `clip` (the launcher installs OpenAI's CLIP from GitHub); its PyPI copy pins an old torch
        no_deps=("openai-clip==1.0.1",),
        seed_clip_l=True,
    ),
}
# The A1111 prepare reads the CLIP-L tokenizer and config out of Forge's archive.
CLIP_L_ARCHIVE = KINDS["forge"].archive


class PrepareError(RuntimeError):
    pass


_T0 = time.monotonic()


def say(kind: str, message: str) -> None:
    print(f"[prepare {kind} {time.monotonic() - _T0:6.0f} s] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------- inputs


def archives_dir() -> Path:
    """``$CODI_WEBUI_ARCHIVES``, else ``<repo>/../shared/webui``, else ``/work/shared/webui`` (CI runs a clean clone
    beside the shared folder, developers run the main checkout)."""
    env = os.environ.get("CODI_WEBUI_ARCHIVES")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise PrepareError(f"CODI_WEBUI_ARCHIVES={env} is not a folder")
        return path
    for candidate in (REPO_ROOT.parent / "shared" / "webui", Path("/work/shared/webui")):
        if candidate.is_dir():
            return candidate.resolve()
    raise PrepareError(
        "the web UI source archives were not found in <repo>/../shared/webui or /work/shared/webui: set "
        "CODI_WEBUI_ARCHIVES to the folder holding stable-diffusion-webui-forge-dfdcbab6.tar.gz and the other "
        "archives listed in tests/harness/prepare_webui.py")


def archive_paths(kind: Kind) -> dict[str, Path]:
    folder = archives_dir()
    names = [kind.archive, *kind.places.values()] + ([CLIP_L_ARCHIVE] if kind.seed_clip_l else [])
    paths = {name: folder / name for name in dict.fromkeys(names)}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise PrepareError(f"missing in {folder}: {', '.join(missing)} (set CODI_WEBUI_ARCHIVES to the folder that "
                           "holds them)")
    return paths


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_python() -> str:
    """The interpreter the UI's venv is made from: this Python's base (not a venv's wrapper)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def python_identity(python: str) -> str:
    out = subprocess.run([python, "-c", "import sys, platform; print(sys.version, platform.machine())"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def input_hashes(kind_key: str, archives: dict[str, Path], python: str) -> dict[str, str]:
    """``sources``: what the sources step depends on (the archives, the recipe); ``all``: what the whole prepare
    depends on (those, the pins, the Python), checked before anything else against the stamp."""
    kind = KINDS[kind_key]
    sources = hashlib.sha256(json.dumps(
        {"recipe": RECIPE_VERSION, "kind": asdict(kind),
         "archives": {name: file_sha256(path) for name, path in archives.items()}}, sort_keys=True).encode())
    everything = hashlib.sha256(json.dumps(
        {"sources": sources.hexdigest(), "pins": [*TORCH_PINS, SETUPTOOLS_PIN], "python": python_identity(python)},
        sort_keys=True).encode())
    return {"sources": sources.hexdigest()[:16], "all": everything.hexdigest()[:16]}


def venv_hash(requirements: list[Path], kind_key: str, python: str) -> str:
    """What the venv depends on: the requirement files as written (pins included), the --no-deps packages and the
    Python. A change elsewhere in the sources re-extracts them but keeps the venv."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in requirements)
    return hashlib.sha256(json.dumps({"requirements": text, "no_deps": KINDS[kind_key].no_deps,
                                      "python": python_identity(python)}).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------------------- sources


def extract_archive(archive: Path, dest: Path) -> int:
    """Extract an archive's single top-level folder *into* ``dest`` (its contents, not the folder itself)."""
    count = 0
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        tops = {m.name.split("/", 1)[0] for m in members}
        if len(tops) != 1:
            raise PrepareError(f"{archive.name}: expected one top-level folder, found {sorted(tops)}")
        top = tops.pop() + "/"
        chosen = []
        for member in members:
            if not member.name.startswith(top):
                continue
            member.name = member.name[len(top):]
            if member.islnk():
                member.linkname = member.linkname.removeprefix(top)
            chosen.append(member)
            count += 1
        dest.mkdir(parents=True, exist_ok=True)
        tf.extractall(dest, members=chosen, filter="data")
    return count


def wipe_except(dest: Path, keep: set[str]) -> None:
    for child in dest.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def prepare_sources(kind_key: str, dest: Path, archives: dict[str, Path]) -> None:
    kind = KINDS[kind_key]
    say(kind_key, f"unpacking {kind.archive} into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    wipe_except(dest, keep={"venv", STEPS_DIR})
    n = extract_archive(archives[kind.archive], dest)
    for folder, name in kind.places.items():
        target = dest / folder
        if target.exists():  # the UI ships some of these folders empty (extensions/, repositories/ placeholders)
            shutil.rmtree(target)
        n += extract_archive(archives[name], target)
        say(kind_key, f"  {name} -> {folder}")
    say(kind_key, f"{n} files unpacked")


# ----------------------------------------------------------------------------------------------------------- venv


def requirement_name(line: str) -> str | None:
    stripped = line.split("#", 1)[0].strip()
    if not stripped or stripped.startswith("-"):
        return None
    name = re.split(r"[\s<>=!~;\[@]", stripped, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def write_requirements(kind_key: str, dest: Path, files: tuple[str, ...], extras: tuple[str, ...],
                       name: str) -> Path:
    """Requirement files with torch/torchvision/setuptools replaced by this machine's pins, plus ``extras``."""
    kind = KINDS[kind_key]
    lines = [f"# written by tests/harness/prepare_webui.py for {kind.name}", *TORCH_PINS, SETUPTOOLS_PIN]
    for rel in files:
        text = (dest / rel).read_text(encoding="utf-8").replace("\r", "")  # Forge's file has CRLF line endings
        lines.append(f"# from {rel}")
        for line in text.splitlines():
            if requirement_name(line) in REPLACED:
                lines.append(f"# replaced by the pins above: {line}")
            else:
                lines.append(line)
    if extras:
        lines.append("# needed beyond the files above (tests/harness/prepare_webui.py says why)")
        lines.extend(extras)
    path = dest / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def venv_python(dest: Path) -> Path:
    return dest / "venv" / "bin" / "python"


def run(cmd: list[str], kind_key: str) -> None:
    say(kind_key, "$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PrepareError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}; run the prepare again once the "
                           "cause is fixed (it resumes)")


def drop_partial_installs(kind_key: str, venv: Path) -> None:
    """Forget the packages an interrupted pip left half-installed: pip writes a wheel's files (its ``.dist-info``
    among them) first and the ``INSTALLER`` file after them, and counts any ``.dist-info`` with metadata as installed.
    Without ``INSTALLER`` the ``.dist-info`` is removed, so the resumed ``pip install`` installs the package again."""
    for info in sorted(venv.glob("lib/python*/site-packages/*.dist-info")):
        if not (info / "INSTALLER").is_file():
            say(kind_key, f"  {info.name} was left half-installed: installing it again")
            shutil.rmtree(info)


def write_all_requirements(kind_key: str, dest: Path) -> list[Path]:
    """The requirement files of the pip calls, in order (the UI's, then its extensions')."""
    kind = KINDS[kind_key]
    files = [write_requirements(kind_key, dest, kind.requirement_files, kind.extra_requirements, REQUIREMENTS_FILE)]
    if kind.extension_requirement_files:
        files.append(write_requirements(kind_key, dest, kind.extension_requirement_files,
                                        kind.extension_extra_requirements, EXTENSION_REQUIREMENTS_FILE))
    return files


def prepare_venv(kind_key: str, dest: Path, python: str, requirements: list[Path], digest: str) -> None:
    """Create ``DEST/venv`` (or resume the interrupted install recorded in ``venv/.codi-pending``) and install."""
    kind = KINDS[kind_key]
    venv = dest / "venv"
    pending = venv / ".codi-pending"
    resumable = venv_python(dest).exists() and pending.is_file() and pending.read_text().strip() == digest
    if not resumable:
        if venv.exists():
            say(kind_key, f"removing the old venv {venv}")
            shutil.rmtree(venv)
        run([python, "-m", "venv", str(venv)], kind_key)
        pending.write_text(digest + "\n")
    else:
        say(kind_key, f"resuming the install in {venv}")
        drop_partial_installs(kind_key, venv)
    vpy = str(venv_python(dest))
    for path in requirements:
        run([vpy, "-m", "pip", "install", "--no-input", "--progress-bar", "off", "-r", str(path)], kind_key)
    if kind.no_deps:
        run([vpy, "-m", "pip", "install", "--no-input", "--no-deps", *kind.no_deps], kind_key)
    pending.unlink()


# ------------------------------------------------------------------------------------------------- offline files


def seed_clip_l(kind_key: str, dest: Path, archives: dict[str, Path]) -> None:
    """``$HF_HOME/hub/models--openai--clip-vit-large-patch14`` with the tokenizer files and text-encoder config."""
    hub = dest / HF_HOME / "hub" / CLIP_L_REPO
    snapshot = hub / "snapshots" / CLIP_L_SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    wanted = {f"stable-diffusion-webui-forge/{src}": name for name, src in CLIP_L_FILES.items()}
    with tarfile.open(archives[CLIP_L_ARCHIVE]) as tf:
        for member in tf.getmembers():
            if member.name in wanted:
                (snapshot / wanted.pop(member.name)).write_bytes(tf.extractfile(member).read())
    if wanted:
        raise PrepareError(f"{CLIP_L_ARCHIVE} lacks {sorted(wanted)}")
    (hub / "refs").mkdir(exist_ok=True)
    (hub / "refs" / "main").write_text(CLIP_L_SNAPSHOT)
    say(kind_key, f"seeded openai/clip-vit-large-patch14 (tokenizer + config) in {hub}")


# ----------------------------------------------------------------------------------------------------------- main


def step_done(dest: Path, step: str, digest: str) -> bool:
    marker = dest / STEPS_DIR / step
    return marker.is_file() and marker.read_text().strip() == digest


def mark_step(dest: Path, step: str, digest: str) -> None:
    (dest / STEPS_DIR).mkdir(parents=True, exist_ok=True)
    (dest / STEPS_DIR / step).write_text(digest + "\n")


def prepare(kind_key: str, dest: Path) -> Path:
    if kind_key not in KINDS:
        raise PrepareError(f"unknown web UI {kind_key!r}: choose one of {', '.join(KINDS)}")
    kind = KINDS[kind_key]
    archives = archive_paths(kind)
    python = base_python()
    hashes = input_hashes(kind_key, archives, python)
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().strip() == hashes["all"] and venv_python(dest).exists():
        say(kind_key, f"{kind.name} already prepared in {dest}")
        return dest
    say(kind_key, f"preparing {kind.name} in {dest} (archives from {archives[kind.archive].parent})")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / STEPS_DIR).is_dir():
        raise PrepareError(f"{dest} is not empty and was not made by this script: give an empty or new folder")
    (dest / STEPS_DIR).mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    if not step_done(dest, "sources", hashes["sources"]):
        (dest / STEPS_DIR / "sources").unlink(missing_ok=True)
        prepare_sources(kind_key, dest, archives)
        mark_step(dest, "sources", hashes["sources"])
    else:
        say(kind_key, "sources already unpacked")
    requirements = write_all_requirements(kind_key, dest)
    digest = venv_hash(requirements, kind_key, python)
    if not step_done(dest, "venv", digest) or not venv_python(dest).exists():
        (dest / STEPS_DIR / "venv").unlink(missing_ok=True)
        prepare_venv(kind_key, dest, python, requirements, digest)
        mark_step(dest, "venv", digest)
    else:
        say(kind_key, "venv already installed")
    if kind.seed_clip_l:
        seed_clip_l(kind_key, dest, archives)
    (dest / HF_HOME).mkdir(exist_ok=True)
    stamp.write_text(hashes["all"] + "\n")
    say(kind_key, f"{kind.name} prepared in {dest}")
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in KINDS:
        print(__doc__.split("\n\n", 2)[1], file=sys.stderr)
        return 2
    try:
        prepare(argv[1], Path(argv[2]).expanduser().absolute())
    except PrepareError as e:
        print(f"prepare_webui.py {argv[1]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
