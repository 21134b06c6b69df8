"""The whole Gemma 3 model: text decoder, and for 4b/12b/27b the SigLIP tower and projector.

Two entry points:
  - `forward(input_ids, pixel_values=None)`: logits for every position (a fresh cache under the hood);
  - `step(input_ids, past_len, cache, image_features=None)`: one step over S new tokens on an explicit
    per-layer cache (local layers keep exactly their window), what the exported decoder graph computes.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Gemma3Config
from .text import KVCache, TextDecoder, image_groups
from .vision import Projector, VisionTower


class Gemma3(nn.Module):
    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.text = TextDecoder(config)
        if config.vision is not None:
            self.vision = VisionTower(config.vision)
            self.projector = Projector(config.vision, config.hidden_size)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, 896, 896) -> (N, 256, text_hidden): what replaces the soft tokens of N images or crops."""
        if self.config.vision is None:
            raise ValueError(f"the {self.config.name} model is text-only; it takes no images")
        return self.projector(self.vision(pixel_values))

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        return self.text.new_cache(batch, capacity, dtype or self.text.embed_tokens.weight.dtype)

    def step(
        self,
        input_ids: torch.Tensor,
        past_len: torch.Tensor,
        cache: KVCache,
        image_features: torch.Tensor | None = None,
        last_only: bool = False,
        logits_count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """input_ids (B, S) after `past_len` (0-d int64) cached tokens -> logits (B, S, vocab), updated cache.

        image_features (N, hidden): rows for the soft tokens in this step, in order. The caller never splits
        one image across steps, so its bidirectional group is complete here.
        last_only: logits of the last position only (B, 1, vocab): generation needs no more, and the lm_head
        over a whole prefill chunk would cost more than the chunk's layers (262144 x hidden per position).
        logits_count (0-d int64, 1 <= n <= S): logits of the last n positions (B, n, vocab) instead; speculative
        decoding verifies n drafted tokens in one step, and n = 1 costs what `last_only` does.
        """
        x = self.text.embed(input_ids, image_features)
        groups = image_groups(input_ids, self.config.image_token_id)
        hidden, cache = self.text.step(x, past_len, groups, cache)
        if logits_count is not None:
            n, length = logits_count.item(), hidden.shape[1]
            torch._check(n >= 1)
            torch._check(n <= length)
            hidden = hidden.narrow(1, length - n, n)  # traced as a Slice with a runtime start
        elif last_only:
            hidden = hidden[:, -1:]
        return self.text.logits(hidden), cache

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, S, vocab) for every position of a whole sequence."""
        features = None
        if pixel_values is not None:
            features = self.image_features(pixel_values).flatten(0, 1)  # (N * 256, hidden)
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1])
        logits, _ = self.step(input_ids, torch.zeros((), dtype=torch.int64), cache, features)
        return logits
