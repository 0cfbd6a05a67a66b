"""Headless Chromium driven over the DevTools protocol (no Playwright needed): open a page of the
Dagster UI, wait for a text, click a button by its label, read the DOM, take a screenshot.

Install the browser with `apt-get install -y chromium` (Debian; .ci/run does it)."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from websockets.sync.client import connect

from tests.support import stop_process

INSTALL = ("headless Chromium is needed for the UI test: install Debian's package with "
           "`sudo apt-get update && sudo apt-get install -y chromium` (.ci/run does it in CI)")


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """One headless Chromium with one tab; use as a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout: float = 60.0):
        binary = chromium_path()
        if binary is None:
            raise RuntimeError(INSTALL)
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.TemporaryDirectory(prefix="unicorn-chromium-")
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start; the
        # browser only opens the webserver on loopback that the test started.
        self._process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*",
             f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._ids = itertools.count(1)
        self._ws = connect(self._page_socket(), max_size=64 * 2**20, open_timeout=timeout)

    def _page_socket(self) -> str:
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if port_file.exists() and len(port_file.read_text().split()) >= 2:
                port = port_file.read_text().split()[0]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                    pages = [t for t in json.load(response) if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._process.returncode}")
            time.sleep(0.2)
        raise TimeoutError("chromium did not open its DevTools port")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        call = next(self._ids)
        self._ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=self.timeout))
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)

    def wait_for_text(self, text: str) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.evaluate(f"document.body && document.body.innerText.includes({json.dumps(text)})"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} did not appear on the page within {self.timeout}s")

    def click(self, label: str) -> None:
        """Click the last button whose text is `label`."""
        clicked = self.evaluate(
            "(() => { const b = [...document.querySelectorAll('button')].filter("
            f"e => e.innerText.trim() === {json.dumps(label)}).pop();"
            " if (b) { b.click(); return true; } return false; })()")
        if not clicked:
            raise LookupError(f"no button {label!r} on the page")

    def scroll_to_button(self, label: str) -> None:
        """Scroll the page (and its scrolling panels) so the button `label` is at the top."""
        self.evaluate("[...document.querySelectorAll('button')].filter(e => e.innerText.trim() === "
                      f"{json.dumps(label)}).pop()?.scrollIntoView({{block: 'start'}})")

    def dom(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: Path, height: int | None = None) -> None:
        clip = {"x": 0, "y": 0, "width": self.width, "height": height or self.height, "scale": 1}
        data = self.send("Page.captureScreenshot", format="png", clip=clip)["data"]
        path.write_bytes(base64.b64decode(data))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._ws.close()
        finally:
            stop_process(self._process, grace=10)
            self._profile.cleanup()
