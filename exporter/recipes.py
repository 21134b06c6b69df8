"""Recipes: for each (target, precision), how every weight is stored, decided once per weight.

A `Recipe` names a precision of one target (`--target ort --precision int8-head4-fast`, `--target tensorrt
--precision fp8`). Asked about one (possibly fused) weight, it returns that weight's `Scheme`: storage type, block,
symmetry, how its range is chosen, whether error feedback and activation quantization apply. Everything
downstream (graph rewriting in `weight_pass.py`, the quantizers in `quantizers.py`, calibration in `export.py`,
the manifest) reads the scheme and never re-derives it from the precision's name.

Measurements behind the ORT presets (real 270M, 2 threads, perplexity on transformers' ids; README table):
  - int8 keeps 8-bit blocks of 32: blocks of 128 cost 13.43 -> 13.53 for no speed; a GGUF Q8_0 tensor
    re-encodes exactly at 32.
  - int4-mixed's 8-bit projections at block 128: 95.9 instead of 77.6 tok/s for 14.69 instead of 14.65.
The TensorRT recipes use the formats TensorRT's ONNX parser accepts (../shared/docs/tensorrt-facts.md, 3.1-3.2):
symmetric only (no zero points), fp8 E4M3 with per-channel weight scales and per-tensor activation scales,
int4 weight-only with blockwise `DequantizeLinear` (opset 21).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

EMBED = "text.embed_tokens.weight"  # the tied embedding / lm_head table (63% of the 270m's parameters)
TABLE_DAMP = 0.3  # error feedback damping for the table: it is also the embedding (see error_feedback.py)
PROJECTION_DAMP = 0.01  # GPTQ's own default
TARGETS = ("ort", "tensorrt")
FLOAT_TYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Scheme:
    """How one weight is stored. Float storage has no block; quantized storage has one scale per block of
    `block` input channels (0: one scale per output channel)."""

    storage: str  # "float32" | "bfloat16" | "float16" | "int8" | "int4" | "float8e4m3fn"
    block: int = 0
    symmetric: bool = True  # no zero points (TensorRT accepts only these; 8-bit is always symmetric here)
    search: bool = False  # range searched for the least input-weighted squared error (else absmax / round to nearest)
    onnxruntime_quantizer: bool = False  # symmetric 4-bit through onnxruntime's own C++ quantizer (Q4_0-like)
    damp: float | None = None  # error feedback (GPTQ) with this damping, where the input's Gram was measured
    activations: str | None = None  # "float8e4m3fn": the matmul's input goes through per-tensor Q/DQ

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4, "float8e4m3fn": 8}.get(self.storage)

    @property
    def quantized(self) -> bool:
        return self.storage not in FLOAT_TYPES

    @property
    def calibrated(self) -> bool:
        """Needs activation statistics: an importance-weighted range search, error feedback, or activation scales."""
        return self.search or self.damp is not None or self.activations is not None


def _int(bits: int, block: int, symmetric: bool = True, searched: bool | None = None,
         damp: float | None = None) -> Scheme:
    searched = (not symmetric) if searched is None else searched
    return Scheme(f"int{bits}", block, symmetric, search=searched, damp=damp)


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str
    doc: str
    projections: Scheme  # q/k/v/o/gate/up/down (and the vision tower's linears when it follows the decoder)
    table: Scheme  # the tied embedding / lm_head table
    # (module name part, scheme): projections that differ, e.g. int4-mixed's 8-bit q/k/v and down
    overrides: tuple[tuple[str, Scheme], ...] = ()
    # blocks of 8-bit projections when K is not a multiple of their own block (no padded 8-bit blocks)
    fallback_block: int = 32
    compute_dtype: str = "float32"  # activations (the TensorRT engine's type; ORT graphs are float32)
    accuracy_level: int = 4  # ORT MatMulNBits: int8 activations, the fast CPU path
    refused: str = ""  # why this precision does not exist on this target (one line)
    kv_cache: str = ""  # "float8e4m3fn": fp8 KV caches (tensorrt, `--kv-cache fp8`); "": the compute dtype

    @property
    def cache_dtype(self) -> str:
        return self.kv_cache or self.compute_dtype

    def with_kv_cache(self, kind: str) -> Recipe:
        """`--kv-cache compute|fp8`: fp8 caches exist only in the TensorRT plugin's contract."""
        if kind == "compute":
            return self
        if kind != "fp8":
            raise ValueError(f"--kv-cache {kind}: choose compute or fp8")
        if self.target != "tensorrt":
            raise ValueError("--kv-cache fp8 needs --target tensorrt: ONNX Runtime's GroupQueryAttention keeps its "
                             "cache in the compute dtype")
        return replace(self, kv_cache="float8e4m3fn")

    def scheme(self, name: str, k: int) -> Scheme:
        """The scheme of one weight, e.g. `text.layers.3.attn.q_proj+k_proj+v_proj.weight` with input width k."""
        if name == EMBED:
            return self._table(k)
        scheme = next((s for part, s in self.overrides if part in name), self.projections)
        if scheme.storage == "int8" and k % scheme.block:
            scheme = replace(scheme, block=self.fallback_block)
        return scheme

    def _table(self, hidden: int) -> Scheme:
        """The table's block is halved until it divides the hidden size (a GatherBlockQuantized row has no
        padding); every real Gemma 3 width is a multiple of 128, so this only touches tiny test configs."""
        scheme = self.table
        block = scheme.block
        while block and hidden % block and block > 16:
            block //= 2
        return replace(scheme, block=block)

    @property
    def quantized(self) -> bool:
        return self.projections.quantized or self.table.quantized or any(s.quantized for _, s in self.overrides)

    def schemes(self) -> list[Scheme]:
        return [self.projections, self.table, *(s for _, s in self.overrides)]

    @property
    def calibrated(self) -> bool:
        return any(s.calibrated for s in self.schemes())

    def describe(self) -> str:
        """One line for the manifest."""
        parts = []
        kinds = {s.storage for s in self.schemes()}
        if "int8" in kinds:
            parts.append("8-bit: symmetric, absmax / 127, round to nearest, blockwise along K")
        if any(s.storage == "int4" and not s.symmetric for s in self.schemes()):
            parts.append("4-bit: asymmetric, per-block range searched for the least input-weighted squared error; "
                         "with error feedback (GPTQ) where the input's Gram matrix was measured")
        if any(s.storage == "int4" and s.symmetric and s.onnxruntime_quantizer for s in self.schemes()):
            parts.append("4-bit: symmetric, onnxruntime's quantizer")
        if any(s.storage == "int4" and s.symmetric and not s.onnxruntime_quantizer for s in self.schemes()):
            parts.append("4-bit: symmetric (no zero points), blockwise DequantizeLinear along K, per-block range "
                         "searched for the least input-weighted squared error, error feedback where measured")
        if "float8e4m3fn" in kinds:
            parts.append("fp8 E4M3: per-output-channel weight scales (absmax / 448); activations through "
                         "QuantizeLinear/DequantizeLinear with per-tensor scales calibrated as absmax / 448")
        floats = kinds & set(FLOAT_TYPES)
        if floats:
            parts.append(f"{'/'.join(sorted(floats))} where not quantized")
        return "; ".join(parts)


