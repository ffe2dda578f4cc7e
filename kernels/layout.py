"""The Loki key layout: keys rotated into the PCA basis and stored in two planes.

    LokiKeys(low [B, Hkv, S, d], high [B, Hkv, S, D - d])

`low` holds the d dims that are scored, contiguous across tokens, so the score pass streams
B x Hkv x S x d x 2 bytes with no gaps; `high` holds the rest. Each element is stored once: the
exact attention over a kept token reads its row from both planes. A plain rotated cache
[B, Hkv, S, D] works too (the score pass then reads the first d x 2 bytes of every row).
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch


class LokiKeys(NamedTuple):
    low: torch.Tensor  # [B, Hkv, S, d]   scored dims
    high: torch.Tensor  # [B, Hkv, S, D - d]

    @property
    def shape(self) -> torch.Size:
        """The logical shape [B, Hkv, S, D]."""
        b, hkv, s, dl = self.low.shape
        return torch.Size((b, hkv, s, dl + self.high.shape[-1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.low.dtype

    @property
    def device(self) -> torch.device:
        return self.low.device


Keys = Union[torch.Tensor, LokiKeys]


def split_keys(k_rot: torch.Tensor, d: int) -> LokiKeys:
    """Copy a rotated cache [B, Hkv, S, D] into the two-plane layout split after dim d."""
    return LokiKeys(k_rot[..., :d].contiguous(), k_rot[..., d:].contiguous())


def joined(keys: Keys) -> torch.Tensor:
    """The plain [B, Hkv, S, D] tensor (a copy for LokiKeys): for references and tests."""
    return torch.cat([keys.low, keys.high], dim=-1) if isinstance(keys, LokiKeys) else keys


def scored_plane(keys: Keys) -> torch.Tensor:
    """The tensor whose first d dims the score pass reads."""
    return keys.low if isinstance(keys, LokiKeys) else keys
