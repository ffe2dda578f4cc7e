"""Stream attention-key (and query) statistics out of a model's forward passes.

Keys are taken per layer and per KV head at two points:
- `pre`: exactly as they enter the rotary embedding (output of `k_norm` if the model has one,
  else of `k_proj`), through a forward hook;
- `post`: as the attention function receives them (after the model's own RoPE), through the
  `lokitool` attention route.
Queries are taken at the same two points and pooled over the query heads of each KV group
(what a query-aware basis for that KV head needs).

Nothing raw is kept: each forward adds count, sum and sum of outer products, in float64, to
`MomentSums`. Sums are additive, so runs can be merged or all-reduced across processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .dispatch import route_attention, sdpa_attention
from .models import ModelFacts, attention_modules, pre_rope_key_module, pre_rope_query_module

KINDS = ("pre", "post")


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


def _heads_first(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H*D] or [B, S, H, D] -> [B, H, S, D]."""
    b, s = x.shape[:2]
    return x.reshape(b, s, -1, head_dim).transpose(1, 2)


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, Hkv, G*S, D]: the query heads of a KV group pooled together."""
    b, h, s, d = q.shape
    return q.reshape(b, num_kv_heads, (h // num_kv_heads) * s, d)


Sink = Callable[[str, str, int, torch.Tensor], None]  # (vector: "key"|"query", kind, layer, x [B, H, N, D])


@contextlib.contextmanager
def capture(model: nn.Module, facts: ModelFacts, sink: Sink, with_queries: bool = False) -> Iterator[None]:
    """Call `sink` with every layer's keys (and queries) before and after RoPE while the block runs.

    Hooks and the attention route are removed on exit, also after an exception.
    """
    exact_attention = sdpa_attention()
    layers = attention_modules(model)

    def pre_hook(vector: str, layer: int):
        def hook(_module, _inputs, output):
            x = _heads_first(output, facts.head_dim)
            if vector == "query":
                x = _group_queries(x, facts.num_kv_heads)
            sink(vector, "pre", layer, x)

        return hook

    def make_handler(module: nn.Module):
        layer = layers.index(module)

        def handler(mod, query, key, value, attention_mask, **kwargs):
            sink("key", "post", layer, key)
            if with_queries:
                sink("query", "post", layer, _group_queries(query, facts.num_kv_heads))
            return exact_attention(mod, query, key, value, attention_mask, **kwargs)

        return handler

    handles = []
    try:
        for i, attn in enumerate(layers):
            handles.append(pre_rope_key_module(attn).register_forward_hook(pre_hook("key", i)))
            if with_queries:
                handles.append(pre_rope_query_module(attn).register_forward_hook(pre_hook("query", i)))
        with route_attention(model, make_handler):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def accumulate(model: nn.Module, facts: ModelFacts, stats: Statistics) -> Iterator[Statistics]:
    """Stream every forward pass inside the block into `stats`."""

    def sink(vector: str, kind: str, layer: int, x: torch.Tensor) -> None:
        sums = stats.keys if vector == "key" else stats.queries
        sums[kind].add(layer, x)

    with capture(model, facts, sink, with_queries=bool(stats.queries)):
        yield stats


@torch.inference_mode()
def collect_statistics(
    model: nn.Module,
    facts: ModelFacts,
    tokens: torch.Tensor,
    *,
    batch_size: int,
    with_queries: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Statistics:
    """Run `model` over token windows [N, L] in batches; return the streamed sums."""
    device = next(model.parameters()).device
    stats = Statistics.zeros(facts, device, with_queries)
    with accumulate(model, facts, stats):
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            model.base_model(input_ids=batch, use_cache=False)  # no LM head: logits are not needed
            if progress is not None:
                progress(batch.numel())
    return stats
