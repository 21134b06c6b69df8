"""Child: onnxruntime-genai on the model its builder made (int4, block 32; see bench/genai_build.py).

    python -m bench.peer_genai {speed|native|ppl} job.json out.json

job["model_dir"] is the builder's output folder. `native` is genai as its users run it (`generate_next_token`,
greedy inside genai, a tokenizer stream per token); `speed` is the shared harness (our argmax on its logits).
"""

from __future__ import annotations

import json
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

SPEED_MAX_LENGTH = 1024  # >= the 512 window: genai's windowed cache refuses a shorter max_length
PPL_MAX_LENGTH = 1040  # one window is 1025 tokens


def _load(model_dir: str) -> tuple[Any, float]:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(model_dir)
    # genai_config.json has no thread counts; ORT would otherwise size its pool from the cores it sees.
    options = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config), time.perf_counter() - t0


def _generator(model: Any, max_length: int) -> Any:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    return og.Generator(model, params)


def speed(job: dict[str, Any]) -> dict[str, Any]:
    model, load_s = _load(job["model_dir"])
    state: dict[str, Any] = {}

    def reset() -> None:
        state["gen"] = _generator(model, SPEED_MAX_LENGTH)  # a fresh generator is an empty cache

    def forward(ids: list[int]) -> int:
        # append_tokens runs the model at once; we pick the greedy token ourselves, like the other peers
        state["gen"].append_tokens(ids)
        return int(np.asarray(state["gen"].get_logits()).reshape(-1).argmax())

    out = measure_speed(reset, forward, lambda tok: forward([tok]), job["prompt"])
    out["load_s"] = load_s
    return out


def native(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime_genai as og

    model, load_s = _load(job["model_dir"])
    tokenizer = og.Tokenizer(model)
    prompt = job["prompt"]
    total = len(prompt) + DECODE_TOKENS + 1  # the prompt, the first token, then DECODE_TOKENS more

    def run() -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        # min_length = max_length: eos does not end the run early, every system decodes the same count
        params.set_search_options(max_length=max(total, SPEED_MAX_LENGTH), min_length=total, do_sample=False)
        generator, stream = og.Generator(model, params), tokenizer.create_stream()
        t0 = time.perf_counter()
        generator.append_tokens(prompt)  # runs the prompt
        tokens = []
        t1 = t0
        while len(tokens) < DECODE_TOKENS + 1:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            stream.decode(token)
            tokens.append(token)
            if len(tokens) == 1:
                t1 = time.perf_counter()
        return t1 - t0, time.perf_counter() - t1, tokens

    out = measure_native(run, len(prompt))
    out["load_s"] = load_s
    return out


def ppl(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime_genai as og

    model, load_s = _load(job["model_dir"])
    ids = job["eval_ids"]
    own = list(og.Tokenizer(model).encode(perplexity_module().eval_text()))[: len(ids) - 1]

    def logits(inputs: list[int]) -> np.ndarray:
        gen = _generator(model, PPL_MAX_LENGTH)
        gen.append_tokens(inputs)
        # get_logits() is the last row only; the decoder's raw "logits" output holds every prompt position
        return np.asarray(gen.get_output("logits"))

    return score_windows(ids, logits, load_s, own)


if __name__ == "__main__":
    child_main({"speed": speed, "native": native, "ppl": ppl})
