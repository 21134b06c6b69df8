"""A checkpoint of random weights with the true shapes of a config: for benchmarks and tests of big sizes."""

from __future__ import annotations

import zlib

import torch

from ..config import Gemma3Config
from ..model import Gemma3
from .checkpoint import Checkpoint


class RandomCheckpoint(Checkpoint):
    """Each tensor is drawn on request from a generator seeded by (seed, name): reproducible, never all resident."""

    def __init__(self, config: Gemma3Config, seed: int = 0):
        self.config, self.seed = config, seed
        self.source = f"random weights ({config.name}, seed {seed})"
        with torch.device("meta"):
            self._shapes = {n: tuple(p.shape) for n, p in Gemma3(config).named_parameters()}

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def generator(self, name: str) -> torch.Generator:
        """The generator a tensor is drawn from (bench/make_checkpoint.py draws the same values in row chunks)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    @staticmethod
    def std(name: str) -> float:
        return 0.1 if name.endswith("norm.weight") else 0.02  # norms are zero-centred: 1 + w near 1

    def tensor(self, name: str) -> torch.Tensor:
        values = torch.randn(self._shapes[name], generator=self.generator(name))
        return values.mul_(self.std(name))  # in place: one copy in memory
