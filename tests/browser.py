"""A real browser for the tests: Debian's headless Chromium, driven over the DevTools protocol.

Only what the page tests need: open a URL, type into a form, evaluate JavaScript, wait on a condition in the
page, take a screenshot. No browser download: the ``chromium`` package (scripts/prereqs.sh installs it for
the tests).
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect


def chromium() -> str | None:
    """Debian's chromium, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with one tab; a context manager that closes it.

    :param profile: an empty folder for the browser's profile (its DevTools port is written there).
    :param width: the window's width in CSS pixels (screenshots are this wide).
    :param height: the window's height.
    """

    def __init__(self, profile: Path, width: int = 1400, height: int = 900) -> None:
        program = chromium()
        assert program, "chromium is not installed (scripts/prereqs.sh installs it)"
        profile.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                program,
                "--headless=new",
                "--no-sandbox",  # as root, Chromium refuses to start with its sandbox
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self._process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port in 60 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            pages = [t for t in json.load(answer) if t["type"] == "page"]
        self._socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the tab's socket and end the browser."""
        try:
            self._socket.close()
        finally:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=30)

    def call(self, method: str, **params: Any) -> dict:
        """One DevTools command and its result (the events that arrive meanwhile are dropped)."""
        ident = next(self._ids)
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv(timeout=120))
            if message.get("id") == ident:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> None:
        """Poll ``expression`` in the page until it is truthy (an element found, a count reached)."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"!!({expression})"):
            assert time.monotonic() < deadline, f"{what or expression}: not so after {timeout} s"
            time.sleep(0.2)

    def open(self, url: str, timeout: float = 60) -> None:
        """Go to ``url`` and wait until its document (not the one before it) has loaded."""
        self.evaluate("window.__left = true")
        self.call("Page.navigate", url=url)
        self.wait_for("!window.__left && document.readyState === 'complete'", timeout, f"{url} to load")

    def type_into(self, selector: str, text: str) -> None:
        """Type ``text`` into the input ``selector`` as a person would (React sees the input events)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the window into ``path``."""
        shot = self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
