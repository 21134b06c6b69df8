"""Continuous batching on ONNX Runtime (CPU): one decoder call advances every active sequence.

`BatchEngine` runs `Job`s (runtime/jobs.py) on its own thread. Each loop iteration
  1. admits the next queued job into a free slot (at most `max_batch` sequences hold one) and starts its prefill;
  2. runs ONE prefill step of the sequence being prefilled (a chunk of at most `prefill_chunk` tokens, an image
     never split), through the decoder's one-sequence path on that slot's row of the batch cache;
  3. runs ONE batched decode step over every sequence past its prefill: input_ids [B, 1], past_len [B], each
     sequence at its own length (GroupQueryAttention's seqlens_k), then samples each row.
So a new prompt is prefilled between decode steps and joins the batch once its first token is sampled; a finished
or cancelled sequence leaves at once (the last row is copied into its hole, keeping the batch rows [0, B) packed).

Why prefill stays B=1 and only decode is batched: ONNX Runtime's CPU GroupQueryAttention refuses a step of S > 1
tokens for B > 1 sequences with a past ("batch_size must be 1 when sequence_length > 1 and past context is given",
1.32), and a step takes one S for every row anyway. Nor would batching prefill pay: a prefill chunk already runs
matmuls of S rows (measured on the 270M fp32, 2 threads, on a shared machine: a 25-token prefill step 160 ms, i.e.
~150 tokens/s, against one decode step 124 ms). Decode is bound by reading the weights (the 262144-row tied
lm_head above all), which B rows share: a decode step takes 124 ms at B=1, 148 at B=2, 145 at B=4, 180 at B=8
(8 -> 44 tokens/s; bench/batching.py prints the engine-level numbers).

Exactness: each sequence keeps the semantics of runtime/generate.py token for token: its own Generator from its
seed, `sample` with the same repetition-penalty bookkeeping, the same stop / length / context rules. Its cache rows
(local windowed buffers compacted per sequence by the op, global rows) are what it would hold alone; only the
matmuls' rounding may differ between B rows and one. fp32: the real 270M's batched tokens equal the plain loop's
(8 of 8 sequences, 128 tokens). With int8 activations (accuracy_level 4) ONNX Runtime's multi-row kernels round
differently (1.7e-5 on a 270M logit row), so at a near-tie a batched sequence can take the other token, as
speculative verification steps can (README); half the sequences of bench/batching.py's int8-head4-fast rounds do.

The engine owns the model's decoder while it runs: do not call `model.generate` on the same model meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from gemma3.runtime.batch_cache import BatchCache, SlotCache
from gemma3.runtime.generate import SeenIds, check_prompt_fits
from gemma3.runtime.jobs import EngineClosed, Job, QueueFull, TokenLogprobs
from gemma3.runtime.manifest import ManifestError
from gemma3.runtime.ort_decoder import OrtDecoder, run_error
from gemma3.runtime.sampling import make_rng, sample

if TYPE_CHECKING:
    from gemma3.runtime.api import Model

log = logging.getLogger(__name__)


class NotBatched(ManifestError):
    """The export's decoder steps one sequence at a time (exported before batching, or not ONNX Runtime)."""


class _DecodeStep:
    """The batched decode call: its own IO binding on the decoder's session, rows [0, B) of the batch cache."""

    def __init__(self, decoder: OrtDecoder, max_batch: int) -> None:
        self.decoder, self.spec = decoder, decoder.spec
        self.binding = decoder.session.io_binding()
        m = decoder.manifest.model
        self.logits = np.zeros((max_batch, 1, m.vocab_size), np.float32)  # rows are sampled in place (views)
        self._logit_values: dict[int, ort.OrtValue] = {}
        self._no_rows = np.zeros((0, m.hidden_size or 0), np.float32)  # the multimodal graph's text branch
        self.release()

    def release(self) -> None:
        """Unbind the cache (its buffers can then be freed); keep the inputs that never change."""
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._bound: tuple[int, int] | None = None  # (B, cache version) the cache views are bound for
        if self.spec.logits_count is not None:
            self.binding.bind_cpu_input(self.spec.logits_count, np.array(1, np.int64))
        if self.spec.image_features is not None:
            self.binding.bind_cpu_input(self.spec.image_features, self._no_rows)

    def __call__(self, cache: BatchCache, tokens: list[int], lengths: list[int]) -> np.ndarray:
        """Feed tokens[b] at past_len lengths[b] for b < B; the logits [B, vocab] (this buffer: sample at once)."""
        batch = len(tokens)
        b = self.binding
        if self._bound != (batch, cache.version):
            for past, present, value in cache.bindings(0, batch):
                b.bind_ortvalue_input(past, value)
                b.bind_ortvalue_output(present, value)
            if batch not in self._logit_values:
                self._logit_values[batch] = ort.OrtValue.ortvalue_from_numpy(self.logits[:batch])
            b.bind_ortvalue_output(self.spec.logits_output, self._logit_values[batch])
            self._bound = (batch, cache.version)
        b.bind_cpu_input(self.spec.input_ids, np.array(tokens, np.int64).reshape(batch, 1))
        b.bind_cpu_input(self.spec.past_len, np.array(lengths, np.int64))
        try:
            self.decoder.session.run_with_iobinding(b)
        except Exception as e:  # ORT's own exception types: one line of ours
            raise run_error(f"{self.spec.file} (batch of {batch})", e) from None
        return self.logits[:batch, 0]


