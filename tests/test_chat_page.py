"""The chat page at GET / in a real headless Chromium (tests/chat_page.py) against a live server on the tiny model:
streamed answers equal the server's own for the same seed, multi-turn, the stop button frees the slot, an image
upload on the tiny multimodal folder, server errors shown; and the page's files ship in the wheel."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.chat_page import ChatPage, browser
from tests.serve_live import MODEL_ID, Recording, live_server, slowed
from tests.test_serve_errors import png_url

REPO = Path(__file__).resolve().parents[1]
STATIC_FILES = ("index.html", "chat.css", "chat.js")
PACKAGE_DIRS = ("graphs", "exporter", "plugins", "engine", "runtime", "serve")  # pyproject's package-dir
SETTINGS = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "max_tokens": 16, "seed": 7}

browser = browser  # a module fixture: one Chromium for these tests


@pytest.fixture(scope="module")
def live(tiny_model):
    # a little slower per token, so a streamed answer arrives in several network reads
    engine = Recording(slowed(tiny_model, 0.02))
    with live_server(tiny_model, engine=engine) as server:
        yield server


@pytest.fixture
def chat(browser, live):
    page = ChatPage(browser, live.url)
    yield page
    page.close()


def servers_answer(live, body: dict) -> str:
    """The server's non-streamed answer to the body the page posted."""
    r = httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def wait_for_end(engine: Recording, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(engine.ends) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def test_the_page_is_served_with_its_files(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name in STATIC_FILES:
        assert httpx.get(f"{live.url}/static/{name}").status_code == 200
    assert httpx.get(live.url + "/static/nothing.js").json()["error"]["code"] == "not_found"
    assert httpx.get(live.url + "/v1/models").json()["data"][0]["sees_images"] is False


def test_streamed_answer_equals_the_servers(chat, live):
    page = chat.page
    assert page.locator("#model").text_content() == f"model: {MODEL_ID}"
    assert page.locator("#image-controls").is_hidden() and page.locator("#key-row").is_hidden()
    chat.set(system="Be brief.", **SETTINGS)
    text = chat.ask("Tell me a story")
    body = chat.requests[-1]
    assert body["stream"] is True and body["model"] == MODEL_ID and {**body, **SETTINGS} == body
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Tell me a story"}]
    assert text == servers_answer(live, body) and text
    # the text grew in several steps, each extending the last
    updates = [u for u in chat.updates() if u]
    assert len(set(updates)) >= 3 and updates[-1] == text
    assert all(text.startswith(u) for u in updates)
    assert page.locator(".message.assistant").get_attribute("data-note") == "(max tokens reached)"


def test_a_second_turn_carries_the_first(chat, live):
    chat.set(max_tokens=6, temperature=0, seed=1)
    first = chat.ask("Hi")
    page = chat.page
    page.fill("#prompt", "And then?")
    page.keyboard.press("Enter")  # Enter sends (Shift+Enter would be a new line)
    page.wait_for_function("() => document.querySelectorAll('.message.assistant').length == 2"
                           " && !document.querySelector('.message.streaming')")
    body = chat.requests[-1]
    assert body["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "And then?"}]
    assert chat.answers()[-1] == servers_answer(live, body)
    page.click("#new-chat")  # a new chat starts from nothing
    chat.ask("Hi")
    assert chat.requests[-1]["messages"] == [{"role": "user", "content": "Hi"}]


def test_stop_ends_the_answer_and_frees_the_slot(chat, live):
    engine = live.engine
    chat.set(max_tokens=200, temperature=0)
    before = len(engine.ends)
    page = chat.page
    page.fill("#prompt", "Tell me a long story")
    page.click("#send")
    page.wait_for_function("() => window.answerUpdates.filter(Boolean).length >= 2")
    page.click("#stop")
    wait_for_end(engine, before + 1)
    reason, tokens = engine.ends[before]
    assert reason == "cancelled" and tokens < 200
    assert engine.stats() == {"queued": 0, "active": 0}
    assert page.locator(".message.assistant").get_attribute("data-note") == "(stopped)"
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    chat.set(max_tokens=3)  # the next turn goes on from the partial answer
    chat.ask("Go on")
    sent = chat.requests[-1]["messages"]
    assert sent[1]["role"] == "assistant" and sent[1]["content"] == chat.answers()[0]


def test_server_errors_are_shown(browser, tiny_model):
    with live_server(tiny_model, api_key="sekret") as live:
        chat = ChatPage(browser, live.url)
        page = chat.page
        page.locator("#key-row").wait_for(state="visible")  # v1/models answered 401: the page asks for the key
        page.fill("#api-key", "wrong")
        page.fill("#prompt", "Hi")
        page.click("#send")
        assert chat.error().startswith("Error 401: ")
        assert page.locator(".message").count() == 0 and page.input_value("#prompt") == "Hi"  # kept to resend
        page.fill("#api-key", "sekret")
        page.locator("#api-key").dispatch_event("change")
        page.wait_for_function("() => document.getElementById('model').textContent == 'model: tiny'")
        assert chat.ask("Hi") and page.locator("#error").is_hidden()
        page.fill("#prompt", "word " * 400)  # past the tiny model's 256 tokens
        page.click("#send")
        assert "(messages)" in chat.error() and chat.error().startswith("Error 400: ")
        chat.close()


def test_an_uploaded_image_is_sent_and_answered(browser, tmp_path_factory):
    from gemma3.runtime.api import load
    from tests.test_bad_inputs_runtime import write_tiny_multimodal

    mm = load(write_tiny_multimodal(tmp_path_factory.mktemp("page_mm") / "tiny-mm", max_context=256), threads=1)
    png = base64.b64decode(png_url((1200, 300), seed=1).split(",", 1)[1])  # wide: Pan & Scan crops it
    with live_server(mm) as live:
        chat = ChatPage(browser, live.url)
        page = chat.page
        page.locator("#image-controls").wait_for(state="visible")
        page.set_input_files("#image", files=[{"name": "wide.png", "mimeType": "image/png", "buffer": png}])
        page.check("#pan-and-scan")
        chat.set(max_tokens=8, temperature=0)
        text = chat.ask("What is this?")
        body = chat.requests[-1]
        image, question = body["messages"][0]["content"]
        assert question == {"type": "text", "text": "What is this?"} and body["pan_and_scan"] is True
        assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/png;base64,")
        assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == png
        assert text == servers_answer(live, body) and text
        assert page.locator(".message.user img").count() == 1
        chat.close()


def test_the_wheel_ships_the_page(tmp_path):
    """`pip install .` gets the page: the static files are package data in the built wheel (built from a copy of
    the sources, so the checkout gets no build/ folder)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    for package in PACKAGE_DIRS:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("gemma3_export-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"gemma3/serve/static/{n}" for n in STATIC_FILES} <= names
