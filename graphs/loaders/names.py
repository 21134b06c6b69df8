"""Checkpoint tensor names -> our parameter names (see graphs/text.py, graphs/vision.py).

One table per source format. Norm weights: HF stores w (zero-centred, used as 1 + w); GGUF stores 1 + w
(llama.cpp's converter adds 1 to every `*norm.weight`, q/k norms included), so its loader subtracts 1.
"""

from __future__ import annotations

import re

# ---- Hugging Face -------------------------------------------------------------------------------------
# Layouts seen in the wild, normalised to one prefix each before matching:
#   Gemma3ForCausalLM:                    model.layers.0..., model.embed_tokens, model.norm
#   Gemma3ForConditionalGeneration (old): language_model.model.*, vision_tower.*, multi_modal_projector.*
#   Gemma3ForConditionalGeneration (new): model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*
_HF_PREFIXES = (
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),  # transformers 5 writes the tower without `vision_model.`
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.", "text."),
)

_HF_TEXT = {
    "embed_tokens.weight": "embed_tokens.weight",
    "norm.weight": "final_norm.weight",
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_ffw_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}

_HF_VISION = {
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "embeddings.patch_embedding.bias": "patch_embed.bias",
    "embeddings.position_embedding.weight": "pos_embed.weight",
    "post_layernorm.weight": "post_ln.weight",
    "post_layernorm.bias": "post_ln.bias",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}

_HF_PROJECTOR = {
    "mm_input_projection_weight": "proj",
    "mm_soft_emb_norm.weight": "norm.weight",
}

# Tied to the embedding in every Gemma 3; some exports store a copy anyway.
HF_IGNORED = ("lm_head.weight",)

_LAYER = re.compile(r"^(?:layers|encoder\.layers)\.(\d+)\.(.+)$")


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for an HF tensor name, or None when the name is not a Gemma 3 weight."""
    for prefix, ours in _HF_PREFIXES:
        if name.startswith(prefix):
            rest, part = name[len(prefix):], ours
            break
    else:
        return None
    if part == "projector.":
        return part + _HF_PROJECTOR[rest] if rest in _HF_PROJECTOR else None
    table = _HF_TEXT if part == "text." else _HF_VISION
    layer = _LAYER.match(rest)
    if layer is None:
        return part + table[rest] if rest in table else None
    index, tail = layer.groups()
    if part == "text.":
        mapped = table.get(tail)
    else:  # vision: "layer_norm1.weight" -> "ln1.weight"
        module, _, leaf = tail.rpartition(".")
        mapped = f"{table[module]}.{leaf}" if module in table else None
    return f"{part}layers.{index}.{mapped}" if mapped else None



# What transformers' `save_pretrained` writes (checked against a real save by tests/test_make_checkpoint.py):
# the legacy prefixes, not the in-memory `model.language_model.*` names, and the tower without `vision_model.`.
_HF_SAVE_PREFIX = {"vision.": "vision_tower.", "projector.": "multi_modal_projector."}
_OURS_TEXT = {v: k for k, v in _HF_TEXT.items()}
_OURS_VISION = {v: k for k, v in _HF_VISION.items()}
_OURS_PROJECTOR = {v: k for k, v in _HF_PROJECTOR.items()}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def ours_to_hf(name: str, multimodal: bool) -> str:
    """The HF tensor name transformers saves for one of our parameter names (inverse of `hf_to_ours`).

    Text weights go under `language_model.model.` in a multimodal checkpoint (Gemma3ForConditionalGeneration)
    and under `model.` in a text-only one (Gemma3ForCausalLM). Raises KeyError for a name that is not ours.
    """
    part, _, rest = name.partition(".")
    part += "."
    if part == "projector.":
        return _HF_SAVE_PREFIX[part] + _OURS_PROJECTOR[rest]
    if part == "text.":
        prefix, table, layers = ("language_model.model." if multimodal else "model."), _OURS_TEXT, "layers"
    elif part == "vision.":
        prefix, table, layers = _HF_SAVE_PREFIX[part], _OURS_VISION, "encoder.layers"
    else:
        raise KeyError(name)
    layer = _OURS_LAYER.match(rest)
    if layer is None:
        return prefix + table[rest]
    index, tail = layer.groups()
    if part == "text.":
        return f"{prefix}{layers}.{index}.{table[tail]}"
    module, _, leaf = tail.rpartition(".")  # vision: "ln1.weight" -> "layer_norm1.weight"
    return f"{prefix}{layers}.{index}.{table[module]}.{leaf}"

# ---- GGUF (llama.cpp, text decoder only; the vision tower ships as a separate mmproj file) ---------------
_GGUF_LAYER = {
    "attn_norm": "input_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_ffw_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_ffw_norm",
}
_GGUF_GLOBAL = {"token_embd.weight": "text.embed_tokens.weight", "output_norm.weight": "text.final_norm.weight"}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def gguf_to_ours(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    block = _GGUF_BLOCK.match(name)
    if block and block.group(2) in _GGUF_LAYER:
        return f"text.layers.{block.group(1)}.{_GGUF_LAYER[block.group(2)]}.weight"
    return None


def is_norm(our_name: str) -> bool:
    """Gemma RMSNorm weights (stored as w, applied as 1 + w). LayerNorms in the vision tower are not."""
    return our_name.endswith("norm.weight")  # the tower's LayerNorms are named ln1 / ln2 / post_ln
