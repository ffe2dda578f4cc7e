"""Stream attention-key (and query) statistics out of a model's forward passes.

Keys are taken per layer and per KV head at two points:
- `pre`: exactly as they enter the rotary embedding, through a forward hook on `k_proj` (a Linear,
  so its output layout [B, S, Hkv*D] is known and checked against the config), passed through the
  layer's `k_norm` where it has one (`models.pre_rope`: per head, or over all heads as OLMo 2 does);
- `post`: as the attention function receives them (after the model's own RoPE), through the
  `lokitool` attention route.
Queries are taken at the same two points and pooled over the query heads of each KV group
(what a query-aware basis for that KV head needs).

Nothing raw is kept: each forward adds count, sum and sum of outer products, in float64, to
`MomentSums`. Sums are additive, so runs can be merged or all-reduced across processes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .dispatch import exact_attention, route_attention
from .models import ModelFacts, attention_modules, pre_rope
from .moments import Statistics


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, Hkv, G*S, D]: the query heads of a KV group pooled together."""
    b, h, s, d = q.shape
    return q.reshape(b, num_kv_heads, (h // num_kv_heads) * s, d)


Sink = Callable[[str, str, int, torch.Tensor], None]  # (vector: "key"|"query"|"value", kind, layer, x [B, H, N, D])


@contextlib.contextmanager
def capture(model: nn.Module, facts: ModelFacts, sink: Sink, with_queries: bool = False, with_values: bool = False) -> Iterator[None]:
    """Call `sink` with every layer's keys (and queries) before and after RoPE while the block runs;
    with `with_values`, also the values as the attention function receives them (kind "post").

    Hooks and the attention route are removed on exit, also after an exception.
    """
    layers = attention_modules(model)

    def pre_hook(vector: str, layer: int):
        attn = layers[layer]
        heads = facts.num_kv_heads if vector == "key" else facts.num_heads

        def hook(_module, _inputs, output):
            x = pre_rope(attn, vector, output, heads, facts.head_dim)  # [B, H, S, D]
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
            if with_values:
                sink("value", "post", layer, value)
            return exact_attention(mod, query, key, value, attention_mask, **kwargs)

        return handler

    handles = []
    try:
        for i, attn in enumerate(layers):
            handles.append(attn.k_proj.register_forward_hook(pre_hook("key", i)))
            if with_queries:
                handles.append(attn.q_proj.register_forward_hook(pre_hook("query", i)))
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
