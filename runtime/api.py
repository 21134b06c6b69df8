"""The Python API: `load` an exported folder, then `generate`, `stream` or `chat`.

    model = load("out/gemma-3-270m-it")
    print(model.generate("Why is the sky blue?", max_new_tokens=64).text)
    for piece in model.stream([{"role": "user", "content": "Hi"}], temperature=0):
        print(piece, end="", flush=True)
    chat = model.chat(system="Answer briefly.")
    chat.send("Name a prime.")  # prefills the whole template
    chat.send("Another one?")  # prefills only `<end_of_turn>\\n<start_of_turn>user\\n...`: the cache is kept
    model.generate("Quote the passage: ...", temperature=0, speculative="lookup")  # or "draft:DIR"

Speculative decoding (runtime/speculative.py) keeps greedy output token for token; with sampling it is skipped
(with a warning).

The backend follows the folder: `--target ort` exports run on ONNX Runtime (OrtDecoder); `--target tensorrt`
exports run the engines `gemma3-build` wrote into MODEL_DIR/engines (runtime/tensorrt/). Both offer the same
decoder interface (new_cache, step, prefill, chunks), which is all that generation, chat and images use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gemma3.runtime.chat import Message, next_user_turn_ids, raw_prompt_ids, render_chat
from gemma3.runtime.generate import GenerationStats, Piece, check_prompt, generate
from gemma3.runtime.images import BOI_TOKEN, as_image_list
from gemma3.runtime.kv_cache import KVCache
from gemma3.runtime.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    check_files,
    load_manifest,
    require_file,
)
from gemma3.runtime.ort_decoder import DEFAULT_CHUNK, OrtDecoder
from gemma3.runtime.sampling import SamplingParams, make_rng
from gemma3.runtime.speculative import Drafter, DraftModel, LookupDrafter, Speculative, speculative_generate
from gemma3.runtime.tensorrt.engines import import_backend, read_engines
from gemma3.runtime.tokenizer import Tokenizer, TokenizerError
from gemma3.runtime.vision import ImagePrompt, Images, OrtVision, encode_images

if TYPE_CHECKING:
    from gemma3.runtime.tensorrt.decoder import TensorRTDecoder

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
Prompt = str | Sequence[Message]
ImagesArg = Images | ImagePrompt | None  # one image, a list of them, or already encoded ones
SpeculativeArg = str | Speculative | None  # "off", "lookup", "draft:DIR" or a Speculative


class Vision(Protocol):
    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, list[float]]: ...


@dataclass
class Result:
    text: str
    token_ids: list[int]  # generated ids, without the stop token
    stats: GenerationStats

    @property
    def finish_reason(self) -> str | None:
        return self.stats.finish_reason

    def as_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "text": self.text, "token_ids": self.token_ids, "finish_reason": s.finish_reason,
            "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
            "prefill_tokens_per_s": round(s.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(s.decode_tokens_per_s, 2),
            "peak_rss_mb": round(s.peak_rss_mb, 1), "kv_cache_bytes": s.kv_cache_bytes,
            **({"images": s.images, "crops": s.crops, "vision_seconds": [round(t, 3) for t in s.vision_seconds]}
               if s.images else {}),
            **({"speculative": s.speculative, "decode_steps": s.decode_steps, "drafted_tokens": s.drafted_tokens,
                "accepted_tokens": s.accepted_tokens, "acceptance_rate": round(s.acceptance_rate, 4),
                "tokens_per_step": round(s.tokens_per_step, 3)} if s.speculative else {}),
        }


class Stream:
    """Iterate for the text pieces as they are generated; `result` is set once the iteration ends."""

    def __init__(self, pieces: Iterator[Piece], stats: GenerationStats, on_done: Callable[[Result], None] | None):
        self._pieces, self._stats, self._on_done = pieces, stats, on_done
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        text: list[str] = []
        try:
            for piece in self._pieces:
                if piece.token_id is not None:
                    ids.append(piece.token_id)
                if piece.text:
                    text.append(piece.text)
                    yield piece.text
        finally:
            self._pieces.close()  # sets finish_reason "cancelled" if the consumer stopped early
            self.result = Result("".join(text), ids, self._stats)
            if self._on_done is not None:
                self._on_done(self.result)

    def consume(self) -> Result:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Model:
    """An exported model: its manifest, tokenizer and decoder (OrtDecoder, or TensorRTDecoder for engines).
    `vision`: makes the image encoder on first use (default: the ONNX Runtime vision graph)."""

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, decoder: OrtDecoder | TensorRTDecoder,
                 vision: Callable[[], Vision] | None = None) -> None:
        self.manifest, self.tokenizer, self.decoder = manifest, tokenizer, decoder
        self._make_vision = vision
        known = {f.name for f in fields(SamplingParams)}
        shipped = {k: v for k, v in manifest.generation_defaults.items() if k in known}
        for k in ("top_k", "seed"):  # JSON writers may give integers as 64.0
            if isinstance(shipped.get(k), float) and shipped[k].is_integer():
                shipped[k] = int(shipped[k])
        try:
            self.defaults = SamplingParams().updated(shipped)
        except ValueError as e:  # a manifest's own defaults: name the file, like every other manifest problem
            raise ManifestError(f"{manifest.root / MANIFEST_FILE}: 'generation_defaults': {e}") from None
        self._vision: Vision | None = None
        self._drafts: dict[str, DraftModel] = {}  # draft models by folder, loaded on first use
        self._noise_noted = False  # the int8-activation caveat of speculative decoding is logged once

    def drafter(self, speculative: SpeculativeArg,
                draft_tokens: int | None = None) -> tuple[Speculative, Drafter] | None:
        """The speculative setting (see `Speculative.parse`) and its drafter; None for "off". Refused in one
        line where it cannot run: an export without logits_count, a tensorrt folder, an incompatible draft."""
        spec = Speculative.parse(speculative, draft_tokens)
        if spec is None:
            return None
        if self.manifest.target != "ort":
            raise ValueError("speculative decoding runs on ONNX Runtime exports (--target ort) only")
        if not getattr(self.decoder, "multi_logits", False):
            raise ManifestError(f"{self.manifest.decoder.file.name} returns one position's logits per step: "
                                "speculative decoding needs logits_count (re-export the model)")
        if not self._noise_noted:
            self._noise_noted = True
            if int8_activations(self.manifest):
                log.warning("this export computes with int8 activations (accuracy_level 4): a multi-token verify "
                            "step's logits differ from single-token steps' by rounding noise, so at a near-tie "
                            "speculative greedy output can differ from plain greedy output")
        if spec.method == "lookup":
            image = self.manifest.model.image_token_id
            return spec, LookupDrafter(exclude=() if image is None else (image,))
        assert spec.draft_dir is not None
        key = os.path.realpath(spec.draft_dir)
        if key not in self._drafts:
            self._drafts[key] = DraftModel.open(spec.draft_dir, self.manifest.model.vocab_size, self.tokenizer,
                                                self.decoder.threads)
        return spec, self._drafts[key]

    @property
    def sees_images(self) -> bool:
        m = self.manifest  # ort: a separate image graph; tensorrt: the one decoder takes image_features
        return m.vision is not None and (m.image_decoder is not None or m.decoder.image_features is not None)

    def encode_images(self, images: Images | ImagePrompt, pan_and_scan: bool = False,
                      max_crops: int = 4, **pan_and_scan_options: Any) -> ImagePrompt:
        """Images (one path or PIL image, or a list of them) -> their features, via Pan & Scan and the vision
        graph. Already encoded images pass through, so one encoding can serve several prompts."""
        if isinstance(images, ImagePrompt):
            return images
        if not self.sees_images:
            raise ValueError(f"the {self.manifest.model.name} model is text-only: it cannot take images")
        if self._vision is None and self._make_vision is not None:
            self._vision = self._make_vision()
        if self._vision is None:
            from gemma3.runtime.ort_decoder import session_options

            self._vision = OrtVision(self.manifest, session_options(self.decoder.threads))
        return encode_images(self._vision, self.manifest, images, pan_and_scan, max_crops, **pan_and_scan_options)

    def _encoded(self, images: ImagesArg, pan_and_scan: bool, max_crops: int) -> ImagePrompt | None:
        """The prompt's images encoded, or None when there are none (None, (), [])."""
        if isinstance(images, ImagePrompt):
            return images
        listed = as_image_list(images)  # a single path or image is one image; a clear error for anything else
        return self.encode_images(listed, pan_and_scan, max_crops) if listed else None

    def sampling(self, **overrides: Any) -> SamplingParams:
        """The checkpoint's sampling defaults with `overrides` applied (None values keep the default)."""
        return self.defaults.updated(overrides)

    def prompt_ids(self, prompt: Prompt, system: str | None = None, raw: bool = False,
                   images: ImagePrompt | None = None) -> list[int]:
        """A text prompt through the chat template (or raw, after <bos>), or a list of chat messages.

        With `images`, each `<start_of_image>` in the text (or {"type": "image"} message part) takes the next
        image; a text prompt without any gets all of them in front, as `[image, ..., text]` content would.
        """
        encoder = self.tokenizer if images is None else images.encoder(self.tokenizer)
        if isinstance(prompt, str):
            if images is not None and BOI_TOKEN not in prompt:
                prompt = BOI_TOKEN * len(images.crops) + prompt
            if raw:
                if system is not None:
                    raise ValueError("a system prompt needs the chat template (drop raw)")
                ids = raw_prompt_ids(encoder, prompt)
            else:
                messages: list[Message] = [{"role": "system", "content": system}] if system is not None else []
                ids = render_chat(encoder, [*messages, {"role": "user", "content": prompt}])
        else:
            if raw or system is not None:
                raise ValueError("raw and system apply to text prompts; put a system message in the list instead")
            ids = render_chat(encoder, prompt)
        if images is not None:
            encoder.check_used()
        return ids

    def _run(self, cache: KVCache, ids: list[int], params: SamplingParams, max_new_tokens: int,
             history: Sequence[int] = (), on_done: Callable[[Result], None] | None = None,
             rng: np.random.Generator | None = None, images: ImagePrompt | None = None,
             speculative: SpeculativeArg = None, draft_tokens: int | None = None) -> Stream:
        check_prompt(cache, len(ids))  # before anything runs, so errors surface at the call
        drafting = self.drafter(speculative, draft_tokens)  # and so are bad speculative settings
        stats = GenerationStats()
        if images is not None:
            stats.images, stats.crops, stats.vision_seconds = len(images.crops), images.crops, images.vision_seconds
        features = None if images is None else images.features
        if drafting is not None and images is not None and drafting[0].method == "draft":
            log.warning("a draft model cannot see the prompt's images: generating without speculative decoding")
            drafting = None
        if drafting is None:
            pieces = generate(self.decoder, cache, ids, params, max_new_tokens, stream=self.tokenizer.stream(),
                              history=history, rng=rng, stats=stats, image_features=features)
        else:
            spec, drafter = drafting
            pieces = speculative_generate(self.decoder, cache, ids, params, max_new_tokens, drafter,
                                          spec.draft_tokens, stream=self.tokenizer.stream(), history=history,
                                          rng=rng, stats=stats, image_features=features)
        return Stream(pieces, stats, on_done)

    def stream(self, prompt: Prompt, *, system: str | None = None, raw: bool = False,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, images: ImagesArg = (),
               pan_and_scan: bool = False, max_crops: int = 4, speculative: SpeculativeArg = None,
               draft_tokens: int | None = None, **sampling: Any) -> Stream:
        """Generate lazily: iterate the returned `Stream` for text pieces, then read its `result`.
        `images`: a path or PIL image, or a list of them, placed at the prompt's `<start_of_image>` markers (or in
        front). `speculative`: "lookup" or "draft:DIR" (greedy only; `draft_tokens` per verify step)."""
        params = self.sampling(**sampling)
        encoded = self._encoded(images, pan_and_scan, max_crops)
        if isinstance(prompt, str) and not prompt.strip() and encoded is None:
            raise ValueError("the prompt is empty: give some text (or an image) to respond to")
        ids = self.prompt_ids(prompt, system, raw, encoded)
        return self._run(self.decoder.new_cache(len(ids) + 1), ids, params, max_new_tokens, images=encoded,
                         speculative=speculative, draft_tokens=draft_tokens)

    def generate(self, prompt: Prompt, *, system: str | None = None, raw: bool = False,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, images: ImagesArg = (),
                 pan_and_scan: bool = False, max_crops: int = 4, speculative: SpeculativeArg = None,
                 draft_tokens: int | None = None, **sampling: Any) -> Result:
        return self.stream(prompt, system=system, raw=raw, max_new_tokens=max_new_tokens, images=images,
                           pan_and_scan=pan_and_scan, max_crops=max_crops, speculative=speculative,
                           draft_tokens=draft_tokens, **sampling).consume()

    def chat(self, system: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             speculative: SpeculativeArg = None, draft_tokens: int | None = None, **sampling: Any) -> ChatSession:
        session = ChatSession(self, system, self.sampling(**sampling), max_new_tokens)
        self.drafter(speculative, draft_tokens)  # refuse a bad setting now, not at the first message
        session.speculative, session.draft_tokens = speculative, draft_tokens
        return session