_F32 = Scheme("float32")
_BF16, _F16 = Scheme("bfloat16"), Scheme("float16")
_ASYM4 = dict(symmetric=False, damp=PROJECTION_DAMP)
_TABLE4 = dict(symmetric=False, damp=TABLE_DAMP)

ORT_RECIPES: tuple[Recipe, ...] = (
    Recipe("fp32", "ort", "float32 weights: the reference", _F32, _F32),
    Recipe("int8", "ort", "8-bit block-32 weights everywhere", _int(8, 32), _int(8, 32)),
    Recipe("int4", "ort", "4-bit block-32 projections with zero points, 8-bit tied embedding / lm_head",
           _int(4, 32, **_ASYM4), _int(8, 32)),
    Recipe("int4-mixed", "ort",
           "4-bit block-64 o/gate/up projections, 8-bit block-128 q/k/v and down projections, 4-bit "
           "block-64 tied table, every 4-bit weight with error feedback",
           _int(4, 64, **_ASYM4), _int(4, 64, **_TABLE4),
           overrides=(("q_proj", _int(8, 128)), ("down_proj", _int(8, 128))), fallback_block=64),
    Recipe("int8-head4", "ort",
           "8-bit block-128 projections, 4-bit block-64 tied embedding / lm_head with zero points "
           "(calibrated range search and error feedback)", _int(8, 128), _int(4, 64, **_TABLE4)),
    Recipe("int8-head4-fast", "ort",
           "as int8-head4 with 4-bit blocks of 128 in the tied table: fewer scale bytes per token",
           _int(8, 128), _int(4, 128, **_TABLE4)),
    Recipe("int4-full", "ort", "4-bit block-32 everywhere, embedding included (smallest)",
           _int(4, 32, **_ASYM4), _int(4, 32, **_TABLE4)),
)

