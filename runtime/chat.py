"""Gemma 3's chat template, producing token ids directly.

Follows the template shipped with the instruction-tuned checkpoints (`tokenizer_config.json` of
google/gemma-3-*-it, reproduced in tests/test_runtime_chat.py):

    <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n

- a leading system message is folded into the first user turn (its text is not trimmed, as in the template);
- the other roles must alternate user / model, starting with user; "assistant" is rendered "model";
- message text is trimmed; content may be a string or a list of {"type": "text", "text": ...} and
  {"type": "image"} parts; an image part becomes `<start_of_image>`, which the prompt's image encoder expands.

The control tokens (<bos>, <start_of_turn>, <end_of_turn>) are inserted as ids: the text between them is
encoded as one string, so the ids equal those of tokenizing the rendered template text as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gemma3.runtime.images import BOI_TOKEN

BOS_ID = 2  # <bos>
EOS_ID = 1  # <eos>
START_OF_TURN_ID = 105  # <start_of_turn>
END_OF_TURN_ID = 106  # <end_of_turn>
STOP_IDS = frozenset({EOS_ID, END_OF_TURN_ID})  # generation ends at either (checkpoints' generation_config)
USER, MODEL, SYSTEM = "user", "model", "system"
_ROLE_ALIASES = {"user": USER, "model": MODEL, "assistant": MODEL}

Message = Mapping[str, Any]  # {"role": ..., "content": str | [{"type": "text", "text": ...}, ...]}


class Encoder(Protocol):
    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


def message_text(message: Message, trim: bool = True) -> str:
    """The text of one message: a string, or the concatenation of its text parts (each trimmed)."""
    if not isinstance(message, Mapping) or "content" not in message:
        raise ValueError(f"a chat message must be a mapping with 'role' and 'content', got {message!r}")
    content = message["content"]
    if isinstance(content, str):
        return content.strip() if trim else content
    if not isinstance(content, Sequence):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            texts.append(part["text"].strip() if trim else part["text"])
        elif kind == "image":
            texts.append(BOI_TOKEN)  # where the image goes; the prompt's encoder expands it (runtime/vision.py)
        else:
            raise ValueError(f"unsupported message content part {part!r}")
    return "".join(texts)


def _turns(messages: Sequence[Message]) -> tuple[str | None, list[tuple[str, str]]]:
    """The system text (or None) and the alternating (role, trimmed text) turns, checked."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    system = None
    rest = list(messages)
    if isinstance(rest[0], Mapping) and rest[0].get("role") == SYSTEM:
        first = rest.pop(0)
        content = first.get("content")
        # The template takes a system message's first part (or string) as is: no trimming.
        if isinstance(content, Sequence) and not isinstance(content, str) and content:
            first = {"content": [content[0]]}
        system = message_text(first, trim=False)
    turns = []
    for i, message in enumerate(rest):
        role = message.get("role") if isinstance(message, Mapping) else None
        expected = USER if i % 2 == 0 else MODEL
        if _ROLE_ALIASES.get(role) != expected:
            raise ValueError(
                f"chat roles must alternate user/model (assistant) after an optional leading system message; "
                f"message {i + (system is not None)} has role {role!r} where {expected!r} was expected"
            )
        turns.append((expected, message_text(message)))
    return system, turns


def turn_ids(tokenizer: Encoder, role: str, text: str) -> list[int]:
    """`<start_of_turn>{role}\\n{text}<end_of_turn>\\n` as ids."""
    return [START_OF_TURN_ID, *tokenizer.encode(f"{role}\n{text}"), END_OF_TURN_ID, *tokenizer.encode("\n")]


def generation_prompt_ids(tokenizer: Encoder) -> list[int]:
    """`<start_of_turn>model\\n`: what the model continues from."""
    return [START_OF_TURN_ID, *tokenizer.encode(f"{MODEL}\n")]


def render_chat(tokenizer: Encoder, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """The whole conversation as ids, starting with <bos>."""
    system, turns = _turns(messages)
    if not turns:
        raise ValueError("a chat needs a user message after the system message")
    ids = [BOS_ID]
    for i, (role, text) in enumerate(turns):
        if i == 0 and system is not None:
            text = f"{system}\n\n{text}"
        ids += turn_ids(tokenizer, role, text)
    if add_generation_prompt:
        ids += generation_prompt_ids(tokenizer)
    return ids


def next_user_turn_ids(tokenizer: Encoder, text: str, system: str | None = None, first: bool = False) -> list[int]:
    """The ids to prefill for a new user turn of a running chat whose cache ends after the model's reply.

    The model's reply ended at <end_of_turn>, which was sampled but never fed, so a follow-up turn starts by
    closing it: `<end_of_turn>\\n<start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`.
    The first turn of a chat is the full template instead (with <bos> and the folded system text).
    """
    if first:
        messages: list[Message] = [{"role": SYSTEM, "content": system}] if system is not None else []
        return render_chat(tokenizer, [*messages, {"role": USER, "content": text}])
    return [END_OF_TURN_ID, *tokenizer.encode("\n"), *turn_ids(tokenizer, USER, text.strip()),
            *generation_prompt_ids(tokenizer)]


def raw_prompt_ids(tokenizer: Encoder, text: str) -> list[int]:
    """Plain text after <bos>, no template (for pretrained checkpoints and experiments)."""
    return [BOS_ID, *tokenizer.encode(text)]
