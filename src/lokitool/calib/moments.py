"""Streamed first and second moments of key (and query) vectors per (layer, head): plain tensors,
additive, so runs merge and all-reduce. Filled by `collect.py`, read by `pca.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models import ModelFacts

KINDS = ("pre", "post")  # before and after RoPE


def gram(flat: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Sum of outer products per head: [H, N, D] -> [H, D, D].

    One [D, N] x [N, D] product per head has a tiny output and a long reduction, which a batched
    GEMM runs on a handful of GPU multiprocessors; cutting N into chunks (summed afterwards) gives
    it H x N / chunk independent products to spread over the card."""
    h, n, d = flat.shape
    full = n // chunk * chunk
    if full == 0:
        return flat.transpose(1, 2) @ flat
    parts = flat[:, :full].reshape(h, n // chunk, chunk, d)
    out = (parts.transpose(-1, -2) @ parts).sum(1)
    if full < n:
        rest = flat[:, full:]
        out += rest.transpose(1, 2) @ rest
    return out


@dataclass
class MomentSums:
    """Count, sum and sum of outer products of D-vectors, per (layer, head); float64."""

    count: torch.Tensor  # [L, H]
    total: torch.Tensor  # [L, H, D]
    outer: torch.Tensor  # [L, H, D, D]

    @classmethod
    def zeros(cls, num_layers: int, num_heads: int, dim: int, device: torch.device | str = "cpu") -> "MomentSums":
        f64 = dict(dtype=torch.float64, device=device)
        return cls(
            count=torch.zeros(num_layers, num_heads, **f64),
            total=torch.zeros(num_layers, num_heads, dim, **f64),
            outer=torch.zeros(num_layers, num_heads, dim, dim, **f64),
        )

    def add(self, layer: int, x: torch.Tensor) -> None:
        """Add vectors x [B, H, N, D] to layer `layer`."""
        x = x.detach().to(device=self.count.device, dtype=torch.float64)  # layers may live on other GPUs
        self.count[layer] += x.shape[0] * x.shape[2]
        self.total[layer] += x.sum(dim=(0, 2))
        flat = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])  # [H, B*N, D]
        self.outer[layer] += gram(flat)

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.total, self.outer]

    def merge_(self, other: "MomentSums") -> "MomentSums":
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine += theirs.to(mine.device)
        return self

    def to(self, device: torch.device | str) -> "MomentSums":
        return MomentSums(*(t.to(device) for t in self.tensors()))


@dataclass
class Statistics:
    """All streamed sums of one calibration run: keys (and optionally queries), pre and post RoPE."""

    keys: dict[str, MomentSums]
    queries: dict[str, MomentSums] = field(default_factory=dict)

    @classmethod
    def zeros(cls, facts: ModelFacts, device: torch.device | str, with_queries: bool) -> "Statistics":
        def make() -> dict[str, MomentSums]:
            return {k: MomentSums.zeros(facts.num_layers, facts.num_kv_heads, facts.head_dim, device) for k in KINDS}

        return cls(keys=make(), queries=make() if with_queries else {})

    def all_sums(self) -> list[MomentSums]:
        return [self.keys[k] for k in KINDS] + [self.queries[k] for k in KINDS if k in self.queries]

    def merge_(self, other: "Statistics") -> "Statistics":
        for mine, theirs in zip(self.all_sums(), other.all_sums()):
            mine.merge_(theirs)
        return self
