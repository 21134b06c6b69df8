"""Build a `Gemma3` from a checkpoint: every parameter filled and shape-checked, or a clear error."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from ..model import Gemma3
from ..rope import RotaryTables
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint


def model_from_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> Gemma3:
    with torch.device("meta"):  # no memory for random init: every parameter comes from the checkpoint
        model = Gemma3(checkpoint.config)
    expected = dict(model.named_parameters())
    state = {}
    for name in tqdm(expected, desc="loading weights", unit="tensor", leave=False, disable=None):
        tensor = checkpoint.tensor(name)
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{checkpoint.source}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)} from the config"
            )
        state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.text.rope = RotaryTables(checkpoint.config)  # buffers built on meta above; recompute them for real
    return model.eval()


def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, size: str | None = None
) -> Gemma3:
    """Load an HF safetensors folder or a GGUF file into our model (eval mode)."""
    return model_from_checkpoint(open_checkpoint(path, size=size), dtype=dtype)
