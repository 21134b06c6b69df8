"""Child: llama.cpp through llama-cpp-python on the GGUF as shipped (Q4_K_M). Runs in the peers venv.

    <peers-venv>/bin/python -m bench.peer_llamacpp {speed|native|ppl} job.json out.json

`native` is llama-cpp-python as its users run it: its own `generate` (eval + sample loop, temperature 0 = greedy)
and `detokenize` per token; `speed` is the shared harness (our argmax on its logits).

Imports numpy, llama_cpp and the stdlib only (this project is not installed in that venv).
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

import numpy as np

from bench.common import (
    DECODE_TOKENS,
    THREADS,
    child_main,
    measure_native,
    measure_speed,
    perplexity_module,
    score_windows,
)

SPEED_CTX = 1024  # prompt 512 + 129 decoded tokens fit
PPL_CTX = 1040  # one window is 1025 tokens


def _load(gguf: str, n_ctx: int, n_batch: int, logits_all: bool) -> tuple[Any, float]:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=gguf,
        n_ctx=n_ctx,
        n_batch=n_batch,  # logical batch: a whole prompt / window per decode call
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=logits_all,
        verbose=False,
    )
    return llm, time.perf_counter() - t0


def _last_logits(llm: Any) -> np.ndarray:
    # With logits_all=False llama-cpp-python keeps no scores of its own; read the context's last row.
    ptr = llm._ctx.get_logits_ith(-1)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(llm.n_vocab(),))


def speed(job: dict[str, Any]) -> dict[str, Any]:
    llm, load_s = _load(job["gguf"], SPEED_CTX, n_batch=512, logits_all=False)

    def forward(ids: list[int]) -> int:
        llm.eval(ids)
        return int(_last_logits(llm).argmax())

    out = measure_speed(llm.reset, forward, lambda tok: forward([tok]), job["prompt"])
    out["load_s"] = load_s
    return out


def native(job: dict[str, Any]) -> dict[str, Any]:
    llm, load_s = _load(job["gguf"], SPEED_CTX, n_batch=512, logits_all=False)
    prompt = job["prompt"]

    def run() -> tuple[float, float, list[int]]:
        llm.reset()
        tokens: list[int] = []
        t0 = time.perf_counter()
        t1 = t0
        for token in llm.generate(prompt, temp=0.0, reset=True):  # never stops on its own: we stop it
            llm.detokenize([token])
            tokens.append(int(token))
            if len(tokens) == 1:
                t1 = time.perf_counter()
            if len(tokens) == DECODE_TOKENS + 1:
                break
        return t1 - t0, time.perf_counter() - t1, tokens

    out = measure_native(run, len(prompt))
    out["load_s"] = load_s
    return out


def ppl(job: dict[str, Any]) -> dict[str, Any]:
    llm, load_s = _load(job["gguf"], PPL_CTX, n_batch=PPL_CTX, logits_all=True)
    ids = job["eval_ids"]
    # The bench feeds every peer the same ids; record whether llama.cpp's own tokenizer agrees.
    own = llm.tokenize(perplexity_module().eval_text().encode("utf-8"), add_bos=False, special=False)
    own = own[: len(ids) - 1]

    def logits(inputs: list[int]) -> np.ndarray:
        llm.reset()  # each window is its own sequence: clear the cache
        llm.eval(inputs)
        return llm.scores[: len(inputs)]

    return score_windows(ids, logits, load_s, own)


if __name__ == "__main__":
    child_main({"speed": speed, "native": native, "ppl": ppl})
