"""bench/make_checkpoint.py: random checkpoints in transformers' format, written tensor by tensor in row chunks.

transformers must load them strictly (the names a real `save_pretrained` writes, no missing or unexpected keys)
and our loader must read the very bf16 values transformers loaded.
"""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

from bench.make_checkpoint import _chunks, main, plan_shards, size_config, write_checkpoint
from gemma3.graphs import open_checkpoint, preset
from gemma3.graphs.config import tiny
from gemma3.graphs.loaders.names import hf_to_ours, ours_to_hf
from gemma3.graphs.loaders.random_weights import RandomCheckpoint
from tests.hf_reference import random_hf_model, tiny_multimodal

SHARD = 40_000  # bytes: the tiny models split over several shards
CHUNK = 1000  # values per draw: every 2-D tensor of the tiny models is drawn in several pieces

CASES = {"multimodal": (tiny_multimodal(), Gemma3ForConditionalGeneration), "text": (tiny(), Gemma3ForCausalLM)}


@pytest.fixture(scope="module", params=list(CASES))
def written(request, tmp_path_factory):
    config, cls = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param) / "ckpt"
    index = write_checkpoint(config, folder, seed=3, shard_bytes=SHARD, chunk_elements=CHUNK,
                             tokenizer=request.param == "multimodal")  # the tokenizer build takes ~4 s: once
    return config, cls, folder, index


def _saved_by_transformers(config, folder):
    """Names, shapes and dtypes of what `save_pretrained` writes for this config in bfloat16."""
    random_hf_model(config).to(torch.bfloat16).save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}  # noqa: SIM118


