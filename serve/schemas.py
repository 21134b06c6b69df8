"""Request bodies of the OpenAI routes, checked by pydantic (types only: sampling ranges are the runtime's).

Strict JSON types (a string is not a number), and unknown fields refused with the field named, so a typo or an
unsupported OpenAI feature (tools, response_format) is a clear 400 instead of silently ignored. Gemma's own
sampling knobs (`top_k`, `min_p`, `repetition_penalty`) and `pan_and_scan` are extra body fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Gemma sees every image at 896x896


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted and ignored: Gemma's template has no speaker names


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """What both routes share: the model, the budget, sampling and stopping."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # Gemma: extra body field
    min_p: float | None = None  # Gemma: extra body field
    repetition_penalty: float | None = None  # Gemma: extra body field
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # OpenAI's additive penalties are not the runtime's: only their neutral value is accepted
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    pan_and_scan: bool = False  # Gemma: also show the model crops of long images


class CompletionRequest(_Generation):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
