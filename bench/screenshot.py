"""A screenshot of the chat page mid-conversation (docs/chat-page.png, shown in the README's Serving section).

    python -m bench.screenshot [--model DIR] [--out docs/chat-page.png]

Serves the model (default: the tests' tiny multimodal folder, random weights, so its answers are noise) in this
process, then drives the system's Chromium through the test helper (tests/chat_page.py): an image turn with
Pan & Scan, a text turn, and a third answer caught while it streams.
"""

from __future__ import annotations

import argparse
import base64
import logging
import tempfile
from pathlib import Path

from bench.common import REPO

log = logging.getLogger("bench.screenshot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an exported folder (default: a tiny random multimodal one)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "chat-page.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from gemma3.runtime.api import load
    from tests.chat_page import ChatPage, browser_missing, chromium
    from tests.serve_live import live_server, slowed
    from tests.test_bad_inputs_runtime import write_tiny_multimodal
    from tests.test_serve_errors import png_url

    missing = browser_missing()
    if missing:
        raise SystemExit(missing)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or write_tiny_multimodal(Path(tmp) / "tiny-mm", max_context=512)
        model = load(folder, threads=1)
        png = base64.b64decode(png_url((640, 360), seed=3).split(",", 1)[1])
        with live_server(slowed(model, 0.05), model_id=folder.name) as live, chromium() as browser:
            chat = ChatPage(browser, live.url, width=1100, height=1000)
            page = chat.page
            chat.set(system="Answer in one short paragraph.", temperature=0.7, top_k=64, max_tokens=24, seed=1)
            if model.sees_images:
                page.set_input_files("#image", files=[{"name": "photo.png", "mimeType": "image/png",
                                                       "buffer": png}])
                page.check("#pan-and-scan")
            first, second, third = (("What is in this picture?", "Describe it as a haiku.", "And in French?")
                                    if model.sees_images else
                                    ("Why is the sky blue?", "And why are sunsets red?", "Say that as a haiku."))
            chat.ask(first)
            chat.ask(second)
            page.fill("#prompt", third)
            page.click("#send")
            page.wait_for_function("() => (window.answerUpdates.filter(Boolean).length >= 4)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            page.click("#stop")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