def _ours_on_disk(folder):
    entries = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                entries[name] = (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
    return entries


def test_names_shapes_dtypes_are_what_save_pretrained_writes(written, tmp_path):
    config, _, folder, index = written
    expected = _saved_by_transformers(config, tmp_path)
    assert _ours_on_disk(folder) == expected
    assert set(index["weight_map"]) == set(expected)


def test_transformers_loads_strictly_and_our_loader_reads_the_same_values(written):
    config, cls, folder, _ = written
    model, info = cls.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing / unexpected / mismatched keys
    assert type(model.config).__name__ == ("Gemma3Config" if config.vision else "Gemma3TextConfig")
    checkpoint = open_checkpoint(folder)
    assert checkpoint.config == config.replace(name=checkpoint.config.name)
    assert sorted(checkpoint.names()) == sorted(RandomCheckpoint(config).names())
    # transformers 5 renames on load (language_model.model.* -> model.language_model.*, ...): map its names back
    loaded = {hf_to_ours(k): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(loaded) == sorted(checkpoint.names())
    for name in checkpoint.names():
        ours = checkpoint.tensor(name)
        assert ours.dtype == loaded[name].dtype == torch.bfloat16, name
        assert torch.equal(ours, loaded[name]), name


def test_values_are_random_checkpoint_rounded_to_bf16(written):
    """Drawn in chunks of rows from one generator per tensor: exactly RandomCheckpoint's values, per (seed, name)."""
    config, _, folder, _ = written
    checkpoint, random = open_checkpoint(folder), RandomCheckpoint(config, seed=3)
    for name in checkpoint.names():
        assert torch.equal(checkpoint.tensor(name), random.tensor(name).to(torch.bfloat16)), name
    norm = checkpoint.tensor("text.layers.0.input_norm.weight").float()
    embed = checkpoint.tensor("text.embed_tokens.weight").float()
    assert 0.05 < norm.std() < 0.2 and abs(norm.mean()) < 0.05  # zero-centred, as HF stores Gemma norms
    assert 0.015 < embed.std() < 0.025
    other = RandomCheckpoint(config, seed=4).tensor("text.embed_tokens.weight").to(torch.bfloat16)
    assert not torch.equal(checkpoint.tensor("text.embed_tokens.weight"), other)


def test_files_index_and_shard_sizes(written):
    config, _, folder, index = written
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(files)
    assert json.loads((folder / "model.safetensors.index.json").read_text()) == index
    data = 0
    for file in files:
        raw = (folder / file).read_bytes()
        header_len = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + header_len])
        assert header.pop("__metadata__") == {"format": "pt"} and header_len % 8 == 0
        ends = sorted(tuple(e["data_offsets"]) for e in header.values())
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # contiguous, no gaps
        assert len(raw) == 8 + header_len + ends[-1][1]
        assert ends[-1][1] <= SHARD or len(header) == 1  # a tensor bigger than a shard gets its own
        assert {e["dtype"] for e in header.values()} == {"BF16"}
        data += ends[-1][1]
    assert index["metadata"] == {"total_size": data, "total_parameters": data // 2}
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["dtype"] == "bfloat16"
    assert config_json["architectures"] == ["Gemma3ForConditionalGeneration" if config.vision else "Gemma3ForCausalLM"]
    if config.vision is not None:
        import sentencepiece

        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        assert tokenizer.get_piece_size() == 262_144 and tokenizer.bos_id() == 2


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    """As transformers saves a model that fits one shard."""
    write_checkpoint(tiny(), tmp_path / "one", tokenizer=False)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert len(open_checkpoint(tmp_path / "one").names()) == len(RandomCheckpoint(tiny()).names())
    with pytest.raises(FileExistsError):
        write_checkpoint(tiny(), tmp_path / "one", tokenizer=False)


def test_chunks_and_shard_plan():
    assert _chunks((262_208, 2560), 1 << 24) == [6544] * 40 + [262_208 - 6544 * 40]
    assert _chunks((1152,), 1 << 24) == [1152]
    assert _chunks((33, 1), 16) == [16, 17]  # a tail under 16 values stays with the piece before
    assert _chunks((40, 3), 20) == [16, 16, 8]
    for shape, chunk in (((262_208, 2560), 1 << 24), ((1000, 588), 5000), ((37, 3, 14, 14), 100)):
        pieces = _chunks(shape, chunk)
        row = shape[1] if len(shape) == 2 else 3 * 14 * 14
        assert sum(pieces) == shape[0] and all(p * row % 16 == 0 or p == pieces[-1] for p in pieces)
    assert plan_shards({"a": 5, "b": 5, "c": 20, "d": 1}, 10) == [["a", "b"], ["c"], ["d"]]


def test_hf_names_round_trip_for_every_size():
    for size in ("270m", "4b", "27b"):
        multimodal = preset(size).vision is not None
        for name in RandomCheckpoint(preset(size)).names():
            assert hf_to_ours(ours_to_hf(name, multimodal)) == name
    text_only = size_config("4b", text_only=True)
    assert text_only.vision is None and text_only.vocab_size == preset("4b").vocab_size
    assert ours_to_hf("text.layers.3.attn.q_norm.weight", False) == "model.layers.3.self_attn.q_norm.weight"
    assert ours_to_hf("vision.layers.2.ln1.bias", True) == "vision_tower.encoder.layers.2.layer_norm1.bias"


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--shard-gb" in capsys.readouterr().out


def _mapped_rss_kb(folder) -> int:
    """Resident kB of this process's memory mappings of files under `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        lines = smaps.readlines()
    for line in lines:
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line: "start-end perms offset dev inode path"
            fields = line.split(maxsplit=5)
            inside = len(fields) == 6 and fields[5].strip().startswith(str(folder))
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_open_checkpoint_streams_no_pages_stay_mapped(tmp_path):
    """Reading every tensor once must not leave the checkpoint in our RSS: the mmap backend kept each page it served
    mapped for the handle's (the checkpoint's) life, so a 4b read tensor by tensor ended at 8.5 GB RssFile."""
    config = tiny(vocab_size=32_768, hidden_size=512, intermediate_size=1024, num_layers=2, head_dim=128)
    index = write_checkpoint(config, tmp_path / "ckpt", shard_bytes=10_000_000, tokenizer=False)
    checkpoint = open_checkpoint(tmp_path / "ckpt")
    for name in checkpoint.names():
        tensor = checkpoint.tensor(name).float()
        del tensor
    assert index["metadata"]["total_size"] > 40_000_000
    assert _mapped_rss_kb(tmp_path / "ckpt") < 1024  # mmap: the whole 40 MB
