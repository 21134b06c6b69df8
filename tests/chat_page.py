"""The chat page in a real headless browser: the system's Chromium (Debian's `chromium` package, /usr/bin/chromium)
driven by Playwright's Python package, whose own browser downloads are never used.

GEMMA3_SKIP_BROWSER=1 skips the browser tests; without it a missing Chromium fails them with how to install it
(CI installs it in .ci/run), so they never pass by being skipped. GEMMA3_CHROMIUM names another binary.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("GEMMA3_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that reaches outside the machine (updates, sync, QUIC probes).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000

# Every text the last answer shows, in order: one entry per redraw while it streams.
WATCH_ANSWERS = """() => {
  window.answerUpdates = [];
  new MutationObserver(() => {
    const texts = document.querySelectorAll(".message.assistant .text");
    if (texts.length) window.answerUpdates.push(texts[texts.length - 1].textContent);
  }).observe(document.getElementById("log"), {subtree: true, childList: true, characterData: true});
}"""


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if os.path.exists(CHROMIUM):
        return None
    return (f"no Chromium at {CHROMIUM}: install Debian's (apt-get install -y chromium; .ci/run does it), "
            "point GEMMA3_CHROMIUM at one, or set GEMMA3_SKIP_BROWSER=1 to skip the chat page's tests")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("GEMMA3_SKIP_BROWSER") == "1":
        pytest.skip("GEMMA3_SKIP_BROWSER=1")
    missing = browser_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    with chromium() as b:
        yield b


class ChatPage:
    """One browser tab on the chat page, recording the bodies it posts to /v1/chat/completions."""

    def __init__(self, browser: Any, url: str, width: int = 1100, height: int = 760) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[dict] = []
        self.page.on("request", self._record)
        self.page.goto(url + "/")
        self.page.evaluate(WATCH_ANSWERS)

    def _record(self, request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.requests.append(request.post_data_json)

    def set(self, **fields: Any) -> None:
        """Settings by element id (temperature=0.7, max_tokens=12, system="Be brief.")."""
        for name, value in fields.items():
            self.page.fill(f"#{name}", str(value))

    def ask(self, text: str) -> str:
        """Send `text` and wait for the whole answer: its text."""
        answers = self.answers()
        self.page.fill("#prompt", text)
        self.page.click("#send")
        self.page.wait_for_function(
            "n => document.querySelectorAll('.message.assistant').length > n"
            " && !document.querySelector('.message.streaming')", arg=len(answers))
        return self.answers()[-1]

    def answers(self) -> list[str]:
        return self.page.locator(".message.assistant .text").all_text_contents()

    def updates(self) -> list[str]:
        return self.page.evaluate("window.answerUpdates")

    def error(self) -> str:
        box = self.page.locator("#error")
        box.wait_for(state="visible")
        return box.text_content()

    def close(self) -> None:
        self.page.close()
