"""Render a page in headless Chromium (Debian's `chromium`, driven by Playwright): a screenshot, the console's
errors and every request the page tried. The browser test and `softar inspect --screenshot` both come here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softar import SoftarError

# no sandbox (root in a container), and none of Chromium's own calls home, which a closed network refuses
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 900}


def chromium() -> str | None:
    """The Chromium executable: $SOFTAR_CHROMIUM, else chromium or chromium-browser on the PATH."""
    return os.environ.get("SOFTAR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Rendered:
    png: bytes = b""  # a full-page screenshot
    console_errors: list[str] = field(default_factory=list)  # console.error calls and uncaught exceptions
    requests: list[str] = field(default_factory=list)  # every URL requested but the page's own (all refused)
    result: Any = None  # what `actions` returned


def click_token(index: int) -> Callable[[Any], None]:
    """An action for `render`: click token `index` of the text, which pins its detail panel."""
    def click(tab) -> None:
        tab.locator("#text .tok").nth(index).click()
    return click


def render(page: Path, actions: Callable[[Any], Any] | None = None) -> Rendered:
    """Load `page` from disk, wait until its script has drawn everything, run `actions(playwright_page)` if given,
    and take a full-page screenshot. Any request beyond the page itself is recorded and refused."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        raise SoftarError("rendering a page needs Playwright: pip install 'softar[dev]'") from None
    exe = chromium()
    if exe is None:
        raise SoftarError("rendering a page needs Chromium: apt-get install chromium (or set SOFTAR_CHROMIUM)")
    url = page.resolve().as_uri()
    out = Rendered()

    def route(r) -> None:
        if r.request.url == url:
            r.continue_()
        else:
            out.requests.append(r.request.url)
            r.abort()

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=FLAGS, headless=True)
            try:
                context = browser.new_context(viewport=VIEWPORT)
                context.route("**/*", route)
                tab = context.new_page()
                tab.on("console", lambda m: out.console_errors.append(m.text) if m.type == "error" else None)
                tab.on("pageerror", lambda e: out.console_errors.append(str(e)))
                tab.goto(url)
                tab.wait_for_selector("body[data-ready='1']", timeout=30_000)
                if actions is not None:
                    out.result = actions(tab)
                out.png = tab.screenshot(full_page=True)
            finally:
                browser.close()
    except Error as e:
        raise SoftarError(f"Chromium could not render {page}: {str(e).splitlines()[0]}") from None
    return out
