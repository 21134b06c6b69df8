"""Write a random-weight Gemma 3 checkpoint in transformers' on-disk format, streaming: any size, little memory.

    python -m bench.make_checkpoint --size 4b --out DIR [--seed 0] [--shard-gb 2] [--text-only]

DIR gets what `save_pretrained` would write for a bf16 model (config.json, generation_config.json,
model-0000k-of-0000n.safetensors shards of at most --shard-gb GB each, model.safetensors.index.json) plus the
Gemma 3 tokenizer.model (rebuilt from the embedded 270M GGUF: every size shares it). 4b/12b/27b are
Gemma3ForConditionalGeneration checkpoints (tower and projector included) unless --text-only; 270m/1b are
Gemma3ForCausalLM. Tensor names are the ones transformers saves (tests/test_make_checkpoint.py checks them
against a real `save_pretrained`).

The values are `RandomCheckpoint(config, seed)`'s (seeded by (seed, name); std 0.02, Gemma RMSNorm weights
std 0.1 around zero as HF stores them) rounded to bfloat16. Each tensor is drawn in chunks of rows and written
straight into its shard (our own safetensors writer: `safetensors.save_file` needs every tensor in memory), so
peak memory is a chunk or so whatever the size: a 4b (8.6 GB) is written in a few hundred MB.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from pathlib import Path

import torch

from gemma3.graphs.config import GLOBAL, LOCAL, PRESETS, Gemma3Config, preset
from gemma3.graphs.loaders.names import ours_to_hf
from gemma3.graphs.loaders.random_weights import RandomCheckpoint

GB = 10**9  # transformers' "2GB" is 2e9 bytes
SHARD_GB = 2.0
CHUNK_ELEMENTS = 1 << 24  # values drawn per step: 64 MiB of float32, 32 MiB once in bfloat16
_HF_TYPE = {LOCAL: "sliding_attention", GLOBAL: "full_attention"}


# ---- config.json: transformers' own config classes (tests/hf_reference.py builds its models from these) ------

def _rope(r) -> dict:
    if r.linear_factor == 1.0:
        return {"rope_type": "default", "rope_theta": r.base}
    return {"rope_type": "linear", "factor": r.linear_factor, "rope_theta": r.base}


def hf_text_config(c: Gemma3Config):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, query_pre_attn_scalar=c.query_pre_attn_scalar, sliding_window=c.sliding_window,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        layer_types=[_HF_TYPE[t] for t in c.layer_types],
        rope_parameters={_HF_TYPE[k]: _rope(r) for k, r in c.rope.items()},
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )


def hf_config(c: Gemma3Config):
    """transformers' config for our config: Gemma3TextConfig (text-only) or Gemma3Config (with the tower)."""
    if c.vision is None:
        return hf_text_config(c)
    from transformers import Gemma3Config as HFGemma3Config
    from transformers import SiglipVisionConfig

    v = c.vision
    vision = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, vision_use_head=False, hidden_act="gelu_pytorch_tanh",
    )
    return HFGemma3Config(
        text_config=hf_text_config(c).to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=v.mm_tokens_per_image, image_token_index=c.image_token_id,
        boi_token_index=c.boi_token_id, eoi_token_index=c.eoi_token_id,
    )


def architecture(c: Gemma3Config) -> str:
    return "Gemma3ForCausalLM" if c.vision is None else "Gemma3ForConditionalGeneration"


def _write_configs(c: Gemma3Config, out: Path) -> None:
    from transformers import GenerationConfig

    config = hf_config(c)
    config.architectures = [architecture(c)]
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


def _write_tokenizer(out: Path) -> None:
    from gemma3.graphs.loaders.embedded import embedded_270m_gguf
    from gemma3.graphs.loaders.gguf_tokenizer import sentencepiece_model_from_gguf

    (out / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(embedded_270m_gguf()))


# ---- weights ---------------------------------------------------------------------------------------------