@dataclass(eq=False)
class _Sequence:
    job: Job
    cache: SlotCache  # its row of the batch cache
    rng: np.random.Generator
    seen: SeenIds
    ids: np.ndarray  # the prompt
    steps: list[tuple[int, int]]  # prefill steps [start, end) still to run
    image_rows: int = 0  # image feature rows fed so far
    generated: int = 0
    token: int = 0  # the last token yielded: the next decode step feeds it


class BatchEngine:
    """Continuous batching over an ONNX Runtime export whose decoder has a batch axis (manifest `batch`)."""

    def __init__(self, model: Model, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | None = None) -> None:
        """`prefill_chunk`: prompt tokens per prefill step (default: the decoder's chunk_size): smaller steps keep the
        running sequences' decode steps closer together while a long prompt is prefilled, at some prefill speed."""
        decoder = model.decoder
        if not isinstance(decoder, OrtDecoder) or not decoder.spec.batch:
            raise NotBatched(f"{model.manifest.root}: the decoder graph steps one sequence at a time (an ONNX Runtime "
                             "export from before batched decoding, or not an ONNX Runtime export): re-export it, "
                             "or serve it with a serial engine")
        if max_batch < 1 or max_queue < 0 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError(f"max_batch and prefill_chunk must be >= 1 and max_queue >= 0, got {max_batch}, "
                             f"{prefill_chunk} and {max_queue}")
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.model, self.decoder = model, decoder
        m = model.manifest
        self._vocab, self._max_context = m.model.vocab_size, m.max_context
        self._image_id = m.model.image_token_id if (decoder.sees_images or decoder.spec.image_features) else None
        self._cache = BatchCache(decoder.spec, m.model.num_kv_heads, m.model.head_dim, m.max_context, max_batch)
        self._step = _DecodeStep(decoder, max_batch)
        self._queue: deque[Job] = deque()
        self._decoding: list[_Sequence] = []  # row b of the batch cache is _decoding[b]
        self._prefilling: _Sequence | None = None  # at row len(_decoding)
        self._cond = threading.Condition()
        self._closing = self._cancel_all = False
        self.steps = 0  # batched decode steps run (for stats)
        self._thread = threading.Thread(target=self._loop, name="BatchEngine", daemon=True)
        self._thread.start()

    # --- the caller's side -----------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._check(job)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} jobs are queued already (max_queue {self.max_queue})")
            self._queue.append(job)
            self._cond.notify()

    def _check(self, job: Job) -> None:
        """Everything a job can be refused for, before it is queued (ValueError)."""
        check_prompt_fits(len(job.prompt_ids), self._max_context)  # ContextLengthError is a ValueError
        ids = np.asarray(job.prompt_ids)
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self._vocab:
            raise ValueError(f"prompt ids must be integers in [0, {self._vocab})")
        if job.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {job.max_new_tokens}")
        if job.logprobs is not None and job.logprobs < 0:
            raise ValueError(f"logprobs must be None or >= 0, got {job.logprobs}")
        rows = int((ids == self._image_id).sum()) if self._image_id is not None else 0
        given = 0 if job.image_features is None else len(job.image_features)
        if given and self._image_id is None:
            raise ValueError(f"the {self.model.manifest.model.name} export is text-only: it takes no images")
        if rows != given:
            raise ValueError(f"the prompt has {rows} image soft tokens but {given} image feature rows")
        hidden = self.model.manifest.model.hidden_size
        if given and (np.ndim(job.image_features) != 2 or np.shape(job.image_features)[1] != hidden):
            raise ValueError(f"image features must be [rows, {hidden}], got {list(np.shape(job.image_features))}")

    @property
    def active(self) -> int:
        return len(self._decoding) + (self._prefilling is not None)

    def stats(self) -> dict[str, int]:
        with self._cond:
            prefilling = int(self._prefilling is not None)
            return {"queued": len(self._queue), "active": len(self._decoding) + prefilling,
                    "decoding": len(self._decoding), "prefilling": prefilling, "steps": self.steps,
                    "cache_bytes": self._cache.nbytes}

    def close(self, cancel: bool = False) -> None:
        with self._cond:
            self._closing = True
            self._cancel_all = self._cancel_all or cancel
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:  # a callback closing the engine cannot join itself
            self._thread.join()

    # --- the engine's thread ---------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._decoding) or self._prefilling is not None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._busy() or self._closing):
                    self._cond.wait()
                if self._cancel_all:
                    for job in [*self._queue, *(s.job for s in self._sequences())]:
                        job.cancel()
                dropped = [job for job in self._queue if job.cancelled.is_set()]
                for job in dropped:
                    self._queue.remove(job)
                if not (self._queue or self._busy() or dropped) and self._closing:
                    break
                job = None
                if self._queue and self._prefilling is None and len(self._decoding) < self.max_batch:
                    job = self._queue.popleft()
            for cancelled in dropped:
                _report(cancelled, "cancelled")
            try:
                self._iterate(job)
            except Exception as e:  # a bug of ours: fail what is in flight, keep serving
                log.exception("batch engine step failed")
                for seq in self._sequences():
                    self._finish(seq, "error", e)
            if not self._busy():
                self._idle()
        self._idle()

    def _idle(self) -> None:
        """Nothing is held: give the grown buffers back (the bindings would keep them alive)."""
        if self._cache.slots > 1 or self._cache.global_rows > self._cache.initial_rows:
            self._step.release()
            self.decoder.release_cache()
            self._cache.reset()

    def _sequences(self) -> list[_Sequence]:
        return [*self._decoding, *([self._prefilling] if self._prefilling is not None else [])]

    def _iterate(self, job: Job | None) -> None:
        if job is not None:
            self._admit(job)
        for seq in self._sequences():
            if seq.job.cancelled.is_set():
                self._finish(seq, "cancelled")
        if self._prefilling is not None:
            self._prefill_step(self._prefilling)
        if self._decoding:
            self._decode_step()

    def _admit(self, job: Job) -> None:
        ids = np.asarray(job.prompt_ids, np.int64)
        params = job.params
        seq = _Sequence(job, self._cache.slot(len(self._decoding)), make_rng(params.seed),
                        SeenIds(self._vocab, job.prompt_ids, params.repetition_penalty != 1.0), ids,
                        self.decoder.chunks(ids, self.prefill_chunk))
        self._prefilling = seq
        try:
            seq.cache.reserve(ids.size)  # the global rows grow once for the whole prompt
        except Exception as e:
            self._finish(seq, "error", e)

    def _prefill_step(self, seq: _Sequence) -> None:
        start, end = seq.steps.pop(0)
        chunk = seq.ids[start:end]
        n = int((chunk == self._image_id).sum()) if self._image_id is not None else 0
        features = seq.job.image_features[seq.image_rows:seq.image_rows + n] if n else None
        try:
            logits = self.decoder.step(seq.cache, chunk, features, borrow=True)
        except Exception as e:
            self._finish(seq, "error", e)
            return
        seq.image_rows += n
        if seq.steps:
            return
        self._prefilling = None
        self._decoding.append(seq)  # it already sits at row len(_decoding)
        if seq.job.max_new_tokens == 0:
            self._finish(seq, "length")
            return
        reason, error = self._take(seq, logits)
        if reason is not None:
            self._finish(seq, reason, error)

    def _decode_step(self) -> None:
        seqs = list(self._decoding)
        lengths = [s.cache.length for s in seqs]
        try:
            self._cache.reserve(max(lengths) + 1, len(seqs))
            logits = self._step(self._cache, [s.token for s in seqs], lengths)
        except Exception as e:  # the call failed for all of them alike
            for seq in seqs:
                self._finish(seq, "error", e)
            return
        self.steps += 1
        ends = []
        for b, seq in enumerate(seqs):
            seq.cache.advance(1)
            reason, error = self._take(seq, logits[b])
            if reason is not None:
                ends.append((seq, reason, error))
        for seq, reason, error in ends:
            self._finish(seq, reason, error)

    def _take(self, seq: _Sequence, logits: np.ndarray) -> tuple[str | None, BaseException | None]:
        """Sample `seq`'s next token from its logits row and hand it over, as runtime/generate.py's loop does;
        a finish reason (and error) when the sequence ends here."""
        job = seq.job
        try:
            seen = seq.seen.ids()
            token = sample(logits, job.params, seq.rng, seen)
            if token in job.stop_ids:
                return "stop", None
            lp = None if job.logprobs is None else TokenLogprobs.from_logits(logits, job.params, token, job.logprobs,
                                                                             seen)
            job.on_token(token, lp)
        except Exception as e:  # a row without a finite logit, or the caller's callback
            return "error", e
        seq.generated += 1
        seq.seen.add(token)
        seq.token = token
        if seq.generated >= job.max_new_tokens:
            return "length", None
        if seq.cache.length + 1 > self._max_context:
            return "context", None
        return None, None

    def _finish(self, seq: _Sequence, reason: str, error: BaseException | None = None) -> None:
        """Take `seq` out of its slot (keeping the rows packed) and report the end of its job."""
        if seq is self._prefilling:
            self._prefilling = None  # its row is past the decoding ones: nothing to move
        elif seq in self._decoding:
            last = len(self._decoding) - 1
            moved = self._decoding.pop()
            if moved is not seq:  # the last row fills the hole
                row = seq.cache.row
                self._cache.move(last, row)
                moved.cache.row = row
                self._decoding[row] = moved
            if self._prefilling is not None:  # keep it right after the decoding rows
                self._cache.move(last + 1, last)
                self._prefilling.cache.row = last
        else:
            return  # already finished
        _report(seq.job, reason, error)


def _report(job: Job, reason: str, error: BaseException | None = None) -> None:
    try:
        job.on_done(reason, error)
    except Exception:  # the caller's bug must not stop the engine
        log.exception("on_done of a job raised")
