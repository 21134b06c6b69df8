"""Exact speculative decoding for greedy generation: draft a few tokens cheaply, verify them in one decoder step.

A round holds the pending token t (predicted, not yet fed) and k drafted tokens d1..dk. One step feeds
[t, d1..dk] and returns the logits of all k + 1 positions (the decoder's `logits_count` input); g_i, the greedy
token after (t, d1..di), is what plain greedy decoding would have produced as long as d1..di were right, so
drafts are accepted while d_{i+1} == g_i, and g_m (m accepted) is the next pending token. The cache then rolls
back to the accepted tokens (`KVCache.rollback`): global rows are simply rewritten later, and each step is cut
short (`KVCache.rewindable`) so that no local ring compacts after the step's first token, which is what keeps
their rows exactly those of plain decoding. Emitting g_0..g_m runs the plain loop's checks token by token, so
stop tokens, max_new_tokens and the context limit end generation exactly where `generate` would.
Exact up to floating point: a k + 1-token step computes the same positions as k + 1 single-token steps with
other kernels, so its logits differ by rounding (~1e-5 relative in fp32; ~0.1 logit on exports with int8
activations, accuracy_level 4, where rounding flips activation codes), and a near-tie can resolve differently.

Drafters: `LookupDrafter` (prompt lookup: the tokens that followed the latest earlier occurrence of the
context's last n-gram) and `DraftModel` (a smaller export with the same tokenizer, e.g. the 270M for 1B..27B,
greedy on its own cache, which rolls back with the target's).

Only greedy decoding without a repetition penalty is sped up; with sampling (or a penalty) generation falls back
to the plain loop with a warning, since exact speculative *sampling* needs the draft's distribution and a
different random stream than plain sampling (so seeded outputs would change).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gemma3.runtime.chat import STOP_IDS
from gemma3.runtime.generate import (
    Decoder,
    GenerationStats,
    Piece,
    TextStream,
    begin,
    generate,
    peak_rss_mb,
)
from gemma3.runtime.kv_cache import KVCache
from gemma3.runtime.manifest import ManifestError
from gemma3.runtime.sampling import SamplingParams, make_rng, sample

if TYPE_CHECKING:
    from gemma3.runtime.ort_decoder import OrtDecoder
    from gemma3.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_DRAFT_TOKENS = 4  # tokens drafted per verify step (bench/speculative.py)
MAX_DRAFT_TOKENS = 32
LOOKUP_NGRAM = 3  # the longest context suffix prompt lookup matches (then shorter ones)
CHOICES = "off, lookup or draft:DIR"


@dataclass(frozen=True)
class Speculative:
    """How to draft: "lookup" (prompt lookup) or "draft" (the model exported in `draft_dir`)."""

    method: str
    draft_dir: str | None = None
    draft_tokens: int = DEFAULT_DRAFT_TOKENS

    def __post_init__(self) -> None:
        if self.method not in ("lookup", "draft"):
            raise ValueError(f"speculative method {self.method!r} is not one of {CHOICES}")
        if (self.method == "draft") != bool(self.draft_dir):
            raise ValueError("a draft model needs its folder (draft:DIR), and only the draft method takes one")
        if not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft tokens must be 1..{MAX_DRAFT_TOKENS}, got {self.draft_tokens}")

    @classmethod
    def parse(cls, value: str | Speculative | None, draft_tokens: int | None = None) -> Speculative | None:
        """"off" / None -> None, "lookup", "draft:DIR", or a `Speculative` (returned as is)."""
        if value is None or isinstance(value, Speculative):
            return value
        if not isinstance(value, str):
            raise ValueError(f"speculative must be {CHOICES}, got {value!r}")
        k = DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens
        if value == "off":
            return None
        if value == "lookup":
            return cls("lookup", draft_tokens=k)
        if value.startswith("draft:") and value[len("draft:"):].strip():
            return cls("draft", value[len("draft:"):].strip(), draft_tokens=k)
        raise ValueError(f"speculative {value!r} is not one of {CHOICES}")


class Drafter(Protocol):
    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens expected to follow `context` (which ends with the pending token)."""
        ...

    def commit(self, length: int) -> None:
        """The target now holds context[:length] in its cache: forget anything drafted beyond it."""
        ...


class LookupDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n = ngram .. 1) and
    propose what followed it. Costs microseconds; pays off when the output repeats the context."""

    method = "lookup"

    def __init__(self, ngram: int = LOOKUP_NGRAM, exclude: Iterable[int] = ()) -> None:
        self.ngram = ngram
        self.exclude = frozenset(exclude)  # never drafted (image soft tokens need features)

    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        ids = np.asarray(context, dtype=np.int64)
        for n in range(min(self.ngram, ids.size - 1), 0, -1):
            # windows ids[i:i + n] that end before the last token, so something follows each
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                out = []
                for token in ids[start:start + limit].tolist():
                    if token in self.exclude:
                        break
                    out.append(token)
                if out:
                    return out
        return []

    def commit(self, length: int) -> None:
        pass


class DraftModel:
    """A smaller exported model drafting greedily on its own cache, kept in step with the target's context."""

    method = "draft"

    def __init__(self, decoder: OrtDecoder, folder: str) -> None:
        self.decoder, self.folder = decoder, folder
        self.cache: KVCache = decoder.new_cache()
        self.fed: list[int] = []  # the tokens in self.cache, in order
        self._greedy, self._rng = SamplingParams(temperature=0), make_rng(0)  # greedy: the rng is never drawn

    @classmethod
    def open(cls, folder: str | Path, vocab_size: int, tokenizer: Tokenizer, threads: int | None = None) -> DraftModel:
        """Load `folder` as a draft for a target of `vocab_size` rows and `tokenizer`; one line if it cannot be."""
        from gemma3.runtime.api import load_tokenizer
        from gemma3.runtime.manifest import check_files, load_manifest
        from gemma3.runtime.ort_decoder import OrtDecoder

        try:
            manifest = load_manifest(folder)
        except ManifestError as e:
            raise ManifestError(f"draft model: {e}") from None
        if manifest.target != "ort":
            raise ManifestError(f"draft model {str(folder)!r}: a {manifest.target} export; drafts run on ONNX Runtime")
        check_files(manifest)
        theirs = load_tokenizer(manifest) if manifest.model.vocab_size == vocab_size else None
        if theirs is None or not same_vocabulary(theirs, tokenizer):
            pieces = "" if theirs is None else f", {theirs.vocab_size} pieces"
            raise ManifestError(f"draft model {str(folder)!r} has another vocabulary than the model "
                                f"({manifest.model.vocab_size} rows{pieces} vs {vocab_size} rows, "
                                f"{tokenizer.vocab_size} pieces): a draft must share the tokenizer")
        return cls(OrtDecoder(manifest, threads=threads), str(folder))

    def _sync(self, context: Sequence[int]) -> None:
        """Keep the cached tokens that are a prefix of `context` (a new conversation starts a new cache)."""
        n = len(self.fed)
        if n > len(context) or list(context[:n]) != self.fed:
            self.cache, self.fed = self.decoder.new_cache(len(context) + 1), []

    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        self._sync(context)
        position = len(context) - 1  # of the pending token
        room = self.cache.max_context - position  # the draft feeds up to position + limit - 1
        limit = self.cache.rewindable(position, min(limit, room))
        if limit < 1:
            return []
        new = list(context[len(self.fed):])
        logits = self.decoder.prefill(self.cache, new)
        self.fed += new
        out = [sample(logits, self._greedy, self._rng)]
        while len(out) < limit:
            logits = self.decoder.step(self.cache, [out[-1]], borrow=True)
            self.fed.append(out[-1])
            out.append(sample(logits, self._greedy, self._rng))
        return out

    def commit(self, length: int) -> None:
        if self.cache.length > length:
            self.cache.rollback(length)
            del self.fed[length:]


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """The same pieces under the same ids (the 270M's and the 1B..27B's tokenizer are one)."""
    return a.vocab_size == b.vocab_size and all(a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size))


