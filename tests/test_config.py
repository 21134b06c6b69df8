"""Config presets, builders from HF config.json (v4 / v5 field names) and GGUF metadata, parameter counts."""

from __future__ import annotations

import pytest

from gemma3.graphs.config import GLOBAL, LOCAL, PRESETS, RopeConfig, from_hf_dict, param_count, preset

# The technical report's Table 1, in millions: embedding, non-embedding (vision encoder 417M for 4b+).
TABLE_1 = {"1b": (302, 698), "4b": (675, 3209), "12b": (1012, 10759), "27b": (1416, 25600)}


@pytest.mark.parametrize("size", list(TABLE_1))
def test_param_count_matches_report(size):
    counts = param_count(preset(size))
    embedding, non_embedding = TABLE_1[size]
    assert abs(counts.embedding / 1e6 - embedding) / embedding < 0.01
    assert abs(counts.non_embedding / 1e6 - non_embedding) / non_embedding < 0.01
    if size != "1b":
        assert abs(counts.vision / 1e6 - 417) / 417 < 0.01
    else:
        assert counts.vision == 0


def test_layer_types_and_windows():
    c = preset("27b")
    assert [i for i, t in enumerate(c.layer_types) if t == GLOBAL] == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    assert c.layer_types[-2:] == (LOCAL, LOCAL)  # 27b ends with two local layers
    assert c.window(0) == 1024 and c.window(5) == 0
    assert c.query_pre_attn_scalar == 168


def test_unknown_size_lists_valid_ones():
    with pytest.raises(ValueError, match="270m, 1b, 4b, 12b, 27b"):
        preset("7b")


# gemma-3-4b-it's config.json is sparse: text_config relies on transformers' defaults for heads, vocab, etc.
HF_4B_V4 = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
    },
    "vision_config": {
        "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
    },
}

HF_4B_V5 = {
    **HF_4B_V4,
    "text_config": {
        **{k: v for k, v in HF_4B_V4["text_config"].items() if k != "rope_scaling"},
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)],
    },
}

FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "query_pre_attn_scalar", "sliding_window", "max_position_embeddings", "rope", "layer_types", "vision",
          "image_token_id")


@pytest.mark.parametrize("raw", [HF_4B_V4, HF_4B_V5], ids=["transformers-v4", "transformers-v5"])
def test_hf_multimodal_config_equals_preset(raw):
    ours, expected = from_hf_dict(raw), preset("4b")
    for field in FIELDS:
        assert getattr(ours, field) == getattr(expected, field), field


def test_hf_text_only_config_v4_fields():
    raw = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": None, "sliding_window_pattern": 6,
    }
    ours, expected = from_hf_dict(raw), preset("270m")
    for field in FIELDS:
        assert getattr(ours, field) == getattr(expected, field), field
    assert ours.rope[LOCAL] == RopeConfig(10_000.0)  # the local base is never scaled


def test_hf_config_errors_name_the_field():
    bad = {**HF_4B_V4, "text_config": {**HF_4B_V4["text_config"], "final_logit_softcapping": 30.0}}
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        from_hf_dict(bad)
    bad = {**HF_4B_V4, "text_config": {**HF_4B_V4["text_config"], "rope_scaling": {"rope_type": "yarn"}}}
    with pytest.raises(ValueError, match="yarn"):
        from_hf_dict(bad)


def test_config_dict_round_trip():
    for c in PRESETS.values():
        assert type(c).from_dict(c.to_dict()) == c