_FP8 = Scheme("float8e4m3fn", 0, damp=PROJECTION_DAMP, activations="float8e4m3fn")
# Symmetric 4-bit blocks of 32, not TensorRT's customary 128: on the real 270M (bf16 table, error feedback, PyTorch
# on quantize-dequantized weights, fp32 13.41) block 128 measured 15.90, 64 15.32, 32 14.70 (budget 14.75).
_SYM4 = _int(4, 32, symmetric=True, searched=True, damp=PROJECTION_DAMP)

TENSORRT_RECIPES: tuple[Recipe, ...] = (
    Recipe("bf16", "tensorrt", "bfloat16 weights and activations: TensorRT's baseline", _BF16, _BF16,
           compute_dtype="bfloat16"),
    Recipe("fp16", "tensorrt", "float16 weights and activations (Gemma 3's activations can overflow fp16; "
           "prefer bf16)", _F16, _F16, compute_dtype="float16"),
    Recipe("fp32", "tensorrt", "float32 weights and activations: the exactness reference for this target",
           _F32, _F32),
    # The tied table stays bf16: fp8 there (lm_head W8A8) measured 13.63 -> 13.80 on the real 270M.
    Recipe("fp8", "tensorrt", "fp8 E4M3 weights (per-channel scales, error feedback) and activations (per-tensor "
           "calibrated scales) in every projection; bf16 tied embedding / lm_head and elsewhere (needs sm_89+)",
           _FP8, _BF16, compute_dtype="bfloat16"),
    Recipe("int4", "tensorrt", "4-bit symmetric block-32 weights (W4A16, blockwise DequantizeLinear) with "
           "error feedback; bf16 tied embedding / lm_head and activations", _SYM4, _BF16,
           compute_dtype="bfloat16"),
)

RECIPES: dict[str, dict[str, Recipe]] = {
    "ort": {r.name: r for r in ORT_RECIPES},
    "tensorrt": {r.name: r for r in TENSORRT_RECIPES},
}
DEFAULT_TARGET = {"fp8": "tensorrt", "bf16": "tensorrt", "fp16": "tensorrt"}  # precisions only TensorRT runs

_REFUSALS = {
    ("ort", "fp8"): "ONNX Runtime has no fp8 matmul kernel on CPU; use --target tensorrt (sm_89+ GPUs)",
    ("ort", "bf16"): "ONNX Runtime's CPU kernels have no bf16 matmuls; use --precision fp32 or int8 for --target ort",
    ("ort", "fp16"): "ONNX Runtime's CPU kernels run fp16 matmuls slower than fp32 and Gemma 3 overflows fp16; "
                     "use --precision fp32 or int8 for --target ort",
}


def precision_names() -> list[str]:
    """Every precision of any target, in a stable order (the CLI's choices)."""
    return list(dict.fromkeys([*RECIPES["ort"], *RECIPES["tensorrt"]]))


def recipe(name: str, target: str = "ort") -> Recipe:
    """The recipe of `name` on `target`, or a ValueError saying in one line why the pair does not exist."""
    if target not in RECIPES:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if name in RECIPES[target]:
        return RECIPES[target][name]
    if (target, name) in _REFUSALS:
        raise ValueError(f"--precision {name} --target {target}: {_REFUSALS[target, name]}")
    other = [t for t in TARGETS if name in RECIPES[t]]
    if other:
        raise ValueError(f"--precision {name} is not available for --target {target} (it is for --target "
                         f"{other[0]}); {target} offers {', '.join(RECIPES[target])}")
    raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(precision_names())}")
