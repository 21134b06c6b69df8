"""gemma3-serve's refusals, each in OpenAI's error object with its status, param and code; and images as data:
URLs on a tiny multimodal folder (same tokens as the runtime given the same image, Pan & Scan included)."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from gemma3.runtime.api import load
from tests.serve_live import MODEL_ID, Recording, live_server, slowed

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def live(model):
    with live_server(model, max_body_bytes=64 * 1024) as server:
        yield server


def post(live, route: str, body: dict | bytes, status: int) -> dict:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{live.url}/v1/{route}", headers={"content-type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def png_url(size: tuple[int, int] = (30, 20), seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_malformed_json_unknown_routes_and_models(live):
    assert post(live, "chat/completions", b'{"messages": [', 400)["code"] == "invalid_json"
    assert post(live, "chat/completions", {"model": "gpt-4", "messages": HI}, 404)["param"] == "model"
    with pytest.raises(openai.NotFoundError) as e:
        live.client().chat.completions.create(model="gpt-4", messages=HI)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(("field", "value", "param"), [
    ("temperature", -1, "temperature"), ("temperature", "hot", "temperature"), ("top_p", 0, "top_p"),
    ("top_k", -3, "top_k"), ("min_p", 2, "min_p"), ("repetition_penalty", 0, "repetition_penalty"),
    ("seed", -1, "seed"), ("max_tokens", 0, "max_tokens"), ("n", 2, "n"), ("stop", 5, "stop"),
    ("tools", [], "tools"), ("presence_penalty", 0.5, "presence_penalty"), ("top_logprobs", 50, "top_logprobs"),
    ("messages", [], "messages"), ("messages", [{"role": "model", "content": "x"}], "messages.0.role"),
    ("messages", [{"role": "assistant", "content": "x"}], "messages"),
])
def test_bad_parameters_name_the_param(live, field, value, param):
    error = post(live, "chat/completions", {"messages": HI, field: value}, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_bad_completion_parameters(live):
    assert post(live, "completions", {"prompt": ""}, 400)["param"] == "prompt"
    assert post(live, "completions", {"prompt": ["a", "b"]}, 400)["param"] == "prompt"
    assert post(live, "completions", {"prompt": "a", "echo": True}, 400)["param"] == "echo"
    assert post(live, "completions", {}, 400)["code"] == "missing_required_parameter"


def test_prompt_past_the_context(live):
    long = "word " * 400  # the tiny export holds 256 tokens
    error = post(live, "chat/completions", {"messages": [{"role": "user", "content": long}]}, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=MODEL_ID, prompt=long)
    assert e.value.body["code"] == "context_length_exceeded"


def test_images_refused_where_they_cannot_be_used(live):
    assert post(live, "chat/completions", {"messages": image_message(png_url())}, 400)["code"] == "images_not_supported"


def test_oversized_bodies_get_413(live):
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    assert post(live, "chat/completions", big, 413)["code"] == "request_too_large"
    # a chunked upload (no Content-Length) is cut off as it arrives
    r = httpx.post(f"{live.url}/v1/chat/completions", content=iter([b'{"messages": "', b"x" * 70_000, b'"}']),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_full_queue_answers_429_with_retry_after(model):
    engine = Recording(slowed(model, 0.05), max_queue=1)
    with live_server(model, engine=engine) as live:
        body = {"messages": HI, "max_tokens": 20, "temperature": 0}
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30).status_code)) for _ in range(2)]
        for t in threads:  # one generating, one waiting
            t.start()
            time.sleep(0.3)
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        for t in threads:
            t.join()
        assert results == [200, 200]


# --- images on a tiny multimodal export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_model(tmp_path_factory):
    """A hand-built multimodal folder (tests/test_bad_inputs_runtime.py): 8x8 images, 4 soft tokens each."""
    from tests.test_bad_inputs_runtime import write_tiny_multimodal

    return load(write_tiny_multimodal(tmp_path_factory.mktemp("serve_mm") / "tiny-mm", max_context=256), threads=1)


def test_images_as_data_urls(mm_model, tmp_path):
    url, wide = png_url(), png_url((1200, 300), seed=1)  # 4:1, wide enough for Pan & Scan crops of 256+
    with live_server(mm_model) as live:
        client = live.client()
        for image, pan_and_scan in ((url, False), (wide, True)):
            out = client.chat.completions.create(model=MODEL_ID, messages=image_message(image), max_tokens=8,
                                                 temperature=0, extra_body={"pan_and_scan": pan_and_scan})
            pil = Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1])))
            want = mm_model.generate("What is this?", images=[pil], pan_and_scan=pan_and_scan, max_new_tokens=8,
                                     temperature=0)
            assert out.choices[0].message.content == want.text
            encoded = mm_model.encode_images([pil], pan_and_scan)
            assert out.usage.prompt_tokens == len(mm_model.prompt_ids("What is this?", images=encoded))
            assert (encoded.crops[0] > 0) == pan_and_scan
        bad = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
        error = post(live, "chat/completions", {"messages": image_message(bad)}, 400)
        assert error["code"] == "invalid_image" and error["param"] == "messages.0.content.0.image_url"
        assert post(live, "chat/completions", {"messages": image_message("data:image/png;base64,!!!")},
                    400)["param"] == "messages.0.content.0.image_url"
        assert post(live, "chat/completions", {"messages": image_message("https://example.com/cat.png")},
                    400)["code"] == "remote_image_url"
        path = tmp_path / "local.png"
        Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).save(path)
        assert post(live, "chat/completions", {"messages": image_message(str(path))},
                    400)["code"] == "local_image_refused"
    with live_server(mm_model, allow_local_images=True) as live:
        out = live.client().chat.completions.create(model=MODEL_ID, messages=image_message(str(path)),
                                                    max_tokens=8, temperature=0)
        assert out.choices[0].message.content == client_text(mm_model, path)


def client_text(model, path) -> str:
    return model.generate("What is this?", images=[str(path)], max_new_tokens=8, temperature=0).text
