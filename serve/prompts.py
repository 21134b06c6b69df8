"""From a request body to what a job needs: prompt ids (the runtime's chat template, image soft tokens), image
features, sampling parameters (the runtime's validation and the checkpoint's defaults) and the token budget.

Images come as `data:` URLs (base64). Remote http(s) URLs are refused (serving boxes often have no internet, and
fetching on a client's behalf is a server-side request forgery risk); local file paths only behind
`--allow-local-images`. Decoding and the vision graph run on one worker thread, off the event loop: one SigLIP
pass holds about 1 GiB of attention scores, so images are encoded one request at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from gemma3.runtime.api import DEFAULT_MAX_NEW_TOKENS, Model, sampling_overrides
from gemma3.runtime.images import ImageError, decode_image, load_image
from gemma3.runtime.sampling import SamplingParams
from gemma3.serve.errors import APIError, bad_param
from gemma3.serve.schemas import MAX_STOP_STRINGS, ChatRequest, CompletionRequest, _Generation


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    image_features: np.ndarray | None = None


def sampling(model: Model, body: _Generation) -> SamplingParams:
    """The model's defaults with the request's values, each checked by `SamplingParams` (the runtime's rules)."""
    given = sampling_overrides(dict(body))
    for name, value in given.items():  # one at a time, so the error names its parameter
        try:
            model.sampling(**{name: value})
        except ValueError as e:
            raise bad_param(name, str(e)) from None
    return model.sampling(**given)


def check_common(body: _Generation) -> None:
    """OpenAI features the server does not offer: a 400 naming the parameter rather than a silent difference."""
    if body.n != 1:
        raise bad_param("n", f"n must be 1: one choice per request (got {body.n}); send several requests instead")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise bad_param(name, f"{name} is not supported: use repetition_penalty (> 1 discourages repeats)")
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP_STRINGS:
        raise bad_param("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(body.stop)}")
    if body.stream_options is not None and not body.stream:
        raise bad_param("stream_options", "stream_options needs stream: true")


def budget(model: Model, requested: int | None, prompt_tokens: int) -> int:
    """max_tokens, or the runtime's default; generation also ends where the context is full ("length")."""
    limit = DEFAULT_MAX_NEW_TOKENS if requested is None else requested
    return min(limit, model.manifest.max_context - prompt_tokens)


def _image_source(url: str, allow_local: bool, param: str) -> tuple[Any, str]:
    """(what `decode_image` / `load_image` reads, a name for errors) for one image_url."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_param(param, "a data: URL image must be base64: data:image/png;base64,...")
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True)), "data: URL"
        except (binascii.Error, ValueError):
            raise bad_param(param, "the data: URL's base64 payload does not decode") from None
    if url.startswith(("http://", "https://")):
        raise bad_param(param, "remote image URLs are not fetched (the server may have no internet): send the "
                        "image inline as a data: URL, data:image/png;base64,...", "remote_image_url")
    if not allow_local:
        raise bad_param(param, "local image paths are refused unless the server runs with --allow-local-images: "
                        "send the image as a data: URL", "local_image_refused")
    return url.removeprefix("file://"), url


def chat_messages(body: ChatRequest) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """OpenAI messages as the runtime's ({"type": "image"} parts), and each image's (url, param) in order."""
    messages, images = [], []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None:
            raise bad_param(f"messages.{i}.content", "a message needs content (tool calls are not supported)")
        if isinstance(m.content, str):
            messages.append({"role": role, "content": m.content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            param = f"messages.{i}.content.{j}"
            if part.type == "text":
                if part.text is None:
                    raise bad_param(f"{param}.text", "a text part needs 'text'")
                parts.append({"type": "text", "text": part.text})
            else:
                if part.image_url is None:
                    raise bad_param(f"{param}.image_url", "an image_url part needs 'image_url': {'url': ...}")
                if role != "user":
                    raise bad_param(param, "images go in user messages")
                images.append((part.image_url.url, f"{param}.image_url"))
                parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    return messages, images


def _encode(model: Model, images: list[tuple[str, str]], allow_local: bool, pan_and_scan: bool) -> Any:
    """Decode every image (errors name the message part), then run the vision graph: on the vision thread."""
    decoded: list[Image.Image] = []
    for url, param in images:
        source, name = _image_source(url, allow_local, param)
        try:
            decoded.append(decode_image(source, name) if isinstance(source, io.BytesIO) else load_image(source))
        except ImageError as e:
            raise bad_param(param, str(e), "invalid_image") from None
    try:
        return model.encode_images(decoded, pan_and_scan=pan_and_scan)
    except ImageError as e:
        raise bad_param("messages", str(e), "invalid_image") from None


async def prepare_chat(model: Model, body: ChatRequest, vision: Executor, allow_local: bool) -> Prepared:
    check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_param("top_logprobs", "top_logprobs needs logprobs: true")
    params = sampling(model, body)
    messages, images = chat_messages(body)
    encoded = None
    if images:
        if not model.sees_images:
            raise bad_param("messages", f"the {model.manifest.model.name} model is text-only: it cannot take images",
                            "images_not_supported")
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(vision, _encode, model, images, allow_local, body.pan_and_scan)
    try:
        ids = model.prompt_ids(messages, images=encoded)
    except ValueError as e:  # roles out of order, empty chat, markers vs images
        raise bad_param("messages", str(e)) from None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return Prepared(ids, params, budget(model, requested, len(ids)),
                    None if encoded is None else encoded.features)


def prepare_completion(model: Model, body: CompletionRequest) -> Prepared:
    check_common(body)
    for name, neutral in (("echo", (False,)), ("best_of", (None, 1)), ("suffix", (None,))):
        if getattr(body, name) not in neutral:
            raise bad_param(name, f"{name} is not supported")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_param("prompt", "give one prompt per request (a string, or a list of one string)")
        prompt = prompt[0]
    if not prompt:
        raise bad_param("prompt", "the prompt is empty")
    params = sampling(model, body)
    try:
        ids = model.prompt_ids(prompt, raw=True)
    except ValueError as e:
        raise bad_param("prompt", str(e)) from None
    return Prepared(ids, params, budget(model, body.max_tokens, len(ids)))


def refuse_unknown_model(served: str, requested: str | None) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"the model {requested!r} does not exist: this server serves {served!r}", "model",
                       "model_not_found")
