"""Bootstrap that runs *inside* a subprocess to use the real ComfyUI in-process (``harness.run_inprocess``).

Usage: ``python _comfy_boot.py COMFYUI_DIR BASE_DIR CODE_FILE RESULT_FILE [extra ComfyUI CLI flags...]`` with the
working directory = COMFYUI_DIR. It

1. removes this folder from ``sys.path`` and puts the ComfyUI folder first, so ComfyUI's top-level modules
   (``nodes``, ``utils``, ``app``, ``server``, ``execution``, ``comfy``) are the ones imported, never our repo's;
2. parses ComfyUI's CLI as ``main.py --cpu --base-directory BASE_DIR --disable-api-nodes ...`` (``--cpu`` before
   ``comfy.model_management`` is imported: the CUDA build of torch aborts otherwise on a machine without a GPU) and
   imports ``main`` as a module, which is ComfyUI's own start-up minus the server;
3. loads the built-in extra nodes and the custom nodes from ``BASE_DIR/custom_nodes`` the way ``main.py`` does
   (``await nodes.init_extra_nodes(...)``, async since ComfyUI 0.3.4x), recording each custom node's success;
4. executes CODE_FILE with ``env`` (a :class:`ComfyEnv`) in its globals; the code may set ``RESULT`` to anything
   JSON-serialisable (``default=str``), written to RESULT_FILE.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))


def _fix_sys_path(comfy_dir: str) -> None:
    banned = {HERE, REPO_ROOT, os.path.dirname(HERE)}
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in banned]
    sys.path.insert(0, comfy_dir)


class StubServer:
    """What ``execution.PromptExecutor`` needs from ``server.PromptServer``: it records the messages it is sent."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((str(event), data if isinstance(data, dict) else None))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": str(text)}))

    def queue_updated(self):
        pass


class ComfyEnv:
    """The in-process ComfyUI given to test code as ``env``."""

    def __init__(self, loop, custom_node_results, log_records):
        import execution
        import folder_paths
        import nodes

        self.loop = loop
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.custom_node_results = custom_node_results  # {module path: bool} as ComfyUI decided it
        self.log_records = log_records  # formatted log lines (INFO and up) since start-up
        self.server = StubServer()
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
        self._counter = 0

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def run_prompt(self, prompt: dict, extra_data: dict | None = None) -> dict:
        """Validate and execute an API-format prompt like ``POST /prompt`` + the prompt worker do.

        Returns ``{"valid", "success", "error", "node_errors", "outputs", "messages", "prompt_id"}`` where outputs are
        the UI outputs per node id (what ``GET /history`` reports) and messages the executor's status messages."""
        self._counter += 1
        prompt_id = f"codi-test-{self._counter}"
        valid, error, outputs, node_errors = self.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            return {"valid": False, "success": False, "error": error, "node_errors": node_errors,
                    "outputs": {}, "messages": [], "prompt_id": prompt_id}
        self.server.last_prompt_id = prompt_id
        self.run(self.executor.execute_async(prompt, prompt_id, extra_data or {}, outputs))
        return {"valid": True, "success": bool(self.executor.success), "error": None, "node_errors": {},
                "outputs": self.executor.history_result.get("outputs", {}),
                "messages": [list(m) for m in self.executor.status_messages], "prompt_id": prompt_id}


def main(argv: list[str]) -> int:
    comfy_dir, base_dir, code_file, result_file, *extra = argv
    comfy_dir = os.path.realpath(comfy_dir)
    _fix_sys_path(comfy_dir)
    os.chdir(comfy_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    # CODI_COMFYUI_GPU=1 (benchmarks/gpu_check.py on a GPU machine): ComfyUI on the GPU instead of --cpu
    gpu = os.environ.get("CODI_COMFYUI_GPU") == "1"
    sys.argv = ["main.py", *([] if gpu else ["--cpu"]), "--base-directory", base_dir, "--disable-api-nodes",
                "--database-url", "sqlite:///:memory:", *extra]
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:  # a machine without the frontend (in-process runs serve no page): any folder will do
        sys.argv += ["--front-end-root", os.path.join(base_dir, "_no_frontend")]
        os.makedirs(sys.argv[-1], exist_ok=True)
    import comfy.options
    comfy.options.enable_args_parsing()
    from comfy.cli_args import args
    assert args.cpu != gpu, "ComfyUI must run with --cpu here (CODI_COMFYUI_GPU=1 runs it on the GPU)"

    # main.py as a module: its import-time work is ComfyUI's real start-up (logger, extra model paths, custom nodes'
    # prestartup scripts, and the import order that matters: `utils` the package is imported before `nodes`, which
    # puts ComfyUI's comfy/ folder — holding a `utils.py` — first on sys.path). Its server part runs only as __main__.
    import main as comfy_main  # noqa: F401

    import logging
    log_records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            try:
                log_records.append(record.getMessage())
            except Exception:  # pragma: no cover - a broken log call must not break the harness
                pass

    logging.getLogger().addHandler(_Keep(level=logging.INFO))

    import folder_paths
    assert os.path.realpath(folder_paths.base_path) == os.path.realpath(base_dir), folder_paths.base_path

    import asyncio
    import execution  # noqa: F401
    import hook_breaker_ac10a0
    import nodes
    import server

    custom_node_results: dict[str, bool] = {}
    original_load = nodes.load_custom_node

    custom_roots = [os.path.realpath(p) for p in folder_paths.get_folder_paths("custom_nodes")]

    async def recording_load(module_path, *a, **kw):
        ok = await original_load(module_path, *a, **kw)
        # the same function loads ComfyUI's own comfy_extras/ and comfy_api_nodes/: record custom nodes only
        if os.path.realpath(os.path.dirname(module_path)) in custom_roots:
            custom_node_results[module_path] = bool(ok)
        return ok

    nodes.load_custom_node = recording_load  # init_external_custom_nodes looks it up as a module global
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    hook_breaker_ac10a0.save_functions()  # as main.start_comfyui does around node loading
    try:
        loop.run_until_complete(nodes.init_extra_nodes(
            init_custom_nodes=(not args.disable_all_custom_nodes) or len(args.whitelist_custom_nodes) > 0,
            init_api_nodes=not args.disable_api_nodes))
    finally:
        hook_breaker_ac10a0.restore_functions()
        nodes.load_custom_node = original_load

    env = ComfyEnv(loop, custom_node_results, log_records)
    server.PromptServer.instance = env.server  # the few stock nodes that report progress text reach it here

    with open(code_file, encoding="utf-8") as f:
        code = f.read()
    scope = {"__name__": "__codi_inprocess__", "env": env, "RESULT": None}
    exec(compile(code, code_file, "exec"), scope)

    import json
    with open(result_file, "w", encoding="utf-8") as f:
        json.dump(scope.get("RESULT"), f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
