"""Weight loaders: HF safetensors (single, sharded, both multimodal key layouts), GGUF, and their errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma3.graphs import CheckpointError, load_checkpoint, open_checkpoint, preset
from tests.hf_reference import random_hf_model, save_hf, tiny_multimodal


@pytest.fixture(scope="module")
def mm_folder(tmp_path_factory):
    """A tiny multimodal HF checkpoint as transformers writes it."""
    return save_hf(random_hf_model(tiny_multimodal(), seed=7), tmp_path_factory.mktemp("mm"))


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def _reference_state(folder):
    return {k: v.clone() for k, v in load_checkpoint(folder).state_dict().items()}


_NEW_LAYOUT = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def test_sharded_new_layout_loads_identically(mm_folder, tmp_path):
    """transformers >= 4.52 names (model.language_model.*), split over two shards with an index json."""
    tensors = load_file(mm_folder / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        for old, new in _NEW_LAYOUT:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = t
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(mm_folder / "config.json", folder / "config.json")
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: renamed[k] for k in keys}, folder / file)
        weight_map.update(dict.fromkeys(keys, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    expected, loaded = _reference_state(mm_folder), load_checkpoint(folder).state_dict()
    assert set(expected) == set(loaded)
    for k in expected:
        assert torch.equal(expected[k], loaded[k]), k


# Half-precision checkpoints against transformers reading the same file. Computed in fp32 (both sides upcast the
# same half values exactly) the logits must agree as the fp32 parity tests do (1e-4); rounding the weights to half
# alone moves them by ~3e-2 here, so a loader that misread the bytes, or kept other weights, could not pass.
# Computed in the checkpoint's own dtype, each op rounds to 8 (bf16) or 11 (fp16) bits: measured identical to
# transformers on this CPU (the same ops in the same order), bounded at 2% (bf16) and 0.5% (fp16) of the logit
# range, a few roundings of one op, in case a kernel's order differs.
@pytest.mark.parametrize("dtype, native_tolerance", [(torch.bfloat16, 0.02), (torch.float16, 0.005)])
@torch.no_grad()
def test_half_precision_checkpoints_match_transformers(mm_folder, tmp_path, dtype, native_tolerance):
    from transformers import Gemma3ForConditionalGeneration

    folder = _copy(mm_folder, tmp_path / "half")
    tensors = {k: v.to(dtype) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors")
    ids = torch.tensor([[2, *range(5, 25)]])  # 21 tokens: past the window of 8
    for compute, tolerance in ((torch.float32, 1e-4), (dtype, native_tolerance)):
        ours = load_checkpoint(folder, dtype=compute)
        assert ours.text.embed_tokens.weight.dtype == compute
        hf = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=compute, attn_implementation="eager")
        expected = hf.eval()(input_ids=ids).logits.float()
        got = ours(ids).float()
        diff, scale = (got - expected).abs().max().item(), expected.abs().max().item()
        print(f"{dtype} checkpoint, {compute} compute: max abs logit diff {diff:.2e} (logit scale {scale:.2f})")
        assert torch.isfinite(got).all() and diff < tolerance * (scale if compute == dtype else 1.0)


def test_pickled_checkpoints_are_refused(tmp_path):
    pickled = tmp_path / "pytorch_model.bin"
    pickled.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="safetensors"):
        open_checkpoint(pickled)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="pickled"):
        open_checkpoint(tmp_path)


def test_missing_tensor_is_named(mm_folder, tmp_path):
    folder = _copy(mm_folder, tmp_path / "missing")
    tensors = load_file(folder / "model.safetensors")
    del tensors["language_model.model.layers.3.self_attn.k_norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"text\.layers\.3\.attn\.k_norm\.weight"):
        load_checkpoint(folder)


def test_misshapen_tensor_is_named(mm_folder, tmp_path):
    folder = _copy(mm_folder, tmp_path / "misshapen")
    tensors = load_file(folder / "model.safetensors")
    tensors["language_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"text\.layers\.0\.mlp\.up_proj\.weight has shape \(3, 3\)"):
        load_checkpoint(folder)


def test_truncated_safetensors(mm_folder, tmp_path):
    folder = _copy(mm_folder, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)


def test_size_mismatch_names_the_field(mm_folder):
    with pytest.raises(CheckpointError, match="hidden_size is 64, but --size 4b has 2560"):
        open_checkpoint(mm_folder, size="4b")


@pytest.mark.real270m
def test_gguf_config_and_names(gguf_270m_path):
    ckpt = open_checkpoint(gguf_270m_path, size="270m")
    expected = preset("270m")
    for field in ("vocab_size", "hidden_size", "num_layers", "num_kv_heads", "head_dim", "sliding_window",
                  "rope", "layer_types", "query_pre_attn_scalar"):
        assert getattr(ckpt.config, field) == getattr(expected, field), field
    # llama.cpp stores norms as 1 + w: the loader hands them back zero-centred, as HF stores them
    stored = next(t for t in ckpt.reader.tensors if t.name == "blk.0.attn_q_norm.weight")
    norm = ckpt.tensor("text.layers.0.attn.q_norm.weight")
    assert torch.equal(norm, torch.from_numpy(stored.data.copy()) - 1.0)
    assert ckpt.shape("text.embed_tokens.weight") == (262144, 640)
    with pytest.raises(CheckpointError, match="--size 1b"):
        open_checkpoint(gguf_270m_path, size="1b")


@pytest.mark.real270m
def test_truncated_gguf(gguf_270m_path, tmp_path):
    broken = tmp_path / "broken.gguf"
    with open(gguf_270m_path, "rb") as f:
        broken.write_bytes(f.read(4_000_000))
    with pytest.raises(CheckpointError, match="broken.gguf"):
        load_checkpoint(broken)


def test_fast_gguf_reader_reads_what_the_stock_reader_reads(tmp_path):
    """FastGGUFReader (our GGUF checkpoints and tokenizers, and transformers' reads in tests/conftest.py) gives the
    stock reader's fields and tensors, byte for byte, on a file with string, float and int arrays, scalars and
    tensors of several types."""
    import gguf
    import numpy as np

    from gemma3.graphs.loaders.gguf_reader import FastGGUFReader

    path = tmp_path / "small.gguf"
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(2)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_string("general.name", "small")
    writer.add_array("tokenizer.ggml.tokens", [f"piece{i}\u2581" for i in range(300)])
    writer.add_array("tokenizer.ggml.scores", rng.standard_normal(300).astype(np.float32).tolist())
    writer.add_array("tokenizer.ggml.token_type", rng.integers(1, 7, 300).tolist())
    for name, array in {"a.weight": rng.standard_normal((3, 32)).astype(np.float32),
                        "b.weight": rng.standard_normal((64,)).astype(np.float16),
                        "c.weight": rng.integers(-9, 9, (4, 8)).astype(np.int8)}.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    stock, fast = gguf.GGUFReader(str(path)), FastGGUFReader(str(path))
    assert list(stock.fields) == list(fast.fields)
    for key, field in stock.fields.items():
        other = fast.fields[key]
        assert field.types == other.types and field.data == other.data, key
        assert [p.tobytes() for p in field.parts] == [p.tobytes() for p in other.parts], key
        assert [p.dtype for p in field.parts] == [p.dtype for p in other.parts], key
    assert [t.name for t in stock.tensors] == [t.name for t in fast.tensors]
    for a, b in zip(stock.tensors, fast.tensors):
        assert (a.tensor_type, list(a.shape), a.data_offset) == (b.tensor_type, list(b.shape), b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