class ChatSession:
    """A multi-turn conversation that keeps its KV cache: each turn prefills only its new tokens."""

    def __init__(self, model: Model, system: str | None, params: SamplingParams, max_new_tokens: int) -> None:
        self.model, self.system, self.params, self.max_new_tokens = model, system, params, max_new_tokens
        self.speculative: SpeculativeArg = None  # every reply's speculative setting (Model.chat sets it)
        self.draft_tokens: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and its cache); the system text and sampling settings stay."""
        self.cache: KVCache | None = None
        self._last: Stream | None = None
        self._rng = make_rng(self.params.seed)  # one random stream for the whole conversation
        self.tokens: list[int] = []  # the whole conversation; tokens[cache.length:] are generated but not yet fed
        self.messages: list[dict[str, str]] = []
        if self.system is not None:
            self.messages.append({"role": "system", "content": self.system})

    def stream(self, text: str, max_new_tokens: int | None = None, images: ImagesArg = (),
               pan_and_scan: bool = False, max_crops: int = 4, **sampling: Any) -> Stream:
        """Send a user message (with `images` at its `<start_of_image>` markers, or in front); iterate the
        returned `Stream` for the reply's text pieces."""
        if self._last is not None and self._last.result is None:
            raise RuntimeError("iterate the previous reply's stream to its end before sending another message")
        params = self.params.updated(sampling)
        rng = make_rng(params.seed) if "seed" in sampling else self._rng
        encoded = self.model._encoded(images, pan_and_scan, max_crops)
        if not text.strip() and encoded is None:
            raise ValueError("the message is empty: give some text (or an image)")
        tok = self.model.tokenizer if encoded is None else encoded.encoder(self.model.tokenizer)
        if encoded is not None and BOI_TOKEN not in text:
            text = BOI_TOKEN * len(encoded.crops) + text
        first = self.cache is None
        if first:
            new = next_user_turn_ids(tok, text, self.system, first=True)
            cache = self.model.decoder.new_cache(len(new) + 1)
        else:
            new = next_user_turn_ids(tok, text)
            cache = self.cache
        fed = cache.length
        feed = self.tokens[fed:] + new  # the last reply's unfed token(s), then the new turn
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if encoded is not None:
            tok.check_used()
        stream = self.model._run(cache, feed, params, limit, history=self.tokens[:fed], on_done=self._finish, rng=rng,
                                 images=encoded, speculative=self.speculative, draft_tokens=self.draft_tokens)
        self.cache, self._last = cache, stream
        self.tokens += new
        self.messages.append({"role": "user", "content": text})
        return stream

    def _finish(self, result: Result) -> None:
        self.tokens += result.token_ids
        self.messages.append({"role": "model", "content": result.text})

    def send(self, text: str, max_new_tokens: int | None = None, **sampling: Any) -> Result:
        return self.stream(text, max_new_tokens, **sampling).consume()


