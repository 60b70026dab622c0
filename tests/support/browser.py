"""Headless Debian Chromium driven by Selenium, for the browser end-to-end tests.

Chromium and ChromeDriver come from Debian (`tools/system_deps.sh`, run by `make test`); a
test that needs them fails (never skips) when they are missing. Every WebDriver call runs in
a worker thread, so the event loop that drives the teacher's SDK and aiortc peers keeps
running while a test waits on the page. On failure `save_artifacts` writes a screenshot,
the browser console and the page's HTML to `tests/artifacts/` (git-ignored).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: Our machines' closed network: no background requests (they are refused, many at a time),
#: no QUIC, no first-run or sync; as root Chromium needs --no-sandbox.
BASE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]
#: WebRTC on loopback with fake devices: a synthetic camera (a moving pattern) and
#: microphone (a beep), permission granted without a prompt, loopback candidates gathered,
#: and host candidates carrying real addresses (mDNS names would need a resolver the SFU
#: does not have on a closed network).
MEDIA_FLAGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
]


def require_chromium() -> None:
    """Fail loudly when the browser is not installed (the tests never skip for it)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"browser tests need Debian chromium and chromium-driver ({', '.join(missing)} "
            "missing): run `bash tools/system_deps.sh` (`make test` does)",
            pytrace=False,
        )


_page_built = False


def build_page() -> None:
    """Build sdk/web and the classroom page bundle the gateway serves (static/app.js is build
    output): the page under test is always the one the sources make. Once per process."""
    global _page_built
    if _page_built:
        return
    node = shutil.which("node")
    if node is None:
        pytest.fail("the browser tests need Node.js to build the classroom page", pytrace=False)
    done = subprocess.run(
        [node, "sdk/web/build.mjs"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        pytest.fail(
            f"building the classroom page failed:\n{done.stdout}\n{done.stderr}", pytrace=False
        )
    _page_built = True


def artifact_dir(test_name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)[:120]
    out = ARTIFACTS / safe
    out.mkdir(parents=True, exist_ok=True)
    return out


class Browser:
    """One headless Chromium with its own empty profile; async wrappers around WebDriver."""

    def __init__(self, name: str, *, media: bool = True) -> None:
        require_chromium()
        self.name = name
        self.profile = tempfile.mkdtemp(prefix=f"classmesh-chromium-{name}-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in BASE_FLAGS + (MEDIA_FLAGS if media else []):
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.console: list[dict[str, Any]] = []
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_script_timeout(30)

    # ----------------------------------------------------------------- plumbing

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def open(self, url: str) -> None:
        await self._call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body: `return ...`) in the page."""
        return await self._call(self.driver.execute_script, script, *args)

    async def js_async(self, script: str, *args: Any) -> Any:
        """Run an async script: its last argument is the callback to call with the result."""
        return await self._call(self.driver.execute_async_script, script, *args)

    async def wait(
        self,
        script: str,
        pred: Callable[[Any], bool] = bool,
        *,
        timeout: float = 15.0,
        what: str = "",
        args: tuple[Any, ...] = (),
    ) -> Any:
        """Poll `script` until `pred(result)` holds; fail with the last value and the page's
        status and error line otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        value: Any = None
        while True:
            value = await self.js(script, *args)
            if pred(value):
                return value
            if loop.time() > deadline:
                page = await self.js(
                    "const s = document.getElementById('status');"
                    "const e = document.getElementById('error');"
                    "return [s && s.textContent, e && !e.hidden ? e.textContent : ''];"
                )
                raise AssertionError(
                    f"[{self.name}] no {what or script} within {timeout} s; last value "
                    f"{value!r}; page status/error {page!r}"
                )
            await asyncio.sleep(0.2)

    async def click(self, testid: str, **attrs: str) -> None:
        await self._call(self._click, self._css(testid, attrs))

    def _click(self, css: str) -> None:
        # The page re-renders live parts (a poll's results): find the element again when it
        # was replaced between finding and clicking it.
        for attempt in range(5):
            try:
                self.driver.find_element(By.CSS_SELECTOR, css).click()
                return
            except StaleElementReferenceException:
                if attempt == 4:
                    raise
                time.sleep(0.1)

    async def type(self, testid: str, text: str) -> None:
        await self._call(self._type, self._css(testid, {}), text)

    def _type(self, css: str, text: str) -> None:
        box = self.driver.find_element(By.CSS_SELECTOR, css)
        box.clear()
        box.send_keys(text)

    async def texts(self, testid: str) -> list[str]:
        result = await self.js(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent);",
            self._css(testid, {}),
        )
        return list(result)

    async def attrs(self, testid: str, attr: str) -> list[str]:
        result = await self.js(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map(e => e.getAttribute(arguments[1]) || '');",
            self._css(testid, {}),
            attr,
        )
        return list(result)

    @staticmethod
    def _css(testid: str, attrs: dict[str, str]) -> str:
        extra = "".join(f'[data-{k.replace("_", "-")}="{v}"]' for k, v in attrs.items())
        return f'[data-testid="{testid}"]{extra}'

    # ----------------------------------------------------------------- artifacts

    def collect_console(self) -> list[dict[str, Any]]:
        """Console entries since the last call (kept in `self.console` too)."""
        try:
            fresh: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        except WebDriverException:
            fresh = []
        self.console.extend(fresh)
        return fresh

    def save_artifacts(self, test_name: str) -> Path:
        out = artifact_dir(test_name)
        self.collect_console()
        try:
            self.driver.save_screenshot(str(out / f"{self.name}.png"))
            (out / f"{self.name}.html").write_text(self.driver.page_source)
        except WebDriverException as exc:
            (out / f"{self.name}.error.txt").write_text(repr(exc))
        (out / f"{self.name}.console.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for e in self.console)
        )
        return out

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
