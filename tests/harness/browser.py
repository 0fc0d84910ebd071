"""Headless Chromium for the page tests (layers D and F): Debian's ``chromium`` driven by Python Playwright.

Playwright's own browser download does not work offline, so the system browser is used through ``executable_path``:
``$CODI_CHROMIUM``, else ``/usr/bin/chromium``, else ``chromium`` on PATH. Without it (or without the ``playwright``
package) page tests skip and say why; with ``CODI_REQUIRE_BROWSER=1`` (``.ci/run`` sets it) that is a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# Flags that work on these machines (root, no GPU, closed network: without the background-networking flags Chromium
# keeps trying to reach Google's hosts); a fresh --user-data-dir comes from launch_persistent_context.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    env = os.environ.get("CODI_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def browser_skip_reason(layer: str) -> str | None:
    """Why page tests of ``layer`` cannot run here, or None. Raises instead when ``CODI_REQUIRE_BROWSER=1``."""
    reason = None
    if chromium_path() is None:
        reason = (f"{layer} browser test skipped: Chromium not found (/usr/bin/chromium, `chromium` on PATH or "
                  "$CODI_CHROMIUM); on Debian: apt-get install -y chromium (.ci/run does this)")
    elif importlib.util.find_spec("playwright") is None:
        reason = (f"{layer} browser test skipped: the Python package `playwright` is missing "
                  "(pip install -r requirements-dev.txt)")
    if reason is not None and os.environ.get("CODI_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"{reason} -- but CODI_REQUIRE_BROWSER=1 (CI) says the browser test must run")
    return reason


@contextlib.contextmanager
def chromium_context(viewport: dict[str, int]):
    """A fresh persistent Chromium context (its own temporary profile), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="codi-chromium-") as user_data:
        context = pw.chromium.launch_persistent_context(
            user_data, executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS, viewport=viewport)
        try:
            yield context
        finally:
            context.close()
