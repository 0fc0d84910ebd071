"""Run the real Stable Diffusion web UIs — Forge and AUTOMATIC1111 v1.10.1 — from tests (layer F), headless, offline,
on the CPU, with this repository installed as the extension ``extensions/codi``.

``make webui`` prepares each UI in its own folder (``prepare_webui.py``: sources, ``venv``, offline files; default
``webui-build/forge`` and ``webui-build/a1111``, or ``$CODI_FORGE_DIR`` / ``$CODI_A1111_DIR``). A test then starts a
server::

    with WebUIServer("forge", checkpoint, data_dir=tmp) as ui:     # launch.py ... --api --nowebui --port <free>
        status, body = ui.post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "width": 64, "height": 64})
        ui.log_text()                                               # the server's stdout + stderr

Like the ComfyUI harness, a UI never runs inside the pytest process: it runs its own ``launch.py`` with its own
``venv`` (its pins differ from ours: gradio 3/4, transformers 4.30/4.46, pydantic 1/2), in its own process group,
from the UI folder. Everything a run writes — settings (``config.json``), caches, outputs, the model folders and
the ``extensions`` folder — lives in a data folder of its own (the UIs' ``--data-dir``): the prepared UI folder is
shared and stays as ``make webui`` left it, and a run starts from default settings. In that data folder
``extensions/codi`` is a symlink to the repository root (the repository *is* the extension, as a developer's clone
in ``extensions/`` would be), the UI's own installed extensions (A1111: Mikubill's ``sd-webui-controlnet``) are
linked beside it, and the checkpoints and ControlNet files a test gives are linked into ``models/Stable-diffusion``
and ``models/ControlNet`` (both UIs read that folder under ``--data-dir``; Mikubill also reads its own
``extensions/sd-webui-controlnet/models``).

The launchers run with ``--skip-prepare-environment`` (no git clones, no pip; this also skips the extension
installers, so :func:`run_extension_installer` runs ``install.py`` the way the launcher would, separately).
``/sdapi/v1/server-stop`` does not end a ``--nowebui`` server: the harness ends the process group by its id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from harness.comfyui import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("forge", "a1111")
NAMES = {"forge": "Forge (dfdcbab6)", "a1111": "AUTOMATIC1111 v1.10.1"}
DIR_VARIABLES = {"forge": "CODI_FORGE_DIR", "a1111": "CODI_A1111_DIR"}
EXTENSION_NAME = "codi"
STAMP = ".codi-prepared"  # written last by prepare_webui.py
HF_HOME = "hf-home"  # prepare_webui.py seeds A1111's CLIP-L tokenizer + config here

# Flags measured to bring each UI up headless on a CPU without a network (see the archives' README.md):
# --skip-prepare-environment: no git clone / pip; Forge ignores --use-cpu and needs --always-cpu; A1111 reads the
# CLIP-L tokenizer from the HF cache and must not fetch the CLIP weights (--do-not-download-clip).
KIND_FLAGS = {
    "forge": ("--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--always-cpu",
              "--all-in-fp32", "--no-half", "--no-download-sd-model"),
    "a1111": ("--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--use-cpu", "all",
              "--no-half", "--disable-opt-split-attention", "--do-not-download-clip", "--no-download-sd-model"),
}
READY_PATH = "/sdapi/v1/samplers"
LOG_NAME = "webui-server.log"
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "COMMANDLINE_ARGS")


class WebUINotPrepared(RuntimeError):
    pass


STARTED_LINE = "Startup time:"


def webui_dir(kind: str) -> Path:
    """The folder ``make webui`` prepares for ``kind``: ``$CODI_FORGE_DIR`` / ``$CODI_A1111_DIR`` or
    ``<repo>/webui-build/<kind>`` (not checked). Not under ``.cache/`` like ComfyUI: A1111's Gradio 3 refuses to
    serve any file whose path has a folder starting with a dot, so its page would load without its scripts."""
    if kind not in KINDS:
        raise ValueError(f"unknown web UI {kind!r}: one of {', '.join(KINDS)}")
    env = os.environ.get(DIR_VARIABLES[kind])
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "webui-build" / kind


def require_webui(kind: str) -> Path:
    """The prepared UI folder, or :class:`WebUINotPrepared` saying how to prepare it."""
    path = webui_dir(kind)
    if not (path / STAMP).is_file() or not (path / "launch.py").is_file() or not venv_python(path).exists():
        raise WebUINotPrepared(
            f"{NAMES[kind]} is not prepared in {path}. Run `make webui` (or `make test`, which does it), or point "
            f"{DIR_VARIABLES[kind]} at a folder that `make webui` prepared.")
    return path


def venv_python(ui_dir: Path) -> Path:
    return ui_dir / "venv" / "bin" / "python"


def server_env(ui_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The UI's environment: no variable that could point it at our Python or add flags, offline, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
                "HF_HOME": str(ui_dir / HF_HOME), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                # the UI folder sits in our checkout (webui-build/): without a ceiling `git rev-parse` in the UI folder
                # reports *our* commit as the UI's. Extensions' own repositories are opened directly, not searched.
                "GIT_CEILING_DIRECTORIES": str(ui_dir.parent)})
    if extra:
        env.update(extra)
    return env


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == target.resolve():
            return
        raise FileExistsError(f"{link} already exists and is not a link to {target}")
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def make_data_dir(kind: str, root: Path | str, *, checkpoints: Iterable[Path | str] = (),
                  controlnets: Iterable[Path | str] = ()) -> Path:
    """A ``--data-dir`` for ``kind`` under ``root``: ``extensions/codi`` -> the repository, the UI's own extensions,
    ``models/Stable-diffusion/<file>`` and ``models/ControlNet/<file>`` -> the given files (a checkpoint's
    ``<stem>.yaml`` beside it, A1111's per-checkpoint config, is linked with it)."""
    ui_dir = require_webui(kind)
    data = Path(root).resolve()
    _link(data / "extensions" / EXTENSION_NAME, REPO_ROOT)
    for ext in sorted((ui_dir / "extensions").iterdir()):
        if ext.is_dir() and ext.name != EXTENSION_NAME:
            _link(data / "extensions" / ext.name, ext)
    for ckpt in map(Path, checkpoints):
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        _link(data / "models" / "Stable-diffusion" / ckpt.name, ckpt)
        if ckpt.with_suffix(".yaml").is_file():
            _link(data / "models" / "Stable-diffusion" / ckpt.with_suffix(".yaml").name, ckpt.with_suffix(".yaml"))
    (data / "models" / "ControlNet").mkdir(parents=True, exist_ok=True)
    for cn in map(Path, controlnets):
        if not cn.is_file():
            raise FileNotFoundError(f"ControlNet file {cn} does not exist")
        _link(data / "models" / "ControlNet" / cn.name, cn)
    return data


def run_extension_installer(kind: str, extension_dir: Path | str, *, timeout: float = 300) -> str:
    """Run an extension's ``install.py`` as the UI's launcher does on a start without ``--skip-install``
    (``modules.launch_utils.run_extension_installer``: the UI's Python, ``PYTHONPATH`` = the UI folder so ``import
    launch`` works, cwd = the UI folder). Returns its output; raises AssertionError when the launcher reports an
    error (at start-up it would only print it and go on)."""
    ui_dir = require_webui(kind)
    ext = Path(extension_dir).absolute()
    if not (ext / "install.py").is_file():
        raise FileNotFoundError(f"{ext} has no install.py")
    code = ("import sys; from modules import launch_utils; launch_utils.run_extension_installer(sys.argv[1]); "
            "print('CODI-INSTALLER-DONE')")
    proc = subprocess.run([str(venv_python(ui_dir)), "-c", code, str(ext)], cwd=ui_dir, env=server_env(ui_dir),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or "CODI-INSTALLER-DONE" not in out or "Error running install.py" in out:
        raise AssertionError(f"{NAMES[kind]}'s extension installer failed on {ext} (exit {proc.returncode}):\n{out}")
    return out


class WebUIServer:
    """A running web UI (context manager): ``launch.py`` on a free loopback port with the repository linked as
    ``extensions/codi`` in its data folder (see the module docstring).

    ``checkpoints``: one path or several (at least one: Forge refuses to start without a checkpoint);
    ``controlnets``: files for ``models/ControlNet``; ``data_dir``: the ``--data-dir`` (default: a temporary folder,
    removed on exit); ``webui``: also serve the Gradio page (``--api`` without ``--nowebui``) at :attr:`url`."""

    def __init__(self, kind: str, checkpoints: Path | str | Sequence[Path | str], *,
                 controlnets: Iterable[Path | str] = (), data_dir: Path | str | None = None, port: int | None = None,
                 webui: bool = False, extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 start_timeout: float = 300):
        self.kind = kind
        self.ui_dir = require_webui(kind)
        self.checkpoints = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else list(map(Path, checkpoints))
        if not self.checkpoints:
            raise ValueError(f"{NAMES[kind]} needs a checkpoint in models/Stable-diffusion to start")
        self.controlnets = list(map(Path, controlnets))
        self._own_data_dir = data_dir is None
        self.data_dir = Path(data_dir).resolve() if data_dir else Path(tempfile.mkdtemp(prefix=f"codi-{kind}-"))
        self.port = port or free_port()
        self.webui = webui
        self.extra_args = tuple(extra_args)
        self.extra_env = env
        self.start_timeout = start_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / LOG_NAME
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        return [str(venv_python(self.ui_dir)), "launch.py", *KIND_FLAGS[self.kind], "--api",
                # the page's own scripts and styles live in the UI folder, which Gradio serves only from allowed
                # paths (by default just the --data-dir, which is the UI folder in a normal install)
                *(["--gradio-allowed-path", str(self.ui_dir)] if self.webui else ["--nowebui"]),
                "--port", str(self.port), "--server-name", "127.0.0.1",
                "--data-dir", str(self.data_dir), *self.extra_args]

    def start(self) -> WebUIServer:
        make_data_dir(self.kind, self.data_dir, checkpoints=self.checkpoints, controlnets=self.controlnets)
        start = time.monotonic()
        env = server_env(self.ui_dir, self.extra_env)
        with open(self.log_path, "w", encoding="utf-8") as log_file:
            self.process = subprocess.Popen(self.command(), cwd=self.ui_dir, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_ready(start)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - start
        return self

    def _wait_until_ready(self, start: float) -> None:
        deadline = start + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"{NAMES[self.kind]} exited with {self.process.returncode} during start-up; "
                                     f"log {self.log_path}:\n{self.log_tail()}")
            # No request before the UI prints its startup time: with the page, the Gradio app serves while the UI
            # still adds its API, and A1111 then dies on "Cannot add middleware after an application has started"
            # (the first request builds the middleware stack); the extensions' routes (/controlnet/*) also come
            # only with the app_started callbacks, which both UIs run before that line.
            if STARTED_LINE in self.log_text():
                status, _ = self.get(READY_PATH, timeout=10, quiet=True)
                if status == 200 and (not self.webui or self.get_text("/", timeout=10)[0] == 200):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{NAMES[self.kind]} did not answer {READY_PATH} within {self.start_timeout:.0f}"
                                     f" s; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30) -> None:
        """End the whole process group (the UI starts no helpers today, but a stray child must not outlive it)."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the launcher's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 15)):
            if not group_alive(pgid):
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while group_alive(pgid) and time.monotonic() < deadline:
                if self.process.poll() is None:
                    try:
                        self.process.wait(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    time.sleep(0.2)
        self.process.poll()

    def __enter__(self) -> WebUIServer:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if self._own_data_dir and exc_type is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------ HTTP

    def _request(self, path: str, data: Any = None, *, timeout: float, quiet: bool = False) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
        try:
            with opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if quiet:
                return 0, b""
            raise

    @staticmethod
    def _decode(raw: bytes) -> Any:
        try:
            return json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return raw.decode(errors="replace")

    def get(self, path: str, *, timeout: float = 60, quiet: bool = False) -> tuple[int, Any]:
        """``GET path`` -> (HTTP status, decoded JSON or the text when it is not JSON)."""
        status, raw = self._request(path, timeout=timeout, quiet=quiet)
        return status, self._decode(raw)

    def get_text(self, path: str, *, timeout: float = 60) -> tuple[int, str]:
        status, raw = self._request(path, timeout=timeout, quiet=True)
        return status, raw.decode(errors="replace")

    def post(self, path: str, payload: Any, *, timeout: float = 900) -> tuple[int, Any]:
        """``POST path`` with a JSON body -> (HTTP status, decoded JSON or text). Generation on a CPU is slow: the
        default timeout is long."""
        status, raw = self._request(path, payload if payload is not None else {}, timeout=timeout)
        return status, self._decode(raw)

    # ------------------------------------------------------------------------------------------------------ logs

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 20000) -> str:
        return self.log_text()[-chars:]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (a zombie of ours counts until it is reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's group reused the id
        return True
    return True


if __name__ == "__main__":  # python tests/harness/webui.py forge CKPT: start, print the URL, wait for Ctrl-C
    with WebUIServer(sys.argv[1], sys.argv[2:], webui=True, data_dir=None) as _ui:
        print(f"{NAMES[_ui.kind]} at {_ui.url} (started in {_ui.startup_seconds:.0f} s); log {_ui.log_path}")
        try:
            _ui.process.wait()
        except KeyboardInterrupt:
            pass
