"""Use the real ComfyUI 0.3.75 (prepared by ``make comfyui``) from tests: in-process in a subprocess, or as a server.

Why subprocesses: ComfyUI has top-level modules named ``nodes``, ``utils``, ``app``, ``server`` and ``execution``,
and the repo root (which holds our own ``nodes/`` package) is on ``sys.path`` in the pytest process. ComfyUI also
keeps process-global state (registered nodes, ``folder_paths``, ``comfy.model_management`` device choice made once at
import, which must be ``--cpu`` with the CUDA build of torch here). So ComfyUI is never imported by the pytest process:

* :func:`run_inprocess` runs test code inside a fresh ``python tests/harness/_comfy_boot.py`` with cwd = the ComfyUI
  folder and a clean ``sys.path``: ComfyUI is imported there as its ``main.py`` would, with our pack loaded from
  ``BASE/custom_nodes/codi``; the code gets ``env`` (``env.run_prompt(api_prompt)`` goes through
  ``execution.validate_prompt`` + ``execution.PromptExecutor``, ``env.nodes.NODE_CLASS_MAPPINGS``, ``env.folder_paths``,
  ``env.custom_node_results``) and returns data by setting ``RESULT`` (JSON-serialisable).
* :func:`comfy_server` starts ``main.py --cpu --listen 127.0.0.1 --port <free>`` on a base directory and yields a
  :class:`ComfyServer` (``url``, ``log()``, ``get_json``, ``queue_prompt``, ``wait_for_history``).

Both point ComfyUI at a base directory made by :func:`make_base_dir` (``--base-directory``: models, custom_nodes,
input, output, temp and user all live there, never in the shared ComfyUI cache folder) where
``custom_nodes/codi`` is a symlink to the repo root, i.e. the working tree exactly as a developer's clone would sit in
``ComfyUI/custom_nodes``. The database is in memory (``--database-url sqlite:///:memory:``) and API nodes are off
(``--disable-api-nodes``: no network, faster start).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
BOOT_SCRIPT = Path(__file__).resolve().parent / "_comfy_boot.py"
PACK_DIRNAME = "codi"
COMFYUI_VERSION = "0.3.75"
STAMP = ".codi-prepared"  # written by prepare_comfyui.py
BASE_SUBDIRS = ("custom_nodes", "models", "input", "output", "temp", "user")
COMMON_FLAGS = ("--disable-api-nodes", "--database-url", "sqlite:///:memory:")


class ComfyUINotPrepared(RuntimeError):
    pass


def comfyui_dir() -> Path:
    """The prepared ComfyUI folder: ``$CODI_COMFYUI_DIR`` or ``<repo>/.cache/comfyui`` (not checked)."""
    env = os.environ.get("CODI_COMFYUI_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "comfyui"


def require_comfyui() -> Path:
    """The prepared ComfyUI folder, or :class:`ComfyUINotPrepared` saying how to prepare it."""
    path = comfyui_dir()
    if not (path / STAMP).is_file() or not (path / "main.py").is_file():
        raise ComfyUINotPrepared(
            f"ComfyUI {COMFYUI_VERSION} is not prepared in {path}. Run `make comfyui` (or `make test`, which does it), "
            "or point CODI_COMFYUI_DIR at a folder that `make comfyui` prepared.")
    return path


def make_base_dir(root: Path | str, *, pack_source: Path | str = REPO_ROOT, pack_name: str = PACK_DIRNAME) -> Path:
    """Create a ComfyUI ``--base-directory`` under ``root`` with our pack linked as ``custom_nodes/<pack_name>``."""
    base = Path(root)
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / pack_name
    if not link.exists():
        link.symlink_to(Path(pack_source).resolve(), target_is_directory=True)
    return base


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ComfyUI subprocesses: no PYTHONPATH (it could shadow ComfyUI's top-level modules), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1"})
    if extra:
        env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------------- in-process


@dataclass
class InProcessRun:
    returncode: int
    result: Any
    log: str  # stdout + stderr of the subprocess (ComfyUI's log)


def run_inprocess(code: str, base_dir: Path | str, *, timeout: float = 600, extra_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None, check: bool = True) -> InProcessRun:
    """Run ``code`` against an in-process ComfyUI in a fresh subprocess (see the module docstring).

    ``code`` is dedented; it sees ``env`` and sets ``RESULT``. With ``check`` a non-zero exit raises an
    AssertionError carrying the subprocess log."""
    comfy = require_comfyui()
    base = Path(base_dir).resolve()
    work = base / "_inprocess"
    work.mkdir(parents=True, exist_ok=True)
    n = len(list(work.glob("code-*.py")))
    code_file = work / f"code-{n}.py"
    result_file = work / f"result-{n}.json"
    code_file.write_text(textwrap.dedent(code), encoding="utf-8")
    cmd = [sys.executable, str(BOOT_SCRIPT), str(comfy), str(base), str(code_file), str(result_file), *extra_args]
    try:
        proc = subprocess.run(cmd, cwd=comfy, env=subprocess_env(env), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise AssertionError(f"in-process ComfyUI run timed out after {timeout} s; log:\n{out[-20000:]}") from None
    result = None
    if result_file.is_file():
        result = json.loads(result_file.read_text(encoding="utf-8"))
    run = InProcessRun(proc.returncode, result, proc.stdout)
    if check and proc.returncode != 0:
        raise AssertionError(f"in-process ComfyUI run failed (exit {proc.returncode}); log:\n{proc.stdout[-20000:]}")
    return run


# --------------------------------------------------------------------------------------------------------- server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_json(url: str, data: Any = None, *, timeout: float = 30) -> Any:
    """GET (``data is None``) or POST JSON to a loopback URL and decode the JSON answer."""
    if not url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
        raise ValueError(f"tests only talk to loopback servers, not {url}")
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


@dataclass
class ComfyServer:
    url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def get_json(self, path: str, *, timeout: float = 30) -> Any:
        return http_json(self.url + path, timeout=timeout)

    def post_json(self, path: str, data: Any, *, timeout: float = 30) -> Any:
        return http_json(self.url + path, data, timeout=timeout)

    def queue_prompt(self, prompt: dict, *, client_id: str = "codi-tests") -> str:
        """``POST /prompt``; returns the prompt id (raises with the server's answer on a validation error)."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST /prompt refused ({e.code}): {e.read().decode(errors='replace')}") from None
        return answer["prompt_id"]

    def wait_for_history(self, prompt_id: str, *, timeout: float = 300, poll: float = 0.25) -> dict:
        """Poll ``GET /history/<id>`` until the prompt is done; returns its history entry (``outputs``, ``status``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry:  # ComfyUI writes the history entry when the prompt is done (success or error)
                return entry
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI server died (exit {self.process.returncode}); log:\n"
                                     f"{self.log()[-20000:]}")
            time.sleep(poll)
        raise AssertionError(f"prompt {prompt_id} not done after {timeout} s; log:\n{self.log()[-20000:]}")


@contextlib.contextmanager
def comfy_server(base_dir: Path | str, *, timeout: float = 180, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> Iterator[ComfyServer]:
    """Start ``main.py --cpu`` on a free loopback port with ``--base-directory base_dir``; yield when ``GET
    /object_info`` answers; stop the server at the end. The server log goes to ``base_dir/comfyui-server.log``."""
    comfy = require_comfyui()
    base = Path(base_dir).resolve()
    port = free_port()
    log_path = base / "comfyui-server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch", *COMMON_FLAGS, *extra_args]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(cmd, cwd=comfy, env=subprocess_env(env), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = ComfyServer(url=url, base_dir=base, log_path=log_path, process=proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI server exited with {proc.returncode} during start-up; log:\n"
                                     f"{server.log()[-20000:]}")
            try:
                info = server.get_json("/object_info", timeout=10)
                if isinstance(info, dict) and info:
                    break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI server did not answer /object_info within {timeout} s; log:\n"
                                     f"{server.log()[-20000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
