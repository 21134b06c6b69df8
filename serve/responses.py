"""OpenAI's response objects and stream chunks (chat.completion, chat.completion.chunk, text_completion) as dicts,
and server-sent events: one `data: {json}` event per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from gemma3.runtime.jobs import TokenLogprobs
from gemma3.runtime.tokenizer import Tokenizer

DONE = "data: [DONE]\n\n"
Tokens = list[tuple[int, TokenLogprobs | None]]


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI's logprobs show it: its text and its UTF-8 bytes (a byte piece is one raw byte)."""
    piece = tokenizer.id_to_piece(token)
    if tokenizer.is_byte(token):  # "<0xE4>"
        return piece, [int(piece[3:-1], 16)]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def chat_logprobs(tokenizer: Tokenizer, tokens: Tokens) -> dict[str, Any]:
    content = []
    for token, lp in tokens:
        if lp is None:
            continue
        text, raw = token_text(tokenizer, token)
        top = []
        for tid, value in zip(lp.top_ids, lp.top_logprobs):
            t, b = token_text(tokenizer, tid)
            top.append({"token": t, "logprob": value, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Tokenizer, tokens: Tokens, offset: int) -> dict[str, Any]:
    """The legacy completions format; `offset`: where this delta's text starts in the whole answer."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp in tokens:
        if lp is None:
            continue
        text = token_text(tokenizer, token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({token_text(tokenizer, t)[0]: v for t, v in zip(lp.top_ids, lp.top_logprobs)})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


class Shape:
    """The fixed fields of one response (id, created, model, object) and its choices' shape per route."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self, text: str, finish: str | None, logprobs: dict[str, Any] | None,
             use: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": use}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": use}

    def chunk(self, text: str | None, finish: str | None = None, logprobs: dict[str, Any] | None = None,
              first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": use}
