"""Activation statistics for 4-bit quantization: the mean square of every projection's input, per channel,
and the Gram matrix of the lm_head's input (for the tied table's error feedback, `error_feedback.py`).

A 4-bit block shares one scale and zero point among 32 input channels. When a few channels carry most of the
input energy (Gemma 3's final norm has channels at 1000x the median), their weights' rounding errors dominate
the output error, and the range search in `quantize.py` should spend its precision there. This module measures
that energy on a short calibration text.

The text is docstrings of Python standard-library modules: present on every machine and disjoint from the
perplexity text (`pydoc_data.topics`, the language reference), so calibration never sees what is scored.

The model runs one layer at a time, each layer's weights loaded from the checkpoint and dropped after it ran:
memory stays near one layer plus the activations, whatever the model size (as the weight streaming does).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gemma3.graphs.config import Gemma3Config
from gemma3.graphs.loaders.checkpoint import Checkpoint
from gemma3.graphs.model import Gemma3
from gemma3.graphs.rope import RotaryTables

from .progress import Progress
from .recipes import EMBED

CALIBRATION_MODULES = (
    "os", "re", "json", "collections", "argparse", "subprocess", "typing", "asyncio",
    "logging", "unittest", "pathlib", "datetime", "itertools", "functools", "socket", "threading",
)
CALIBRATION_TOKENS = 4096  # of the ~5K the text has; the table's error feedback gains 0.07 perplexity over 1024
FINAL_NORM = "text.final_norm"  # its output is the lm_head's input: keyed under the tied table's name


def calibration_text() -> str:
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in CALIBRATION_MODULES)


def calibration_ids(encode, bos_id: int, count: int = CALIBRATION_TOKENS) -> list[int]:
    """`[bos] + encode(text)` cut to `count` ids; `encode` adds no special tokens."""
    return [bos_id, *encode(calibration_text())][:count]


def _load(module: nn.Module, checkpoint: Checkpoint, prefix: str) -> None:
    state = {name: checkpoint.tensor(prefix + name).float() for name, _ in module.named_parameters()}
    module.load_state_dict(state, strict=True, assign=True)


@dataclass
class InputStatistics:
    importance: dict[str, np.ndarray]  # weight name -> mean over tokens of input^2 per input channel [K]
    gram: dict[str, np.ndarray]  # weight name -> mean over tokens of x x^T [K, K] (the weights `gram_for` names)
    absmax: dict[str, float]  # weight name -> largest |input| over every token and channel (fp8 activation scales)
    # per layer: bounds on |key| after QK-norm and RoPE, and |value| (fp8 KV-cache scales)
    kv_absmax: list[tuple[float, float]] = field(default_factory=list)


def input_statistics(
    checkpoint: Checkpoint, ids: Sequence[int], gram_for: Callable[[str], bool] = lambda name: name == EMBED
) -> InputStatistics:
    """The importance of every nn.Linear of the text decoder and of the tied table (the lm_head's input, the
    final norm's output), and the Gram matrix of the weights `gram_for` accepts (by default the table only:
    a Gram is K x K floats, e.g. 16 MiB for the 270M's down_proj). Text only, fp32, one sequence."""
    config: Gemma3Config = checkpoint.config
    with torch.device("meta"):
        text = Gemma3(config).text
    text.rope = RotaryTables(config)
    importance: dict[str, np.ndarray] = {}
    gram: dict[str, np.ndarray] = {}
    absmax: dict[str, float] = {}
    kv_absmax: list[tuple[float, float]] = []

    def record(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            importance[name] = x.square().mean(0).float().numpy()
            absmax[name] = float(x.abs().max())
            if gram_for(name):
                gram[name] = (x.T @ x / len(x)).float().numpy()  # accumulated in float64, kept in float32

        return hook

    input_ids = torch.tensor([list(ids)], dtype=torch.int64)
    with torch.no_grad():
        _load(text.embed_tokens, checkpoint, "text.embed_tokens.")
        x = text.embed(input_ids)
        text.embed_tokens.to("meta")  # 63% of the 270m: not kept while the layers run
        positions = torch.arange(len(ids), dtype=torch.int64)
        tables = {kind: text.rope(positions, kind, torch.float32) for kind in text.rope.layer_types}
        groups = torch.full_like(input_ids, -1)
        past = torch.zeros((), dtype=torch.int64)
        progress = Progress("calibrating", len(text.layers), unit="layers")
        for i, layer in enumerate(text.layers):
            prefix = f"text.layers.{i}."
            _load(layer, checkpoint, prefix)
            handles = [module.register_forward_pre_hook(record(f"{prefix}{name}.weight"))
                       for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
            kv: dict[str, float] = {}

            def keys(_module, _inputs, out, kv=kv):
                kv["k"] = _rotated_bound(out)

            def values(_module, _inputs, out, kv=kv):
                kv["v"] = float(out.abs().max())

            handles += [layer.attn.k_norm.register_forward_hook(keys), layer.attn.v_proj.register_forward_hook(values)]
            rows = config.window(i) or len(ids)
            cache = tuple(torch.zeros(1, config.num_kv_heads, rows, config.head_dim) for _ in range(2))
            x, _ = layer(x, tables[layer.attn.kind], past, groups, cache)
            for handle in handles:
                handle.remove()
            kv_absmax.append((kv["k"], kv["v"]))
            layer.to("meta")
            progress.update(1)
        progress.close()
        _load(text.final_norm, checkpoint, FINAL_NORM + ".")
        head_input = text.final_norm(x)[0].double()
        importance[EMBED] = head_input.square().mean(0).float().numpy()
        absmax[EMBED] = float(head_input.abs().max())
        if gram_for(EMBED):
            gram[EMBED] = (head_input.T @ head_input / len(ids)).float().numpy()
    return InputStatistics(importance, gram, absmax, kv_absmax)


def _rotated_bound(keys: torch.Tensor) -> float:
    """keys (B, S, KVH, D) after QK-norm, before RoPE -> a bound on |element| after RoPE at any position: RoPE
    rotates the pairs (i, i + D/2) (rotate_half), so no element exceeds its pair's norm."""
    half = keys.shape[-1] // 2
    return float(torch.sqrt(keys[..., :half].float().square() + keys[..., half:].float().square()).max())
