"""Child: transformers eager fp32 on the GGUF's dequantized weights (the quality ceiling for exports of it).

python -m bench.peer_transformers {speed|ppl} job.json out.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import THREADS, child_main, measure_speed, perplexity_module


def _load(gguf: str) -> tuple[Any, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    path = Path(gguf)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval(), time.perf_counter() - t0


def speed(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    model, load_s = _load(job["gguf"])
    state: dict[str, Any] = {}

    def reset() -> None:
        state["cache"] = DynamicCache(config=model.config)  # sliding layers get their own windowed entries

    def forward(ids: list[int]) -> int:
        out = model(input_ids=torch.tensor([ids]), past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    with torch.inference_mode():
        out = measure_speed(reset, forward, lambda tok: forward([tok]), job["prompt"])
    out["load_s"] = load_s
    return out


def ppl(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    p = perplexity_module()
    model, load_s = _load(job["gguf"])

    def logits(inputs: list[int]) -> Any:
        # logits_to_keep=0 keeps every position; each window is its own sequence with no cache
        return model(input_ids=torch.tensor([inputs]), use_cache=False, logits_to_keep=0).logits[0].numpy()

    t0 = time.perf_counter()
    with torch.inference_mode():
        total, count = p.evaluate(p.eval_windows(job["eval_ids"]), logits)
    return {"perplexity": p.perplexity(total, count), "nll": total, "count": count, "eval_s": time.perf_counter() - t0}


if __name__ == "__main__":
    child_main({"speed": speed, "ppl": ppl})
