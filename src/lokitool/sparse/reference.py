"""The pure-PyTorch reference of Loki and of the token selectors it is compared with.

This module is the oracle: every kernel and the model patch are tested against it. It favours
clarity over speed, but processes query rows in blocks so that memory stays O(block x keys).

One mechanism, several selectors (as kvpress's ScorerPress): a selector only says how to *score*
the causal keys of each query row; `select` keeps the top k_t of each row; `attend` runs exact
attention over the kept keys.

Shapes: q [B, H, Sq, D] (post-RoPE), k and v [B, Hkv, Sk, D]; query row i sits at absolute
position `Sk - Sq + i` (keys before it come from a cache) and sees keys 0..that position.

Loki (for a KV head with orthonormal basis P, directions as columns, and a dimension budget d):
    approximate score(q, k) = (q P)[:d] . (k P)[:d]        (no centering; q.k = qP.kP exactly)
Budgets per row at position t (t + 1 causal keys):
    per-row: k_t = max(1, floor(kf * (t + 1)))     what a decoder at context t + 1 keeps
    window:  k_t = min(t + 1, floor(kf * L))       the paper's perplexity code (L = window length)
Sinks: the first `sink` keys are always kept, inside the same budget k_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

Budget = Literal["per-row", "window"]
Group = Literal["head", "kv"]

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Budgets


def budget_per_row(positions: torch.Tensor, kf: float, mode: Budget, window: int) -> torch.Tensor:
    """Number of keys k_t kept by the row at each absolute position t: int64, same shape."""
    causal = positions + 1
    if mode == "per-row":
        k = torch.floor(kf * causal.to(torch.float64)).to(torch.int64)
        return k.clamp_min(1)
    if mode == "window":
        k = max(1, math.floor(kf * window))
        return causal.clamp_max(k)
    raise ValueError(f"unknown budget mode {mode!r}")


def dims_for(df: float, head_dim: int) -> int:
    """d = round(df x D), at least 1."""
    return max(1, min(head_dim, round(df * head_dim)))


# ----------------------------------------------------------------------------------------------
# Scoring: [B, H, b, D] query block x [B, Hkv, Sk, D] keys -> [B, H, b, Sk] scores


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, H, S, D], each KV head serving its group of query heads."""
    b, hkv, s, d = x.shape
    if hkv == num_heads:
        return x
    return x[:, :, None].expand(b, hkv, num_heads // hkv, s, d).reshape(b, num_heads, s, d)


def exact_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q.float() @ expand_kv(k, q.shape[1]).float().transpose(-1, -2)


def rotate(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [B, Hx, S, D] times the basis of its KV head; basis [Hkv, D, D] with directions as columns."""
    hx, hkv = x.shape[1], basis.shape[0]
    b, _, s, d = x.shape
    xg = x.float().reshape(b, hkv, (hx // hkv) * s, d)
    return (xg @ basis.float()).reshape(b, hx, s, d)


# ----------------------------------------------------------------------------------------------
# Selection and attention over a block of query rows


def causal_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[b, Sk] bool: key j visible from the row at absolute position t iff j <= t."""
    keys = torch.arange(num_keys, device=positions.device)
    return keys[None, :] <= positions[:, None]


def sum_groups(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, r, s] -> [B, Hkv, r, s]: the scores of each KV head's query heads summed."""
    b, h, r, s = scores.shape
    return scores.reshape(b, num_kv_heads, h // num_kv_heads, r, s).sum(2)


def group_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Shared selection per KV head: sum the scores of a group's query heads, broadcast back."""
    b, h, r, s = scores.shape
    summed = sum_groups(scores, num_kv_heads)[:, :, None]
    return summed.expand(b, num_kv_heads, h // num_kv_heads, r, s).reshape(b, h, r, s)


def select(scores: torch.Tensor, positions: torch.Tensor, budgets: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """Keep, per row, the `budgets[row]` causal keys with the largest scores, the first `sink` keys
    (earliest first) always among them. scores [B, H, b, Sk], positions/budgets [b] -> keep [B, H, b, Sk]."""
    num_keys = scores.shape[-1]
    visible = causal_mask(positions, num_keys)  # [b, Sk]
    keys = torch.arange(num_keys, device=scores.device)
    sinks = visible & (keys[None, :] < torch.clamp(budgets, max=sink)[:, None])  # [b, Sk]
    rest = budgets - sinks.sum(-1)  # budget left for scored keys
    scores = scores.masked_fill(~visible | sinks, NEG_INF)
    kmax = int(rest.max())
    top = scores.topk(kmax, dim=-1).indices  # [B, H, b, kmax], best first
    rank_ok = torch.arange(kmax, device=scores.device)[None, :] < rest[:, None]  # [b, kmax]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, top, rank_ok.expand_as(top))
    return (keep & visible) | sinks


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scaling: float, exact: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact attention over kept keys: softmax in float32. Returns [B, H, b, D] float32.
    `exact` may pass q.k already computed for this block."""
    scores = (exact_scores(q, k) if exact is None else exact) * scaling
    scores = scores.masked_fill(~keep, NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    return probs @ expand_kv(v, q.shape[1]).float()


# ----------------------------------------------------------------------------------------------
# Selectors


@dataclass(frozen=True)
class Selector:
    """How one method scores keys: `prepare(k)` once per layer call (e.g. rotate and truncate the
    keys), then `score(q_block, prepared)` -> [B, H, b, Sk]. `score` None keeps every causal key."""

    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda k: k
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def loki_selector(basis: torch.Tensor, d: int, name: str = "loki") -> Selector:
    """basis [Hkv, D, D], directions as columns; scores read the first d rotated dimensions."""

    def score(q: torch.Tensor, k_low: torch.Tensor) -> torch.Tensor:
        q_low = rotate(q, basis)[..., :d]
        return q_low @ expand_kv(k_low, q.shape[1]).transpose(-1, -2)

    return Selector(name, prepare=lambda k: rotate(k, basis)[..., :d], score=score)


def exact_topk_selector() -> Selector:
    return Selector("exact-topk", score=exact_scores)


def full_selector() -> Selector:
    return Selector("full")


# ----------------------------------------------------------------------------------------------
# The reference over a whole layer


@dataclass
class SelectionStats:
    """Running sums for reporting: kept fraction of causal keys, and Jaccard overlap with exact top-k."""

    rows: int = 0
    kept_fraction: float = 0.0
    jaccard: float = 0.0
    jaccard_rows: int = 0

    def add(self, keep: torch.Tensor, positions: torch.Tensor, exact_keep: torch.Tensor | None) -> None:
        n_rows = keep.numel() // keep.shape[-1]
        causal = (positions + 1).to(torch.float64)  # [b]
        kept = keep.sum(-1).to(torch.float64)  # [B, H, b]
        self.kept_fraction += float((kept / causal).sum())
        self.rows += n_rows
        if exact_keep is not None:
            inter = (keep & exact_keep).sum(-1).to(torch.float64)
            union = (keep | exact_keep).sum(-1).to(torch.float64)
            self.jaccard += float((inter / union.clamp_min(1)).sum())
            self.jaccard_rows += n_rows

    @property
    def mean_kept_fraction(self) -> float:
        return self.kept_fraction / max(self.rows, 1)

    @property
    def mean_jaccard(self) -> float | None:
        return self.jaccard / self.jaccard_rows if self.jaccard_rows else None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    selector: Selector,
    kf: float,
    scaling: float,
    budget: Budget = "per-row",
    sink: int = 0,
    group: Group = "head",
    block_rows: int = 512,
    stats: SelectionStats | None = None,
    compare_exact: bool = False,
) -> torch.Tensor:
    """Attention of q [B, H, Sq, D] over causal keys k, v [B, Hkv, Sk, D] where each query row keeps
    only the top-k_t keys by `selector`'s scores. Returns [B, H, Sq, D] float32.

    With `stats`, records the kept fraction and (with `compare_exact`) the Jaccard overlap of each
    row's kept set with the exact top-k set of the same size.
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    hkv = k.shape[1]
    out = torch.empty(b, h, sq, v.shape[-1], dtype=torch.float32, device=q.device)
    offset = sk - sq
    prepared = selector.prepare(k) if selector.score is not None else None
    for start in range(0, sq, block_rows):
        stop = min(sq, start + block_rows)
        qb = q[:, :, start:stop]
        positions = torch.arange(start + offset, stop + offset, device=q.device)
        if selector.score is None:
            keep = causal_mask(positions, sk).expand(b, h, -1, -1)
        else:
            budgets = budget_per_row(positions, kf, budget, sk)
            scores = selector.score(qb, prepared)
            if group == "kv":
                scores = group_scores(scores, hkv)
            keep = select(scores, positions, budgets, sink)
        exact = exact_scores(qb, k)
        exact_keep = None
        if stats is not None and compare_exact and selector.score is not None:
            ranking = group_scores(exact, hkv) if group == "kv" else exact
            exact_keep = select(ranking, positions, budget_per_row(positions, kf, budget, sk), sink)
        if stats is not None:
            stats.add(keep, positions, exact_keep)
        out[:, :, start:stop] = attend(qb, k, v, keep, scaling, exact)
    return out


def h2o_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kf: float,
    scaling: float,
    budget: Budget = "per-row",
    sink: int = 0,
    block_rows: int = 256,
    stats: SelectionStats | None = None,
) -> torch.Tensor:
    """H2O-style selection with the same budget: half of k_t the most recent keys, the other half
    the heavy hitters by attention mass accumulated over all earlier rows (computed with full
    attention, i.e. the idealised H2O of the Loki paper's perplexity comparison)."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    offset = sk - sq
    out = torch.empty(b, h, sq, v.shape[-1], dtype=torch.float32, device=q.device)
    mass = torch.zeros(b, h, sk, dtype=torch.float32, device=q.device)  # attention received so far
    for start in range(0, sq, block_rows):
        stop = min(sq, start + block_rows)
        qb = q[:, :, start:stop]
        positions = torch.arange(start + offset, stop + offset, device=q.device)
        visible = causal_mask(positions, sk)
        full = torch.softmax((exact_scores(qb, k) * scaling).masked_fill(~visible, NEG_INF), dim=-1)
        cumulative = mass[:, :, None, :] + full.cumsum(dim=2)  # mass seen up to and including each row
        mass = cumulative[:, :, -1]
        budgets = budget_per_row(positions, kf, budget, sk)
        recent = budgets // 2
        keys = torch.arange(sk, device=q.device)
        is_recent = (keys[None, :] > positions[:, None] - recent[:, None]) & visible  # [b, Sk]
        heavy = cumulative.masked_fill(is_recent, math.inf)  # recent keys first, then heaviest
        keep = select(heavy, positions, budgets, sink)
        if stats is not None:
            stats.add(keep, positions, None)
        out[:, :, start:stop] = attend(qb, k, v, keep, scaling)
    return out


# ----------------------------------------------------------------------------------------------
# Decode: one query per sequence over a cache of pre-rotated keys (the kernels' oracle)


def decode_budget(lengths: torch.Tensor, kf: float) -> torch.Tensor:
    """k = max(1, floor(kf x length)) per sequence: the per-row budget of the newest token."""
    return budget_per_row(lengths - 1, kf, "per-row", 0)


def decode_select(
    q_rot: torch.Tensor, k_rot: torch.Tensor, lengths: torch.Tensor, *, d: int, kf: float, group: Group = "head"
) -> torch.Tensor:
    """Kept key indices per (sequence, head) at decode time, as a keep mask [B, H, S] (bool).

    q_rot [B, H, D] and k_rot [B, Hkv, S, D] are already in the PCA basis; only the first d dims
    are scored; sequence i holds lengths[i] valid keys (the rest of S is padding)."""
    b, h, _ = q_rot.shape
    s = k_rot.shape[2]
    scores = (q_rot[:, :, None, :d].float() @ expand_kv(k_rot[..., :d], h).float().transpose(-1, -2))[:, :, 0]
    if group == "kv":
        scores = group_scores(scores[:, :, None], k_rot.shape[1])[:, :, 0]
    valid = torch.arange(s, device=q_rot.device)[None, :] < lengths[:, None]  # [B, S]
    scores = scores.masked_fill(~valid[:, None], NEG_INF)
    budgets = decode_budget(lengths, kf)  # [B]
    top = scores.topk(int(budgets.max()), dim=-1).indices
    rank_ok = torch.arange(top.shape[-1], device=q_rot.device)[None, :] < budgets[:, None]  # [B, kmax]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, top, rank_ok[:, None].expand_as(top))
    return keep & valid[:, None]


def decode_attention(
    q_rot: torch.Tensor,
    k_rot: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    d: int,
    kf: float,
    scaling: float,
    group: Group = "head",
) -> torch.Tensor:
    """Loki decode step over a rotated cache: [B, H, D] float32 output."""
    keep = decode_select(q_rot, k_rot, lengths, d=d, kf=kf, group=group)
    return attend(q_rot[:, :, None], k_rot, v, keep[:, :, None], scaling)[:, :, 0]
