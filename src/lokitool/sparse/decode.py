"""Every method of `eval` at decode time, over the Loki cache: the attention route of `eval --tasks`.

`generation.loki_attention` runs Loki alone; here one route serves each `MethodSpec`:
- full: exact attention over every cached key;
- loki, random-basis: Loki's decode (`generation.decode_backend`: the kernels on CUDA, the oracle
  `reference.decode_attention` elsewhere) over keys rotated into the method's basis;
- exact-topk, h2o (and any `DecodeScorer`): one mechanism in the reference's style: score every
  cached key, keep the top k = max(1, floor(kf x length)) with `reference.select` (sinks, groups),
  exact attention over them with `reference.attend`. Selectors differ only in their scores:
  exact-topk scores q.k exactly; h2o gives the most recent k // 2 keys +inf and ranks the others by
  the attention mass (full softmax, as the idealised H2O of `reference.h2o_attention`) that the
  decoded queries so far, this one included, gave them;
- sparq, quest, and every method but h2o under `group union` (what the two mechanisms above do not
  express): the reference's `sparse_attention` over the one query row, with the selector `eval --ppl`
  uses (`decode_selector`); low-rank methods score the first d dims of the rotated keys, as Loki does.
Keys arrive rotated (the cache rotates them; a cache without a basis stores them as they come);
queries are rotated here, so q_rot . k_rot = q . k and exact scores need no basis.

Prefill (several query rows) is exact attention unless `sparse_prefill`, which applies the method
to the prompt as `attention.patched` does for `eval --ppl` (the same reference functions).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..calib.dispatch import route_attention, sdpa_attention
from ..calib.models import attention_modules
from . import reference as loki
from .attention import DIM_SCANNERS, LOW_RANK, MethodSpec, selector_for
from .cache import LokiCache, rotate_into
from .generation import decode_backend

# (layer_idx, q_rot [B, H, D], k_rot [B, Hkv, S, D], scaling, budget) -> scores [B, H, S] (float32)
DecodeScorer = Callable[[int, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exact q.k of one query per head, q [B, H, D] over k [B, Hkv, S, D] -> [B, H, S] float32, each
    KV head's keys read once for its group of query heads (no [B, H, S, D] copy at decode)."""
    b, h, d = q.shape
    hkv = k.shape[1]
    return (q.float().reshape(b, hkv, h // hkv, d) @ k.float().transpose(-1, -2)).reshape(b, h, -1)


def exact_scorer() -> DecodeScorer:
    return lambda layer, q, k, scaling, budget: grouped_scores(q, k)


def recent_scorer() -> DecodeScorer:
    """The most recent keys first: a sliding window of k keys (what a needle placed early defeats)."""
    return lambda layer, q, k, scaling, budget: torch.arange(k.shape[2], device=q.device, dtype=torch.float32).expand(
        q.shape[0], q.shape[1], -1)


def h2o_scorer() -> DecodeScorer:
    """Recent half of the budget, then heavy hitters by the attention mass of the decoded queries."""
    mass: dict[int, torch.Tensor] = {}  # layer -> [B, H, S] attention received so far

    def score(layer: int, q: torch.Tensor, k: torch.Tensor, scaling: float, budget: int) -> torch.Tensor:
        s = k.shape[2]
        probs = torch.softmax(grouped_scores(q, k) * scaling, dim=-1)  # [B, H, S]
        seen = mass.get(layer)
        if seen is not None:
            probs[..., : seen.shape[-1]] += seen
        mass[layer] = probs
        recent = torch.arange(s, device=q.device) >= s - budget // 2
        return probs.masked_fill(recent, float("inf"))

    return score


def scorer_for(method: str) -> DecodeScorer | None:
    """The scorer of a method decoded by the generic mechanism (None: full, loki, random-basis)."""
    return {"exact-topk": exact_scorer, "h2o": h2o_scorer, "recent": recent_scorer}.get(method, lambda: None)()


def decode_selector(method: MethodSpec) -> Callable[[int], loki.Selector] | None:
    """head_dim -> the reference selector a decode step of `method` runs through
    `reference.sparse_attention` over the cached (rotated) keys; None where `method_attention`'s
    other paths serve the method."""
    m = method.method
    if m in ("full", "h2o"):  # h2o selects per query head whatever the group (as in eval --ppl)
        return None
    if m not in ("sparq", "quest") and method.loki.group != "union":
        return None
    return lambda head_dim: _selector(method, head_dim)


def _selector(method: MethodSpec, head_dim: int) -> loki.Selector:
    """eval --ppl's selector of `method`, over keys the cache already rotated."""
    return selector_for(method, method.loki.dims(head_dim) if method.method in DIM_SCANNERS else None)


def scored_decode(q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, *,
                  spec: loki.LokiSpec, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: the top max(1, floor(kf x S)) keys by `scores` [B, H, S] (sinks and groups
    from `spec`, through `reference.select`), exact attention over them (softmax in float32, as
    `reference.attend`). Returns ([B, H, D] float32, keep [B, H, S])."""
    b, h, dim = q_rot.shape
    hkv, s = k_rot.shape[1], k_rot.shape[2]
    positions = torch.tensor([s - 1], device=q_rot.device)
    ranking = scores[:, :, None]  # [B, H, 1, S]
    if spec.group == "kv":
        ranking = loki.group_scores(ranking, hkv)
    keep = loki.select(ranking, positions, spec.budgets(positions + 1), spec.sink)[:, :, 0]  # [B, H, S]
    logits = (grouped_scores(q_rot, k_rot) * scaling).masked_fill(~keep, loki.NEG_INF)
    probs = torch.softmax(logits, dim=-1).reshape(b, hkv, h // hkv, s)
    return (probs @ v.float()).reshape(b, h, -1), keep


@dataclass
class DecodeStats:
    """Kept fraction of the cached keys over the decode steps (every layer, query head and sequence)."""

    kept: float = 0.0
    rows: int = 0
    per_step: list[float] = field(default_factory=list)

    def add(self, kept_fraction: torch.Tensor) -> None:
        self.kept += float(kept_fraction.sum())
        self.rows += kept_fraction.numel()

    def add_selection(self, selection: loki.SelectionStats) -> None:
        self.kept += selection.kept_fraction
        self.rows += selection.rows

    @property
    def kept_fraction(self) -> float | None:
        return self.kept / self.rows if self.rows else None


def _prefill(method: MethodSpec, head_dim: int):
    """Sparse prefill of `method` over rotated q and k: [B, H, Sq, D] float32 (the reference)."""
    spec = method.loki
    if method.method == "h2o":
        return lambda q, k, v, scale: loki.h2o_attention(q, k, v, spec=spec, scaling=scale)
    selector = _selector(method, head_dim)
    return lambda q, k, v, scale: loki.sparse_attention(q, k, v, selector=selector, spec=spec, scaling=scale)


@contextlib.contextmanager
def method_attention(model: nn.Module, cache: LokiCache, method: MethodSpec, *, sparse_prefill: bool = False,
                     scorer: DecodeScorer | None = None) -> Iterator[DecodeStats]:
    """Route the model's attention to `method` over `cache` while the block runs (see the module
    docstring); `scorer` replaces the method's decode scores (a test's selector). Yields the
    decode steps' kept fraction. The cache must hold keys in the method's basis (`loki_bases`)."""
    device = next(attention_modules(model)[0].parameters()).device
    stats = DecodeStats()
    dense = sdpa_attention()
    selector_of = decode_selector(method) if scorer is None else None
    low_rank = method.method in LOW_RANK and scorer is None and selector_of is None
    scorer = scorer if scorer is not None else scorer_for(method.method)
    decode = decode_backend(device) if low_rank else None

    def make_handler(module: nn.Module):
        layer_idx = module.layer_idx
        sparse = sparse_prefill and method.method != "full"

        def handler(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            q_rot = rotate_into(query, cache.basis(layer_idx))  # [B, H, Sq, D]
            if query.shape[2] > 1 or method.method == "full":
                if sparse and query.shape[2] > 1:
                    out = _prefill(method, query.shape[-1])(q_rot, key, value, scale)
                    return out.transpose(1, 2).to(query.dtype).contiguous(), None
                if query.shape[2] == 1:  # full decode: exact attention, each KV head read once
                    stats.add(torch.ones(query.shape[:2]))
                    b, h, s = query.shape[0], query.shape[1], key.shape[2]
                    probs = torch.softmax(grouped_scores(q_rot[:, :, 0], key) * scale, dim=-1)
                    out = (probs.reshape(b, key.shape[1], -1, s) @ value.float()).reshape(b, h, -1)
                    return out[:, None].to(query.dtype), None
                return dense(mod, q_rot, key, value, attention_mask, scaling=scale, dropout=dropout, **kwargs)
            b, h, s = query.shape[0], query.shape[1], key.shape[2]
            if selector_of is not None:
                selection = loki.SelectionStats()
                out = loki.sparse_attention(q_rot, key, value, selector=selector_of(query.shape[-1]), spec=method.loki, scaling=scale,
                                            stats=selection)[:, :, 0]
                stats.add_selection(selection)
            elif low_rank:
                lengths = torch.full((b,), s, dtype=torch.int32, device=query.device)
                out = decode(q_rot[:, :, 0], key, value, lengths, spec=method.loki, scaling=scale)
                stats.add(torch.full((b, h), min(s, method.loki.max_budget(s)) / s))
            else:
                budget = method.loki.max_budget(s)
                scores = scorer(layer_idx, q_rot[:, :, 0], key, scale, budget)
                out, keep = scored_decode(q_rot[:, :, 0], key, value, scores, spec=method.loki, scaling=scale)
                stats.add(keep.sum(-1).float().cpu() / s)
            return out[:, None].to(query.dtype), None  # [B, 1, H, D]

        return handler

    with route_attention(model, make_handler):
        yield stats
