"""Gemma 3 configuration: one dataclass for the text decoder, one for the SigLIP tower, presets by name.

Sources: the Gemma 3 technical report (arXiv 2503.19786, Table 1), transformers' `Gemma3TextConfig` /
`SiglipVisionConfig` defaults (which sparse checkpoint config.json files rely on), llama.cpp's GGUF keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

LOCAL, GLOBAL = "local", "global"  # layer types; every per-type table (RoPE, window) is keyed by these


@dataclass(frozen=True)
class RopeConfig:
    base: float  # theta: 1e6 on global layers, 1e4 on local layers
    linear_factor: float = 1.0  # positions divided by this (report: x8 on global layers of 4b/12b/27b)


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP so400m as used by Gemma 3 (transformers' `SiglipVisionConfig` field names in comments)."""

    image_size: int = 896  # image_size: pixels per side after resizing
    patch_size: int = 14  # patch_size: conv stride, 896 / 14 = 64 patches per side
    hidden_size: int = 1152  # hidden_size
    intermediate_size: int = 4304  # intermediate_size: MLP width
    num_layers: int = 27  # num_hidden_layers
    num_heads: int = 16  # num_attention_heads: head_dim 72
    layer_norm_eps: float = 1e-6  # layer_norm_eps (also the projector RMSNorm's eps)
    mm_tokens_per_image: int = 256  # soft tokens after the 4x4 average pool (Gemma3Config.mm_tokens_per_image)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return int(round(self.mm_tokens_per_image**0.5))

    @property
    def pool_kernel(self) -> int:
        return self.patches_per_side // self.tokens_per_side


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int  # embedding rows: 262144 text-only, 262144 + 64 for multimodal checkpoints
    hidden_size: int  # residual width
    intermediate_size: int  # MLP width (gate/up output)
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA)
    head_dim: int  # per-head width; not hidden / heads (270m: 640 / 4 != 256)
    query_pre_attn_scalar: float  # scores scaled by this ** -0.5 (27b: 168 = hidden / heads, others head_dim)
    sliding_window: int  # W: a local query at p sees keys p - W < j <= p
    max_position_embeddings: int  # longest context the checkpoint supports
    rope: dict[str, RopeConfig]  # per layer type (LOCAL / GLOBAL)
    layer_types: tuple[str, ...] = ()  # derived in __post_init__: global when (i + 1) % 6 == 0
    rms_norm_eps: float = 1e-6  # every RMSNorm, QK-norm included
    vision: VisionConfig | None = None  # SigLIP tower for 4b / 12b / 27b; None for text-only models
    image_token_id: int | None = None  # <image_soft_token> (262144) when the model sees images
    boi_token_id: int = 255999  # <start_of_image>
    eoi_token_id: int = 256000  # <end_of_image>
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    name: str = "custom"  # preset name or where the config came from

    def __post_init__(self) -> None:
        for field in _POSITIVE:  # zero or negative sizes would fail later as a division or an empty graph
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if not self.layer_types:
            types = tuple(GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types)
        if set(self.layer_types) - {LOCAL, GLOBAL}:
            raise ValueError(f"layer_types holds {sorted(set(self.layer_types) - {LOCAL, GLOBAL})}; "
                             f"expected {LOCAL!r} / {GLOBAL!r}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if set(self.rope) != {LOCAL, GLOBAL}:
            raise ValueError(f"rope needs entries for {LOCAL!r} and {GLOBAL!r}, got {sorted(self.rope)}")

    @property
    def multimodal(self) -> bool:
        return self.vision is not None

    def window(self, layer: int) -> int:
        """Attention window of a layer: W for local layers, 0 (unbounded) for global layers."""
        return self.sliding_window if self.layer_types[layer] == LOCAL else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gemma3Config:
        d = dict(d)
        d["rope"] = {k: RopeConfig(**v) for k, v in d["rope"].items()}
        d["layer_types"] = tuple(d.get("layer_types", ()))
        if d.get("vision") is not None:
            d["vision"] = VisionConfig(**d["vision"])
        return cls(**d)

    def replace(self, **changes: Any) -> Gemma3Config:
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)


_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "sliding_window", "max_position_embeddings")


# ---------------------------------------------------------------------------------------------------------
# Presets: the report's table (see ../shared/docs/gemma3-reference.md).

