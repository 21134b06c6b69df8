"""Speculative decoding: acceptance and speed, plain greedy vs speculative in interleaved rounds.

    python -m bench.speculative --model out/270m-int8-head4-fast [--rounds 5] [--new-tokens 128]
    python -m bench.speculative --target out/1b-random --draft out/270m-random   # verify-step costs, computed speed

--model: prompt lookup on a prompt that repeats a passage and on a plain one; each round runs plain greedy and
speculative back to back (order reversed every other round) on the same model in this process, so the machine's
drift cancels in the per-round ratio; the tokens of both are compared every round. Also a sweep of the draft
length k on the repeating prompt.
--target/--draft: random weights accept ~nothing, so besides the measured acceptance this measures the target's
verify step for S = 1..9 tokens and the draft's single-token step, and computes tok/s for a per-token acceptance
probability a with k drafts: E[tokens per step] = (1 - a^(k+1)) / (1 - a), time per step = k draft steps + one
verify step of k + 1 tokens. These speeds are computed from measured costs, not measured end to end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a cloth. "
    "He trimmed the wick, polished the great lens until it shone, and wound the clockwork that turned the light. "
    "Ships passing the headland at night saw its beam sweep across the water every twelve seconds, and they knew "
    "to keep well clear of the rocks below. In winter storms the keeper stayed awake until morning, watching the "
    "light and listening to the waves break against the tower."
)
PROMPTS = {  # name -> (prompt, raw: no chat template)
    "repeating": (f"Copy this passage exactly, word for word:\n\n{PASSAGE}", False),
    # the 270M is a base model: through the chat template this one loops ("buy\nbuy\n..."), which lookup drafts
    "plain": ("Write a short story about a robot who learns to paint.", False),
    "prose": ("The printing press changed Europe in several ways. First,", True),  # raw continuation
}


def _first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _rounds(model, prompt: tuple[str, bool], new_tokens: int, rounds: int, k: int) -> dict:
    rows = []
    for i in range(rounds):
        runs = {}
        for name in (("plain", "lookup") if i % 2 == 0 else ("lookup", "plain")):
            spec = None if name == "plain" else "lookup"
            runs[name] = model.generate(prompt[0], raw=prompt[1], temperature=0, max_new_tokens=new_tokens,
                                        speculative=spec, draft_tokens=k if spec else None)
        plain, fast = runs["plain"], runs["lookup"]
        rows.append({
            "plain_tok_s": plain.stats.decode_tokens_per_s, "spec_tok_s": fast.stats.decode_tokens_per_s,
            "ratio": fast.stats.decode_tokens_per_s / plain.stats.decode_tokens_per_s,
            "same_tokens": fast.token_ids == plain.token_ids,
            "first_diff": _first_diff(fast.token_ids, plain.token_ids), "acceptance": fast.stats.acceptance_rate,
            "tokens_per_step": fast.stats.tokens_per_step, "generated": fast.stats.generated_tokens,
        })
        r = rows[-1]
        print(f"  round {i + 1}: plain {r['plain_tok_s']:.1f} tok/s, lookup {r['spec_tok_s']:.1f} tok/s, ratio "
              f"{r['ratio']:.3f}, acceptance {r['acceptance']:.3f}, {r['tokens_per_step']:.2f} tokens/step, "
              f"same tokens: {r['same_tokens']} (first difference: {r['first_diff']})", flush=True)
    ratios = [r["ratio"] for r in rows]
    return {"k": k, "rounds": rows, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
            "max_ratio": max(ratios), "all_same_tokens": all(r["same_tokens"] for r in rows)}


def lookup_bench(model_dir: str, rounds: int, new_tokens: int, ks: list[int], threads: int | None) -> dict:
    from gemma3.runtime.api import load
    from gemma3.runtime.speculative import DEFAULT_DRAFT_TOKENS

    model = load(model_dir, threads=threads)
    out: dict = {"model": model_dir, "new_tokens": new_tokens}
    model.generate(PROMPTS["plain"][0], temperature=0, max_new_tokens=8)  # warm-up
    for name, prompt in PROMPTS.items():  # (text, raw)
        print(f"{name} prompt, k={DEFAULT_DRAFT_TOKENS}:", flush=True)
        out[name] = _rounds(model, prompt, new_tokens, rounds, DEFAULT_DRAFT_TOKENS)
        print(f"  median ratio {out[name]['median_ratio']:.3f} (min {out[name]['min_ratio']:.3f}, max "
              f"{out[name]['max_ratio']:.3f})", flush=True)
    out["k_sweep"] = {}
    for k in ks:  # --k "" skips the sweep
        print(f"repeating prompt, k={k}:", flush=True)
        out["k_sweep"][k] = _rounds(model, PROMPTS["repeating"], new_tokens, max(2, rounds // 2), k)
    return out


def _step_cost(decoder, cache, tokens: int, repeats: int) -> float:
    """Median seconds of one step of `tokens` tokens returning all their logits, at a fixed position."""
    times = []
    for _ in range(repeats):
        start_len = cache.length
        t = time.perf_counter()
        decoder.step(cache, list(range(1000, 1000 + tokens)), logits=tokens)
        times.append(time.perf_counter() - t)
        cache.length = start_len  # timing only: the same position every time, whatever the rows hold
    return statistics.median(times)


def draft_bench(target_dir: str, draft_dir: str, threads: int | None, context: int, repeats: int) -> dict:
    from gemma3.runtime.api import load

    target = load(target_dir, threads=threads)
    prompt = "Summarise the plot of a famous novel in a few sentences."
    plain = target.generate(prompt, temperature=0, max_new_tokens=64)
    fast = target.generate(prompt, temperature=0, max_new_tokens=64, speculative=f"draft:{draft_dir}")
    measured = {"acceptance": fast.stats.acceptance_rate, "tokens_per_step": fast.stats.tokens_per_step,
                "same_tokens": fast.token_ids == plain.token_ids}
    print(f"random-weight draft, measured: acceptance {measured['acceptance']:.3f}, "
          f"{measured['tokens_per_step']:.2f} tokens/step, same tokens: {measured['same_tokens']}", flush=True)
    ids = list(range(3000, 3000 + context))
    costs = {}
    cache = target.decoder.new_cache(context + 16)
    target.decoder.prefill(cache, ids)
    for s in range(1, 10):
        costs[s] = _step_cost(target.decoder, cache, s, repeats)
    drafter = target.drafter(f"draft:{draft_dir}")[1]
    dcache = drafter.decoder.new_cache(context + 16)
    drafter.decoder.prefill(dcache, ids)
    draft_step = _step_cost(drafter.decoder, dcache, 1, repeats)
    print(f"verify step at position {context} (ms): "
          + ", ".join(f"S={s}: {1000 * c:.1f}" for s, c in costs.items())
          + f"; draft step {1000 * draft_step:.1f} ms", flush=True)
    computed = {}
    for a in (0.5, 0.7, 0.9):
        best = None
        for k in range(1, 9):
            expected = (1 - a ** (k + 1)) / (1 - a)
            tok_s = expected / (k * draft_step + costs[k + 1])
            if best is None or tok_s > best[1]:
                best = (k, tok_s)
        computed[a] = {"k": best[0], "tok_s": best[1], "plain_tok_s": 1 / costs[1], "speedup": best[1] * costs[1]}
        print(f"  computed at acceptance {a}: best k={best[0]}, {best[1]:.1f} tok/s vs plain {1 / costs[1]:.1f} "
              f"({best[1] * costs[1]:.2f}x)", flush=True)
    return {"target": target_dir, "draft": draft_dir, "measured": measured, "verify_ms": {s: 1000 * c for s, c in
            costs.items()}, "draft_step_ms": 1000 * draft_step, "computed": computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an export for the prompt-lookup rounds (e.g. the real 270M)")
    parser.add_argument("--target", help="a target export for the draft-model costs (e.g. a random-weight 1b)")
    parser.add_argument("--draft", help="its draft export (e.g. a random-weight 270m)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", default="2,3,6,8", help="draft lengths of the sweep (comma-separated; '' skips it)")
    parser.add_argument("--context", type=int, default=256, help="position of the timed verify steps")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    if not args.model and not (args.target and args.draft):
        parser.error("give --model, or --target and --draft")
    results = {}
    if args.model:
        results["lookup"] = lookup_bench(args.model, args.rounds, args.new_tokens,
                                         [int(k) for k in args.k.split(",") if k], args.threads)
    if args.target and args.draft:
        results["draft"] = draft_bench(args.target, args.draft, args.threads, args.context, args.repeats)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