def speculative_generate(
    decoder: Decoder,
    cache: KVCache,
    prompt_ids: list[int],
    params: SamplingParams,
    max_new_tokens: int,
    drafter: Drafter,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    *,
    stream: TextStream | None = None,
    stop_ids: Iterable[int] = STOP_IDS,
    history: Sequence[int] = (),
    rng: np.random.Generator | None = None,
    stats: GenerationStats | None = None,
    image_features: np.ndarray | None = None,
) -> Iterator[Piece]:
    """`generate`'s contract and greedy output, drafting with `drafter` (falls back to `generate` unless greedy)."""
    stats = stats if stats is not None else GenerationStats()
    if not params.greedy or params.repetition_penalty != 1.0:
        log.warning("speculative decoding is exact for greedy decoding only (temperature 0, no repetition penalty): "
                    "generating without it")
        yield from generate(decoder, cache, prompt_ids, params, max_new_tokens, stream=stream, stop_ids=stop_ids,
                            history=history, rng=rng, stats=stats, image_features=image_features)
        return
    if not getattr(decoder, "multi_logits", False):
        raise ManifestError("speculative decoding needs a decoder that returns several positions' logits "
                            "(an ONNX Runtime export with logits_count): re-export the model")
    stats.speculative = getattr(drafter, "method", "custom")
    stop, rng, start, logits = begin(decoder, cache, prompt_ids, params, max_new_tokens, stop_ids, rng, stats,
                                     image_features)
    context = [*history, *prompt_ids]  # the drafters' view: every token before the pending one
    # tokens decided but not yet yielded (new[-1] is not fed); max_new_tokens 0 samples nothing, as plain
    new = [sample(logits, params, rng)] if max_new_tokens > 0 else []
    stats.prefill_seconds = time.perf_counter() - start
    base = cache.length  # what the cache holds when new[0] is yielded (plain decoding's cache.length then)
    reason, n = "length", 0
    try:
        while new:
            for j, token in enumerate(new):
                if token in stop:
                    reason = "stop"
                    break
                n += 1
                stats.generated_tokens = n
                yield Piece(token, stream.push(token) if stream is not None else "")
                if n == max_new_tokens or base + j + 1 > cache.max_context:
                    reason = "length" if n == max_new_tokens else "context"
                    break
            else:  # every token of the round yielded: verify the next drafts after the pending one
                context += new[:-1]
                start = time.perf_counter()  # the consumer's time between tokens is not ours
                new, base = _verify_round(decoder, cache, context, new[-1], drafter,
                                          min(draft_tokens, max_new_tokens - n - 1), params, rng, stats)
                stats.decode_seconds += time.perf_counter() - start
                continue
            # the loop ended at new[j]: plain decoding would hold base + j tokens (new[j] not fed)
            if cache.length > base + j:
                cache.rollback(base + j)
            drafter.commit(cache.length)
            break
    except GeneratorExit:
        reason = "cancelled"
        raise
    finally:
        stats.finish_reason = reason
        # tokens the decode steps settled that generation used (the first came from the prefill), as plain counts
        stats.decode_tokens = max(0, n - 1 + (reason == "stop"))
        stats.kv_cache_bytes = cache.nbytes
        stats.peak_rss_mb = peak_rss_mb()
    tail = stream.flush() if stream is not None else ""
    if tail:
        yield Piece(None, tail)


def _verify_round(decoder: Decoder, cache: KVCache, context: list[int], pending: int, drafter: Drafter,
                  limit: int, params: SamplingParams, rng: np.random.Generator,
                  stats: GenerationStats) -> tuple[list[int], int]:
    """Feed `pending` and up to `limit` drafts in one step; the greedy tokens it settles and the new `base`."""
    position = cache.length  # of the pending token
    room = cache.max_context - position - 1  # drafts must fit after it
    limit = cache.rewindable(position, max(0, min(limit, room)) + 1) - 1  # no ring compaction to roll back over
    drafts = drafter.propose([*context, pending], limit)[:limit] if limit > 0 else []
    logits = decoder.step(cache, [pending, *drafts], logits=len(drafts) + 1, borrow=True)
    rows = logits.reshape(len(drafts) + 1, -1)
    new = []
    for i, row in enumerate(rows):
        token = sample(row, params, rng)
        new.append(token)
        if i == len(drafts) or drafts[i] != token:
            break
    accepted = len(new) - 1
    stats.decode_steps += 1
    stats.drafted_tokens += len(drafts)
    stats.accepted_tokens += accepted
    if accepted < len(drafts):
        cache.rollback(position + 1 + accepted)
    context.append(pending)
    drafter.commit(cache.length)
    return new, position + 1