def _chunks(shape: tuple[int, ...], chunk_elements: int) -> list[int]:
    """Rows per piece, summing to shape[0]. Pieces hold a multiple of 16 values and never fewer than 16: then
    torch.randn drawn piece by piece from one generator gives exactly the values of one whole draw."""
    numel = math.prod(shape)
    if not shape or numel <= chunk_elements:
        return [shape[0] if shape else 1]
    row = numel // shape[0]
    step = max(16, chunk_elements // row // 16 * 16)
    pieces = []
    left = shape[0]
    while left:
        take = min(step, left)
        if 0 < (left - take) * row < 16:  # a tail under 16 values would be drawn differently: keep it here
            take = left
        pieces.append(take)
        left -= take
    return pieces


def plan_shards(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """transformers' rule, in name order: a shard takes tensors until the next would pass `shard_bytes`."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(sizes):
        if shards[-1] and used + sizes[name] > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _header(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = 2 * math.prod(shapes[name])
        entries[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # as safetensors pads: data starts 8-byte aligned
    return struct.pack("<Q", len(header)) + header


def write_checkpoint(
    config: Gemma3Config,
    out: str | Path,
    seed: int = 0,
    shard_bytes: int = int(SHARD_GB * GB),
    chunk_elements: int = CHUNK_ELEMENTS,
    tokenizer: bool = True,
    progress: bool = False,
) -> dict:
    """Write the checkpoint folder `out` (created; must be empty if it exists). Returns the index json."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this writer copies memory as it is")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty (refusing to mix a new checkpoint with old files)")
    out.mkdir(parents=True, exist_ok=True)
    random = RandomCheckpoint(config, seed)
    multimodal = config.vision is not None
    ours = {ours_to_hf(name, multimodal): name for name in random.names()}
    shapes = {hf: random.shape(name) for hf, name in ours.items()}
    sizes = {hf: 2 * math.prod(shape) for hf, shape in shapes.items()}
    shards = plan_shards(sizes, shard_bytes)
    weight_map = {}
    started = time.perf_counter()
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        with open(out / file, "wb") as f:
            f.write(_header(names, shapes))
            for hf in names:
                name = ours[hf]
                generator, std, shape = random.generator(name), random.std(name), shapes[hf]
                for rows in _chunks(shape, chunk_elements):
                    piece = torch.randn((rows, *shape[1:]) if shape else (), generator=generator).mul_(std)
                    f.write(piece.to(torch.bfloat16).view(torch.int16).numpy())  # raw bf16 bits, no extra copy
                    del piece
                weight_map[hf] = file
        if progress:
            print(f"{file}: {len(names)} tensors, {sum(sizes[n] for n in names) / GB:.2f} GB, "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    index = {"metadata": {"total_parameters": sum(sizes.values()) // 2, "total_size": sum(sizes.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_configs(config, out)
    if tokenizer:
        _write_tokenizer(out)
    return index


def size_config(size: str, text_only: bool = False) -> Gemma3Config:
    """A preset as its checkpoint has it; `text_only` drops the tower (a Gemma3ForCausalLM of the same text)."""
    config = preset(size)
    if text_only and config.vision is not None:
        config = config.replace(vision=None, image_token_id=None)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.make_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", required=True, choices=list(PRESETS), help="Gemma 3 size (true shapes)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to create (empty or new)")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of (seed, tensor name)")
    parser.add_argument("--shard-gb", type=float, default=SHARD_GB, help="largest shard, in GB (1e9 bytes)")
    parser.add_argument("--text-only", action="store_true",
                        help="4b/12b/27b without the vision tower and projector, as a Gemma3ForCausalLM")
    args = parser.parse_args(argv)
    config = size_config(args.size, args.text_only)
    started = time.perf_counter()
    index = write_checkpoint(config, args.out, seed=args.seed, shard_bytes=int(args.shard_gb * GB), progress=True)
    shards = len(set(index["weight_map"].values()))
    print(f"{args.out}: {architecture(config)} {args.size}, {len(index['weight_map'])} tensors, "
          f"{index['metadata']['total_size'] / GB:.2f} GB in {shards} shard(s), "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