_TEXT_ROPE = {LOCAL: RopeConfig(10_000.0), GLOBAL: RopeConfig(1_000_000.0)}
_MM_ROPE = {LOCAL: RopeConfig(10_000.0), GLOBAL: RopeConfig(1_000_000.0, linear_factor=8.0)}
_MM_VOCAB = 262_144 + 64  # multimodal checkpoints carry 64 extra rows; row 262144 is <image_soft_token>


def _preset(name, hidden, ffn, layers, heads, kv, head_dim, scalar, window, ctx, multimodal) -> Gemma3Config:
    return Gemma3Config(
        name=name, vocab_size=_MM_VOCAB if multimodal else 262_144, hidden_size=hidden, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, query_pre_attn_scalar=scalar,
        sliding_window=window, max_position_embeddings=ctx, rope=_MM_ROPE if multimodal else _TEXT_ROPE,
        vision=VisionConfig() if multimodal else None, image_token_id=262_144 if multimodal else None,
    )


PRESETS: dict[str, Gemma3Config] = {
    "270m": _preset("270m", 640, 2048, 18, 4, 1, 256, 256, 512, 32_768, False),
    "1b": _preset("1b", 1152, 6912, 26, 4, 1, 256, 256, 512, 32_768, False),
    "4b": _preset("4b", 2560, 10240, 34, 8, 4, 256, 256, 1024, 131_072, True),
    "12b": _preset("12b", 3840, 15360, 48, 16, 8, 256, 256, 1024, 131_072, True),
    "27b": _preset("27b", 5376, 21504, 62, 32, 16, 128, 168, 1024, 131_072, True),
}


def preset(name: str) -> Gemma3Config:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown Gemma 3 size {name!r}; choose one of {', '.join(PRESETS)}") from None


def matching_preset(config: Gemma3Config) -> str | None:
    """The preset whose text shape this config has (hidden, layers, heads), if any."""
    for name, p in PRESETS.items():
        if (p.hidden_size, p.num_layers, p.num_heads) == (config.hidden_size, config.num_layers, config.num_heads):
            return name
    return None


# ---------------------------------------------------------------------------------------------------------
# Parameter counts (checked against the report's Table 1 in the tests).

@dataclass(frozen=True)
class ParamCount:
    embedding: int
    non_embedding: int
    vision: int  # SigLIP tower (the report's "vision encoder" column)
    projector: int  # pooled-token RMSNorm + projection matrix into the text width

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding + self.vision + self.projector


def param_count(c: Gemma3Config) -> ParamCount:
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = d * q + 2 * d * kv + q * d + 2 * c.head_dim  # q, k, v, o projections + QK-norm weights
    layer = attn + 3 * d * c.intermediate_size + 4 * d  # + gate/up/down + four RMSNorms
    vision = projector = 0
    if c.vision is not None:
        v = c.vision
        h = v.hidden_size
        vlayer = 4 * (h * h + h) + 2 * h * v.intermediate_size + v.intermediate_size + h + 4 * h
        patches = v.patches_per_side**2
        embed = 3 * v.patch_size**2 * h + h + patches * h
        vision = embed + v.num_layers * vlayer + 2 * h  # + post-LayerNorm
        projector = h + h * d
    return ParamCount(c.vocab_size * d, c.num_layers * layer + d, vision, projector)


# ---------------------------------------------------------------------------------------------------------
# From a Hugging Face config.json (transformers v4 and v5 field names, text-only and multimodal layouts).

# transformers' class defaults, which sparse checkpoint configs (e.g. gemma-3-4b-it's text_config) rely on.
_HF_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "hidden_activation": "gelu_pytorch_tanh",
}
_HF_VISION_DEFAULTS = {
    "image_size": 224, "patch_size": 16, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "layer_norm_eps": 1e-6,
}
_HF_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}


