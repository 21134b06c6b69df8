"""gemma3.graphs: a traceable PyTorch definition of Gemma 3, its configs and its weight loaders."""

from .config import PRESETS, Gemma3Config, VisionConfig, param_count, preset
from .loaders.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from .loaders.load import load_checkpoint, model_from_checkpoint
from .model import Gemma3

__all__ = [
    "PRESETS", "Checkpoint", "CheckpointError", "Gemma3", "Gemma3Config", "VisionConfig", "load_checkpoint",
    "model_from_checkpoint", "open_checkpoint", "param_count", "preset",
]
