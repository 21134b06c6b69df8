"""The generation loop: prefill the prompt, then sample and feed one token at a time.

Context policy: nothing is truncated. A prompt must leave room for at least one generated token
(`cache.length + len(prompt) < max_context`), checked before anything runs (`ContextLengthError`).
Generation ends at a stop token (eos 1 or <end_of_turn> 106, not yielded, finish_reason "stop"), after
`max_new_tokens` tokens ("length"), or when the context is full ("context"). A token is fed to the model only
when another one must be predicted from it: after a stop token every yielded token is in the cache (the stop token
is not); after "length" or "context" the last yielded token is not. A chat session feeds whatever is missing at the
start of its next turn.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from gemma3.runtime.chat import STOP_IDS
from gemma3.runtime.kv_cache import ContextLengthError, KVCache
from gemma3.runtime.sampling import SamplingParams, make_rng, sample

__all__ = ["ContextLengthError", "GenerationStats", "Piece", "SeenIds", "check_prompt", "check_prompt_fits",
           "decode_step", "generate", "prefill"]


class Decoder(Protocol):
    def step(self, cache: KVCache, ids: np.ndarray | list[int], image_features: np.ndarray | None = None,
             borrow: bool = False) -> np.ndarray: ...

    def prefill(self, cache: KVCache, ids: np.ndarray | list[int], image_features: np.ndarray | None = None
                ) -> np.ndarray: ...


class TextStream(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Piece(NamedTuple):
    """One generated token and the text it completes ("" while a multi-byte character is unfinished).

    A last piece with token_id None carries text the stream decoder still held when generation ended.
    """

    token_id: int | None
    text: str


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens prefilled for this generation
    generated_tokens: int = 0  # tokens yielded (the stop token is not counted)
    prefill_seconds: float = 0.0  # prefill + sampling the first token
    decode_seconds: float = 0.0  # decode steps + sampling their tokens
    decode_steps: int = 0  # decoder steps after the prefill (single tokens; speculative: verify steps)
    decode_tokens: int = 0  # tokens those steps decided that generation used (plain: one per step)
    kv_cache_bytes: int = 0  # cache memory allocated at the end
    peak_rss_mb: float = 0.0  # the process's peak resident memory so far
    finish_reason: str | None = None  # "stop", "length", "context" or "cancelled" (consumer stopped early)
    images: int = 0  # images in the prompt
    crops: list[int] = field(default_factory=list)  # Pan & Scan crops per image
    vision_seconds: list[float] = field(default_factory=list)  # vision graph time per image (crops included)
    speculative: str | None = None  # "lookup" or "draft" when speculative decoding ran
    drafted_tokens: int = 0  # draft tokens verified
    accepted_tokens: int = 0  # of those, the ones greedy decoding agreed with

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens each decode step settled, on average (1 for plain decoding)."""
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | str | None]:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        d["acceptance_rate"] = self.acceptance_rate
        d["tokens_per_step"] = self.tokens_per_step
        return d


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (0 where the platform cannot tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def check_prompt(cache: KVCache, prompt_tokens: int) -> None:
    """Raise `ContextLengthError` unless the prompt and one generated token fit after what the cache holds."""
    check_prompt_fits(prompt_tokens, cache.max_context, cache.length)


def check_prompt_fits(prompt_tokens: int, max_context: int, held: int = 0) -> None:
    """`check_prompt` for a context of `max_context` positions that holds `held` already (engines check a job's
    prompt against an empty one before queueing it)."""
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty")
    if held + prompt_tokens >= max_context:
        already = f"{held} tokens already in context + " if held else ""
        raise ContextLengthError(
            f"prompt too long: {already}{prompt_tokens} prompt tokens leave no room to generate in the model's "
            f"context of {max_context} tokens"
        )


def prefill(decoder: Decoder, cache: KVCache, ids: np.ndarray | list[int],
            image_features: np.ndarray | None = None) -> np.ndarray:
    """Feed the prompt (chunked by the decoder); the logits [vocab] that predict the next token.
    `image_features`: one row per image soft token of the prompt, in order (or None)."""
    if image_features is None:
        return decoder.prefill(cache, ids)
    return decoder.prefill(cache, ids, image_features)


def decode_step(decoder: Decoder, cache: KVCache, token: int) -> np.ndarray:
    """Feed one token; the logits [vocab] that predict the one after it (the decoder's buffer: sample it before
    the next step)."""
    return decoder.step(cache, [token], borrow=True)


def begin(decoder: Decoder, cache: KVCache, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
          stop_ids: Iterable[int], rng: np.random.Generator | None, stats: GenerationStats,
          image_features: np.ndarray | None) -> tuple[frozenset[int], np.random.Generator, float, np.ndarray]:
    """What every generation loop does first: check its arguments, prefill the prompt. Returns the stop ids,
    the random generator, the prefill's start time and the logits predicting the first token."""
    rng = rng if rng is not None else make_rng(params.seed)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_prompt(cache, len(prompt_ids))
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    return frozenset(stop_ids), rng, start, prefill(decoder, cache, prompt_ids, image_features)


class SeenIds:
    """The set of ids in the context, for the repetition penalty (tracked only when the penalty is on)."""

    def __init__(self, vocab: int, ids: Iterable[int], active: bool) -> None:
        self.mask = np.zeros(vocab, bool) if active else None
        if self.mask is not None:
            self.mask[np.fromiter(ids, np.int64)] = True

    def add(self, token: int) -> None:
        if self.mask is not None:
            self.mask[token] = True

    def ids(self) -> np.ndarray | None:
        return None if self.mask is None else np.flatnonzero(self.mask)


def generate(
    decoder: Decoder,
    cache: KVCache,
    prompt_ids: list[int],
    params: SamplingParams,
    max_new_tokens: int,
    *,
    stream: TextStream | None = None,
    stop_ids: Iterable[int] = STOP_IDS,
    history: Iterable[int] = (),
    rng: np.random.Generator | None = None,
    stats: GenerationStats | None = None,
    image_features: np.ndarray | None = None,
) -> Iterator[Piece]:
    """Prefill `prompt_ids` after what `cache` holds and yield the generated tokens as `Piece`s.

    `stream` (the tokenizer's StreamDecoder) turns ids into text; `history` lists the ids already in the cache
    (for the repetition penalty); `stats` is filled in as the generation runs.
    """
    stats = stats if stats is not None else GenerationStats()
    stop, rng, start, logits = begin(decoder, cache, prompt_ids, params, max_new_tokens, stop_ids, rng, stats,
                                     image_features)
    seen = SeenIds(logits.shape[-1], [*history, *prompt_ids], params.repetition_penalty != 1.0)
    stats.prefill_seconds = time.perf_counter() - start
    reason = "length"
    try:
        for n in range(max_new_tokens):
            token = sample(logits, params, rng, seen.ids())
            if n == 0:
                stats.prefill_seconds = time.perf_counter() - start  # the first token comes from the prefill
            else:
                stats.decode_seconds += time.perf_counter() - start
            if token in stop:
                reason = "stop"
                break
            stats.generated_tokens = n + 1
            yield Piece(token, stream.push(token) if stream is not None else "")
            seen.add(token)
            if n + 1 == max_new_tokens:
                break
            if cache.length + 1 > cache.max_context:
                reason = "context"
                break
            start = time.perf_counter()  # the consumer's time between tokens is not ours
            logits = decode_step(decoder, cache, token)
            stats.decode_steps += 1
            stats.decode_tokens += 1
    except GeneratorExit:
        reason = "cancelled"
        raise
    finally:
        stats.finish_reason = reason
        stats.kv_cache_bytes = cache.nbytes
        stats.peak_rss_mb = peak_rss_mb()
    tail = stream.flush() if stream is not None else ""
    if tail:
        yield Piece(None, tail)
