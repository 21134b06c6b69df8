"""The peers we compare against, each a function `(BenchInputs) -> dict` (see bench.common.result).

Every peer is measured in child processes (one for speed, one for perplexity) so that peak RSS is its own,
on the same prompt ids and the same eval ids. Speed-run peak RSS is what `peak_rss_mb` reports (load +
512-token prefill + 128 decode steps, what serving costs); the perplexity run's peak, which holds a
window's full [1025, 262144] logits, is kept separately as `ppl_peak_rss_mb`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import genai_build
from bench.common import PROMPT_TOKENS, Skip, cache_root, peers_python, result, run_child


@dataclass(frozen=True)
class BenchInputs:
    gguf: Path
    eval_ids: list[int]  # bos + 4096 targets (runtime/perplexity.py)
    prompt: list[int]  # the speed prompt: eval_ids[:PROMPT_TOKENS]

    def job(self, **extra: Any) -> dict[str, Any]:
        return {"gguf": str(self.gguf), "eval_ids": self.eval_ids, "prompt": self.prompt, **extra}


def load_inputs(gguf: Path) -> BenchInputs:
    """The eval ids by transformers' tokenizer of the same GGUF (the reference), cached per file version.

    Every peer is fed these ids, so a tokenizer difference cannot move a perplexity; peers with a tokenizer
    of their own report where it first disagrees (`own_tokenizer_first_mismatch`).
    """
    from gemma3.runtime.perplexity import eval_ids

    stat = gguf.stat()
    key = f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}"
    path = cache_root() / "bench" / "eval_ids.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if cached.get("key") != key:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ids = eval_ids(lambda text: tok.encode(text, add_special_tokens=False), bos_id=tok.bos_token_id)
        cached = {"key": key, "ids": ids}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached))
    ids = cached["ids"]
    return BenchInputs(gguf=gguf, eval_ids=ids, prompt=ids[:PROMPT_TOKENS])


def merge(name: str, speed: dict[str, Any], ppl: dict[str, Any], notes: str, **extra: Any) -> dict[str, Any]:
    """One table row from a speed child's and a perplexity child's outputs (every entry reports the same fields)."""
    return result(
        name,
        prefill_tok_s=round(speed["prefill_tok_s"], 1),
        decode_tok_s=round(speed["decode_tok_s"], 1),
        peak_rss_mb=round(speed["peak_rss_mb"]),
        perplexity=round(ppl["perplexity"], 3),
        notes=notes,
        ppl_peak_rss_mb=round(ppl["peak_rss_mb"]),
        load_s=round(speed["load_s"], 1),
        prefill_s=[round(s, 3) for s in speed["prefill_s"]],
        decode_s=[round(s, 3) for s in speed["decode_s"]],
        ppl_eval_s=round(ppl["eval_s"], 1),
        own_tokenizer_first_mismatch=ppl.get("own_tokenizer_first_mismatch"),
        foreign_cpu_share=speed.get("foreign_cpu_share"),
        greedy_tokens=speed["greedy_tokens"],
        **extra,
    )


def transformers_fp32(inputs: BenchInputs) -> dict[str, Any]:
    """transformers 5 Gemma3ForCausalLM, eager attention, fp32 weights dequantized from the GGUF."""
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise Skip(f"{module} is not installed in {sys.executable}")
    import torch
    import transformers

    job = inputs.job()
    speed = run_child(sys.executable, "bench.peer_transformers", "speed", job)
    ppl = run_child(sys.executable, "bench.peer_transformers", "ppl", job)
    notes = (
        f"transformers {transformers.__version__}, torch {torch.__version__}, attn_implementation=eager, "
        "torch.set_num_threads(2), DynamicCache (sliding layers windowed); greedy = argmax of the last logits"
    )
    return merge("transformers eager fp32", speed, ppl, notes)


def llama_cpp(inputs: BenchInputs) -> dict[str, Any]:
    """llama-cpp-python (its own llama.cpp build, CPU) on the Q4_K_M GGUF as shipped."""
    python = peers_python()
    if not python.exists():
        raise Skip(f"no peers venv at {python.parent.parent} (python -m bench.setup_peers makes it)")
    probe = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise Skip(f"llama_cpp does not import in {python}: {last}")
    job = inputs.job()
    speed = run_child(python, "bench.peer_llamacpp", "speed", job)
    ppl = run_child(python, "bench.peer_llamacpp", "ppl", job)
    notes = (
        f"llama-cpp-python {probe.stdout.strip()} built from its sdist (CPU, GGML_NATIVE without AMX), n_threads=2, "
        "n_threads_batch=2, library defaults otherwise (f16 KV cache, flash_attn off); prompt in one "
        "n_batch=512 call; perplexity with logits_all=True, one eval() per window after reset()"
    )
    return merge("llama.cpp Q4_K_M", speed, ppl, notes)


def build_genai() -> tuple[Path, subprocess.CompletedProcess]:
    """genai's model folder, made by its builder if missing, in a child: it loads torch + transformers, which
    this process need not hold. Raises Skip when the build fails."""
    build = subprocess.run([sys.executable, "-m", "bench.genai_build"], capture_output=True, text=True)
    if build.returncode != 0:
        raise Skip("genai model build failed: " + " | ".join(build.stderr.strip().splitlines()[-3:]))
    return genai_build.genai_dir(), build


def genai_int4(inputs: BenchInputs) -> dict[str, Any]:
    """onnxruntime-genai, model built by its own builder: int4 RTN, block 32, symmetric, accuracy level 4."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None:
        raise Skip(f"onnxruntime-genai is not installed in {sys.executable} (python -m bench.setup_peers)")
    from importlib.metadata import version

    model_dir, build = build_genai()
    job = inputs.job(model_dir=str(model_dir))
    speed = run_child(sys.executable, "bench.peer_genai", "speed", job)
    ppl = run_child(sys.executable, "bench.peer_genai", "ppl", job)
    notes = (
        f"onnxruntime-genai {version('onnxruntime-genai')} on onnxruntime {version('onnxruntime')}; "
        f"{genai_build.FIXES}; session intra_op_num_threads=2; lm_head int4 too, embedding Gather fp32; "
        "perplexity from the decoder's raw 'logits' output (all positions) after append_tokens(window)"
    )
    return merge("onnxruntime-genai int4", speed, ppl, notes, build=json.loads(build.stdout.strip() or "{}"))