def load(model_dir: str | os.PathLike, threads: int | None = None, chunk_size: int | None = None) -> Model:
    """Open an exported model folder (manifest.json, decoder.onnx, tokenizer.model) for generation.

    ort folders run on ONNX Runtime (`threads`; `chunk_size` prompt tokens per step, default 256); tensorrt folders
    run their engines from MODEL_DIR/engines (`chunk_size` defaults to the engines' max_chunk, and cannot exceed
    it). A tensorrt folder without engines, or without tensorrt / cuda-python installed, is refused in one line."""
    manifest = load_manifest(model_dir)
    check_files(manifest)  # ort: every graph, weights file and the tokenizer, before anything is loaded
    engines = None
    if manifest.target == "tensorrt":
        engines = read_engines(manifest.root)  # one line if there are none: build them with gemma3-build
        import_backend(engines)  # before anything slow: one line if tensorrt or cuda-python is missing
    tokenizer = load_tokenizer(manifest)
    if tokenizer.vocab_size > manifest.model.vocab_size:
        raise ManifestError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only {manifest.model.vocab_size} rows"
        )
    if engines is None:
        decoder = OrtDecoder(manifest, threads=threads, chunk_size=DEFAULT_CHUNK if chunk_size is None else chunk_size)
        return Model(manifest, tokenizer, decoder)
    from gemma3.runtime.tensorrt.decoder import TensorRTDecoder

    trt_decoder = TensorRTDecoder(manifest, engines, chunk_size=chunk_size)
    return Model(manifest, tokenizer, trt_decoder, vision=trt_decoder.vision)


def int8_activations(manifest: Manifest) -> bool:
    """Whether the export's quantized matmuls round their activations to int8 (MatMulNBits accuracy_level 4)."""
    return manifest.accuracy_level == 4


def load_tokenizer(manifest: Manifest) -> Tokenizer:
    """The folder's tokenizer.model; a corrupt one is a `ManifestError` naming the file, like a missing one."""
    try:
        return Tokenizer.from_file(require_file(manifest.tokenizer, "tokenizer model"))
    except TokenizerError as e:
        raise ManifestError(str(e)) from None


def sampling_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling parameters among `values` that were given (not None)."""
    names = {f.name for f in fields(SamplingParams)}
    return {k: v for k, v in values.items() if k in names and v is not None}