def _rope_from_hf(t: dict[str, Any]) -> dict[str, RopeConfig]:
    def one(params: dict[str, Any] | None, default_base: float, where: str) -> RopeConfig:
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"config.json: {where} must be a JSON object, got {params!r}")
        params = params or {}
        kind = params.get("rope_type", params.get("type", "default"))
        base = _as(float, {"rope_theta": default_base, **params}, "rope_theta", f"{where}.")
        if kind == "default":
            return RopeConfig(base)
        if kind == "linear":
            return RopeConfig(base, _as(float, params, "factor", f"{where}."))
        raise ValueError(f"config.json: {where} rope_type {kind!r} is not supported (Gemma 3 uses default/linear)")

    per_type = t.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if t.get(key) is not None and not isinstance(t[key], dict):
            raise ValueError(f"config.json: {key} must be a JSON object, got {t[key]!r}")
    if isinstance(per_type, dict) and "full_attention" in per_type:  # transformers v5
        return {
            GLOBAL: one(per_type.get("full_attention"), _HF_TEXT_DEFAULTS["rope_theta"], "full_attention"),
            LOCAL: one(per_type.get("sliding_attention"), _HF_TEXT_DEFAULTS["rope_local_base_freq"],
                       "sliding_attention"),
        }
    # transformers v4: rope_theta + rope_scaling for global layers, rope_local_base_freq (never scaled) for local
    scaling = dict(t.get("rope_scaling") or per_type or {})
    scaling.setdefault("rope_theta", t.get("rope_theta", _HF_TEXT_DEFAULTS["rope_theta"]))
    return {
        GLOBAL: one(scaling, _HF_TEXT_DEFAULTS["rope_theta"], "rope_scaling"),
        LOCAL: RopeConfig(_as(float, t, "rope_local_base_freq")),  # t has the default
    }


def _as(kind: type, d: dict[str, Any], key: str, where: str = "") -> Any:
    """d[key] as int / float, or a ValueError naming the field (int("abc") alone would not say which)."""
    value = d[key]
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            result = kind(value)
        except ValueError:
            result = None
        if result is not None and (kind is not int or result >= 1):  # every integer here is a size or a count
            return result
    expected = "a positive integer" if kind is int else "a number"
    raise ValueError(f"config.json: {where}{key} is {value!r}, expected {expected}")


def from_hf_dict(raw: dict[str, Any], name: str = "hf") -> Gemma3Config:
    """Build a config from the contents of a Hugging Face `config.json`."""
    multimodal = "text_config" in raw or "vision_config" in raw
    for key in ("text_config", "vision_config"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"config.json: {key} must be a JSON object, got {type(raw[key]).__name__}")
    t = {**_HF_TEXT_DEFAULTS, **(raw.get("text_config") or {})} if multimodal else {**_HF_TEXT_DEFAULTS, **raw}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if t.get(key) is not None:
            raise ValueError(f"config.json: {key}={t[key]} is not Gemma 3 (it has no soft-capping)")
    if t.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention (EmbeddingGemma) is not supported")
    if t.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"config.json: hidden_activation {t['hidden_activation']!r} is not Gemma 3's gelu_tanh")
    layers = _as(int, t, "num_hidden_layers")
    layer_types: tuple[str, ...] = ()
    if t.get("layer_types"):
        if not isinstance(t["layer_types"], list):
            raise ValueError(f"config.json: layer_types must be a list, got {t['layer_types']!r}")
        for i, x in enumerate(t["layer_types"]):
            if x not in _HF_LAYER_TYPES:
                raise ValueError(f"config.json: layer_types[{i}] is {x!r}; Gemma 3 layers are "
                                 f"{' or '.join(map(repr, _HF_LAYER_TYPES))}")
        layer_types = tuple(_HF_LAYER_TYPES[x] for x in t["layer_types"])
    elif t.get("sliding_window_pattern"):
        pattern = _as(int, t, "sliding_window_pattern")
        layer_types = tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(layers))
    vision = None
    if multimodal:
        v = {**_HF_VISION_DEFAULTS, **(raw.get("vision_config") or {})}
        if v.get("vision_use_head"):
            raise ValueError("config.json: vision_config.vision_use_head is set; Gemma 3's tower has no head")
        def field(key: str, kind: type = int) -> Any:
            return _as(kind, v, key, "vision_config.")

        vision = VisionConfig(
            image_size=field("image_size"), patch_size=field("patch_size"), hidden_size=field("hidden_size"),
            intermediate_size=field("intermediate_size"), num_layers=field("num_hidden_layers"),
            num_heads=field("num_attention_heads"), layer_norm_eps=field("layer_norm_eps", float),
            mm_tokens_per_image=_as(int, {"mm_tokens_per_image": 256, **raw}, "mm_tokens_per_image"),
        )
    return Gemma3Config(
        name=name, vocab_size=_as(int, t, "vocab_size"), hidden_size=_as(int, t, "hidden_size"),
        intermediate_size=_as(int, t, "intermediate_size"), num_layers=layers,
        num_heads=_as(int, t, "num_attention_heads"), num_kv_heads=_as(int, t, "num_key_value_heads"),
        head_dim=_as(int, t, "head_dim"), query_pre_attn_scalar=_as(float, t, "query_pre_attn_scalar"),
        sliding_window=_as(int, t, "sliding_window"),
        max_position_embeddings=_as(int, t, "max_position_embeddings"),
        rope=_rope_from_hf(t), layer_types=layer_types, rms_norm_eps=_as(float, t, "rms_norm_eps"), vision=vision,
        image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 262_144))) if multimodal else None,
        boi_token_id=int(raw.get("boi_token_index", 255_999)), eoi_token_id=int(raw.get("eoi_token_index", 256_000)),
    )


def from_hf_config(path: str | os.PathLike) -> Gemma3Config:
    """Read a checkpoint folder's (or a file's) `config.json`."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not readable as JSON ({e}); restore it from the checkpoint's source") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: the top level must be a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    known = {"Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "Gemma3TextModel", "Gemma3Model"}
    if not isinstance(archs, list) or (archs and not set(map(str, archs)) & known):
        raise ValueError(f"{file}: architectures {archs} is not a Gemma 3 model")
    try:
        return from_hf_dict(raw, name=os.path.basename(os.path.dirname(file)) or "hf")
    except ValueError as e:  # our messages say "config.json: ..."; name the real file instead
        raise ValueError(f"{file}: {str(e).removeprefix('config.json: ')}") from None
    except (TypeError, KeyError, AttributeError) as e:  # a field of the wrong JSON type (a list for a number, ...)
        raise ValueError(f"{file}: a field has the wrong type ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------
# From GGUF metadata (llama.cpp's converter: keys `gemma3.*`).

def from_gguf_metadata(meta: dict[str, Any], vocab_rows: int, name: str = "gguf") -> Gemma3Config:
    """`meta` maps GGUF keys to plain values; `vocab_rows` is token_embd's row count."""
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"GGUF general.architecture is {arch!r}, expected 'gemma3'")

    def get(key: str, kind: type = int, default: Any = None) -> Any:
        full = f"gemma3.{key}"
        if full not in meta:
            if default is None:
                raise ValueError(f"GGUF metadata lacks {full}")
            return kind(default)
        value = meta[full]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return kind(value)
        raise ValueError(f"GGUF metadata {full} is {str(value)[:40]!r}, expected a number")

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    layers = get("block_count")
    head_dim = get("attention.key_length", int, hidden // heads if heads > 0 else 0)
    rope_global = RopeConfig(get("rope.freq_base", float, 1_000_000.0))
    scaling = meta.get("gemma3.rope.scaling.type")
    if scaling == "linear":
        rope_global = RopeConfig(rope_global.base, get("rope.scaling.factor", float))
    elif scaling not in (None, "none"):
        raise ValueError(f"GGUF gemma3.rope.scaling.type {scaling!r} is not supported")
    partial = Gemma3Config(
        name=name, vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_layers=layers, num_heads=heads, num_kv_heads=get("attention.head_count_kv", int, heads),
        head_dim=head_dim, query_pre_attn_scalar=float(head_dim),
        sliding_window=get("attention.sliding_window"), max_position_embeddings=get("context_length"),
        rope={LOCAL: RopeConfig(get("rope.freq_base_swa", float, 10_000.0)), GLOBAL: rope_global},
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-6),
    )
    # GGUF does not store query_pre_attn_scalar; llama.cpp hard-codes it per model size (27b: hidden / heads).
    known = matching_preset(partial)
    if known:
        partial = partial.replace(query_pre_attn_scalar=PRESETS[known].query_pre_attn_scalar)
    return partial


def tiny(**overrides: Any) -> Gemma3Config:
    """A small random-weight config for tests: both layer types, GQA, head_dim != hidden / heads."""
    base = dict(
        name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=7, num_heads=4,
        num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=8, max_position_embeddings=256,
        rope={LOCAL: RopeConfig(10_000.0), GLOBAL: RopeConfig(1_000_000.0, 8.0)},
    )
    base.update(overrides)
    return Gemma3Config(**base)

