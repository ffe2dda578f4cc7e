"""The pure-PyTorch reference of Loki and of the token selectors it is compared with.

This module is the oracle: every kernel and the model patch are tested against it. It favours
clarity over speed, but processes query rows in blocks so that memory stays O(block x keys).

`LokiSpec` is the one owner of Loki's settings (budgets, d, basis, sinks, groups): it validates
them once, and every path (eval, generate, the benchmarks, the kernel wrappers) takes it.

One mechanism, several selectors (as kvpress's ScorerPress): a selector only says how to *score*
the causal keys of each query row; `select` keeps the top k_t of each row; `attend` runs exact
attention over the kept keys.

Shapes: q [B, H, Sq, D] (post-RoPE), k and v [B, Hkv, Sk, D]; query row i sits at absolute
position `Sk - Sq + i` (keys before it come from a cache) and sees keys 0..that position, or
what a `mask` (bool [B or 1, 1 or H, Sq, Sk], True = visible) says it sees: the model's own mask,
with its sliding window or padding. Loki selects among the visible keys only.

Loki (for a KV head with orthonormal basis P, directions as columns, and a dimension budget d):
    approximate score(q, k) = (q P)[:d] . (k P)[:d]        (no centering; q.k = qP.kP exactly)
    d = round(df x D), halves rounded up, at least 1
Budgets per row that sees n keys (n = t + 1 under a causal mask, at most the window on a sliding layer):
    per-row: k = max(1, floor(kf * n))             what a decoder at context n keeps
    window:  k = min(n, max(1, floor(kf * L)))     the paper's perplexity code (L = the most keys any
                                                   row sees: the window length, or a sliding window)
Sinks: the first `sink` visible keys are always kept, inside the same budget k.
Exact attention over the kept keys follows the model's attention: `scaling`, then tanh soft-capping
(`softcap`, Gemma 2), then softmax, with learned per-head sink logits in the normaliser (`sink_logits`,
gpt-oss's `s_aux`). Soft-capping is monotonic, so it never changes which keys are selected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..errors import UserError

Budget = Literal["per-row", "window"]
Group = Literal["head", "kv", "union"]
BUDGETS = ("per-row", "window")
GROUPS = ("head", "kv", "union")
# Bases a Loki run can rotate into: PCA of the keys before / after RoPE, the query-aware fits of
# each (sparse/bases.py), the selection-aware fit after RoPE, and a Haar-random basis (what any basis must beat).
BASES = ("pre", "post", "qa-pre", "qa-post", "sa-post", "random")

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Settings and budgets


def dims_for(df: float, head_dim: int) -> int:
    """d = round(df x D) with halves rounded up, clamped to [1, D]: the one rounding rule."""
    return max(1, min(head_dim, math.floor(df * head_dim + 0.5)))


def token_budget(visible: torch.Tensor, kf: float, mode: Budget = "per-row", window: int | None = None) -> torch.Tensor:
    """Keys kept by a row that sees `visible` keys (int tensor, any shape): int64, same shape.
    per-row: max(1, floor(kf x visible)); window: min(visible, max(1, floor(kf x window)))."""
    if mode == "per-row":
        return torch.floor(kf * visible.to(torch.float64)).to(torch.int64).clamp_min(1)
    if mode == "window":
        if window is None:
            raise ValueError("window budgets need the window length")
        return visible.to(torch.int64).clamp_max(max(1, math.floor(kf * window)))
    raise ValueError(f"unknown budget mode {mode!r}")


@dataclass(frozen=True)
class LokiSpec:
    """Loki's settings, validated once.

    kf: fraction of visible keys kept per row; df: fraction of head dims scored (d = dims(D)), or
    `variance`: d per layer as the rank at this explained-variance threshold (exactly one of the two
    for low-rank selection; neither matters to selectors that score with all dims); basis: what
    keys and queries are rotated into; budget: per-row or window; sink: first keys always kept;
    group: one selection per query head (head), or one per KV head from its query heads' scores
    summed (kv) or their kept lists taken in turns (union: see `union_scores`)."""

    kf: float = 0.25
    df: float | None = 0.25
    variance: float | None = None
    basis: str = "post"
    budget: Budget = "per-row"
    sink: int = 0
    group: Group = "head"

    def __post_init__(self) -> None:
        for name in ("kf", "df", "variance"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise UserError(f"--{name} must be in (0, 1], got {value}")
        if self.df is not None and self.variance is not None:
            raise UserError("give one of --df and --variance, not both")
        if self.basis not in BASES:
            raise UserError(f"unknown basis {self.basis!r}; choose from {', '.join(BASES)}")
        if self.budget not in BUDGETS:
            raise UserError(f"--budget must be per-row or window, got {self.budget!r}")
        if self.group not in GROUPS:
            raise UserError(f"--group must be one of {', '.join(GROUPS)}, got {self.group!r}")
        if self.sink < 0:
            raise UserError(f"--sink must be >= 0, got {self.sink}")

    def for_decoding(self) -> "LokiSpec":
        """This spec, refused in one line if decoding cannot run it (union groups are eval's only)."""
        if self.group == "union":
            raise UserError("--group union is eval's only; decoding (generate, bench, the kernels) selects per head or kv")
        return self

    def dims(self, head_dim: int) -> int:
        """d scored dims for a head dimension D (a fixed df; `variance` gives d per layer instead)."""
        if self.df is None:
            raise ValueError("this spec sets d per layer by --variance, not by --df")
        return dims_for(self.df, head_dim)

    def budgets(self, visible: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """k per row from the number of keys each row sees (see `token_budget`)."""
        return token_budget(visible, self.kf, self.budget, window)

    def max_budget(self, num_keys: int) -> int:
        """The largest k any row over at most `num_keys` keys keeps (per-row budgets)."""
        return max(1, math.floor(self.kf * num_keys))


def budget_per_row(positions: torch.Tensor, kf: float, mode: Budget, window: int) -> torch.Tensor:
    """k_t of the row at each absolute position t under a causal mask (t + 1 visible keys)."""
    return token_budget(positions + 1, kf, mode, window)


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


def truncated_scores(q_rot: torch.Tensor, k_rot: torch.Tensor, d: int) -> torch.Tensor:
    """Loki's approximate scores, float32: q_rot [B, H, b, D] against the first d dims of the rotated
    keys k_rot [B, Hkv, S, >= d] -> [B, H, b, S]. Every reference path scores through this."""
    return q_rot[..., :d].float() @ expand_kv(k_rot[..., :d], q_rot.shape[1]).float().transpose(-1, -2)


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


def union_scores(scores: torch.Tensor, num_kv_heads: int, visible: torch.Tensor) -> torch.Tensor:
    """Shared selection per KV head by turns (group union): [B, H, b, Sk] scores -> [B, H, b, Sk] float64
    whose top-k is, for any k, every query head's best visible key, then every head's second best, ...
    (a key already taken is skipped; within a turn the lower head goes first). visible: bool,
    broadcastable to scores."""
    b, h, rows, sk = scores.shape
    g = h // num_kv_heads
    order = scores.masked_fill(~visible, NEG_INF).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(sk, device=scores.device).expand_as(order))
    turn = rank.reshape(b, num_kv_heads, g, rows, sk) * g + torch.arange(g, device=scores.device)[:, None, None]
    first = turn[:, :, 0]
    for i in range(1, g):  # the min over the group, slice by slice: amin over a middle dim is slow on CPU
        first = torch.minimum(first, turn[:, :, i])
    first = first[:, :, None].expand(b, num_kv_heads, g, rows, sk).reshape(b, h, rows, sk)
    return -first.double()


def shared_scores(scores: torch.Tensor, group: Group, num_kv_heads: int, visible: torch.Tensor) -> torch.Tensor:
    """The scores `select` ranks under a group mode: as they are (head), summed (kv) or by turns (union)."""
    if group == "kv":
        return group_scores(scores, num_kv_heads)
    if group == "union":
        return union_scores(scores, num_kv_heads, visible)
    return scores


def select_visible(scores: torch.Tensor, visible: torch.Tensor, budgets: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """Keep, per row, the `budgets` visible keys with the largest scores, the first `sink` visible keys
    always among them. scores [B, H, b, Sk]; visible bool broadcastable to it ([b, Sk] or
    [B or 1, 1 or H, b, Sk]); budgets broadcastable to [B, H, b] -> keep [B, H, b, Sk]."""
    rank = visible.cumsum(-1)  # 1-based rank of each key among its row's visible keys
    sinks = visible & (rank <= torch.clamp(budgets, max=sink)[..., None])
    rest = budgets - sinks.sum(-1)  # budget left for scored keys
    scores = scores.masked_fill(~visible | sinks, NEG_INF)
    kmax = int(rest.max())
    top = scores.topk(kmax, dim=-1).indices  # [B, H, b, kmax], best first
    rank_ok = torch.arange(kmax, device=scores.device) < rest[..., None]  # [.., b, kmax]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, top, rank_ok.expand_as(top))
    return (keep & visible) | sinks


def select(scores: torch.Tensor, positions: torch.Tensor, budgets: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """`select_visible` under a plain causal mask: positions/budgets [b] -> keep [B, H, b, Sk]."""
    return select_visible(scores, causal_mask(positions, scores.shape[-1]), budgets, sink)


def visible_budgets(spec: "LokiSpec", visible: torch.Tensor, widest: int) -> torch.Tensor:
    """k per row from the number of keys it sees (the window and the mask, not t + 1): [.., b] int64.
    `widest`: the most keys any row of the layer sees (window budgets take kf of it: the sequence
    length under a causal mask, the window on a sliding layer)."""
    return spec.budgets(visible.sum(-1), window=widest)


def widest_row(mask: torch.Tensor | None, num_keys: int) -> int:
    """The most keys any query row sees: all `num_keys` under a causal mask, else from the mask."""
    return num_keys if mask is None else max(1, int(mask.sum(-1).max()))


def attention_logits(scores: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """q.k -> the logits the model's softmax sees: scaled, then soft-capped as tanh(x / c) x c."""
    scores = scores * scaling
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def softmax_with_sinks(logits: torch.Tensor, sink_logits: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim; sink_logits [H] (one learned logit per head, gpt-oss) join the
    normaliser and take their share of the mass to nowhere. logits [B, H, b, S]."""
    if sink_logits is None:
        return torch.softmax(logits, dim=-1)
    b, h, r, _ = logits.shape
    sinks = sink_logits.float().reshape(1, h, 1, 1).expand(b, h, r, 1)
    return torch.softmax(torch.cat([logits, sinks], dim=-1), dim=-1)[..., :-1]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    scaling: float,
    exact: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over kept keys: softmax in float32. Returns [B, H, b, D] float32.
    `exact` may pass q.k already computed for this block."""
    scores = attention_logits(exact_scores(q, k) if exact is None else exact, scaling, softcap)
    scores = scores.masked_fill(~keep, NEG_INF)
    probs = softmax_with_sinks(scores, sink_logits)
    return probs @ expand_kv(v, q.shape[1]).float()


# ----------------------------------------------------------------------------------------------
# Selectors


@dataclass(frozen=True)
class Selector:
    """How one method scores keys: `prepare(k)` once per layer call (e.g. rotate and truncate the
    keys), then `score(q_block, prepared)` -> [B, H, b, Sk]. `score` None keeps every causal key.
    positional: `score(q_block, prepared, positions)`, for scores that depend on the row's position
    (Quest's partial last page)."""

    name: str
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda k: k
    score: Callable[..., torch.Tensor] | None = None
    positional: bool = False


def loki_selector(basis: torch.Tensor, d: int, name: str = "loki") -> Selector:
    """basis [Hkv, D, D], directions as columns; scores read the first d rotated dimensions."""

    return Selector(name, prepare=lambda k: rotate(k, basis)[..., :d], score=lambda q, k_low: truncated_scores(rotate(q, basis), k_low, d))


def rotated_selector(d: int) -> Selector:
    """Loki's selector for queries and keys that are already in the basis (the Loki cache's keys)."""
    return Selector("loki", prepare=lambda k: k[..., :d], score=lambda q, k_low: truncated_scores(q, k_low, d))


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

    def add(
        self, keep: torch.Tensor, positions: torch.Tensor, exact_keep: torch.Tensor | None, visible: torch.Tensor | None = None
    ) -> None:
        """keep [B, H, b, Sk]; the fraction is of the keys each row sees: `visible` (bool, broadcastable
        to keep) where given, else the t + 1 causal keys of the rows at `positions` [b]."""
        n_rows = keep.numel() // keep.shape[-1]
        seen = (positions + 1) if visible is None else visible.sum(-1)
        kept = keep.sum(-1).to(torch.float64)  # [B, H, b]
        self.kept_fraction += float((kept / seen.to(torch.float64).clamp_min(1)).expand_as(kept).sum())
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


def block_visible(mask: torch.Tensor | None, positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The visible keys of a block of query rows: the mask's rows for it ([B or 1, 1 or H, b, Sk]), or
    the causal mask of the rows at `positions` ([1, 1, b, Sk]) when there is no mask."""
    if mask is None:
        return causal_mask(positions, num_keys)[None, None]
    offset = num_keys - mask.shape[-2]
    return mask[:, :, positions[0] - offset : positions[-1] + 1 - offset]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    selector: Selector,
    spec: LokiSpec,
    scaling: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
    block_rows: int = 512,
    stats: SelectionStats | None = None,
    compare_exact: bool = False,
) -> torch.Tensor:
    """Attention of q [B, H, Sq, D] over the visible keys k, v [B, Hkv, Sk, D] (causal, or `mask`:
    bool [B or 1, 1 or H, Sq, Sk]) where each query row keeps only the top-k keys by `selector`'s
    scores, k from the number of keys it sees (budgets, sinks and groups from `spec`). Returns
    [B, H, Sq, D] float32. `softcap` and `sink_logits` [H] shape the softmax as the model's does.

    With `stats`, records the kept fraction and (with `compare_exact`) the Jaccard overlap of each
    row's kept set with the exact top-k set of the same size.
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    hkv = k.shape[1]
    out = torch.empty(b, h, sq, v.shape[-1], dtype=torch.float32, device=q.device)
    offset = sk - sq
    prepared = selector.prepare(k) if selector.score is not None else None
    widest = widest_row(mask, sk)
    for start in range(0, sq, block_rows):
        stop = min(sq, start + block_rows)
        qb = q[:, :, start:stop]
        positions = torch.arange(start + offset, stop + offset, device=q.device)
        visible = block_visible(mask, positions, sk)  # [B or 1, 1 or H, b, Sk]
        budgets = visible_budgets(spec, visible, widest)
        if selector.score is None:
            keep = visible.expand(b, h, -1, -1)
        else:
            scores = selector.score(qb, prepared, positions) if selector.positional else selector.score(qb, prepared)
            scores = shared_scores(scores, spec.group, hkv, visible)
            keep = select_visible(scores, visible, budgets, spec.sink)
        exact = exact_scores(qb, k)
        exact_keep = None
        if stats is not None and compare_exact and selector.score is not None:
            ranking = shared_scores(exact, spec.group, hkv, visible)
            exact_keep = select_visible(ranking, visible, budgets, spec.sink)
        if stats is not None:
            stats.add(keep, positions, exact_keep, visible)
        out[:, :, start:stop] = attend(qb, k, v, keep, scaling, exact, softcap=softcap, sink_logits=sink_logits)
    return out


def h2o_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    spec: LokiSpec,
    scaling: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
    block_rows: int = 256,
    stats: SelectionStats | None = None,
) -> torch.Tensor:
    """H2O-style selection with the same budget: half of k the most recent visible keys, the other
    half the heavy hitters by attention mass accumulated over all earlier rows (computed with full
    attention over the visible keys, i.e. the idealised H2O of the Loki paper's perplexity comparison)."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    offset = sk - sq
    out = torch.empty(b, h, sq, v.shape[-1], dtype=torch.float32, device=q.device)
    mass = torch.zeros(b, h, sk, dtype=torch.float32, device=q.device)  # attention received so far
    widest = widest_row(mask, sk)
    for start in range(0, sq, block_rows):
        stop = min(sq, start + block_rows)
        qb = q[:, :, start:stop]
        positions = torch.arange(start + offset, stop + offset, device=q.device)
        visible = block_visible(mask, positions, sk)
        logits = attention_logits(exact_scores(qb, k), scaling, softcap).masked_fill(~visible, NEG_INF)
        full = softmax_with_sinks(logits, sink_logits)
        cumulative = mass[:, :, None, :] + full.cumsum(dim=2)  # mass seen up to and including each row
        mass = cumulative[:, :, -1]
        budgets = visible_budgets(spec, visible, widest)
        recent = budgets // 2
        from_end = visible.flip(-1).cumsum(-1).flip(-1)  # 1 for the newest visible key, 2 for the next...
        is_recent = visible & (from_end <= recent[..., None])
        heavy = cumulative.masked_fill(is_recent, math.inf)  # recent keys first, then heaviest
        keep = select_visible(heavy, visible, budgets, spec.sink)
        if stats is not None:
            stats.add(keep, positions, None, visible)
        out[:, :, start:stop] = attend(qb, k, v, keep, scaling, softcap=softcap, sink_logits=sink_logits)
    return out


# ----------------------------------------------------------------------------------------------
# Decode: one query per sequence over a cache of pre-rotated keys (the kernels' oracle and the
# benchmark's plain-torch baseline), in the three stages the kernels have.


def decode_budget(lengths: torch.Tensor, kf: float) -> torch.Tensor:
    """k = max(1, floor(kf x length)) per sequence: the per-row budget of the newest token."""
    return token_budget(lengths, kf)


def decode_scores(q_rot: torch.Tensor, k_rot: torch.Tensor, *, d: int, group: Group = "head") -> torch.Tensor:
    """[B, R, S] float32 truncated scores of q_rot [B, H, D] over k_rot [B, Hkv, S, >= d]; R = H, or
    Hkv with the group's scores summed (group kv)."""
    if group == "union":
        raise UserError("--group union is eval's only; decoding (generate, bench, the kernels) selects per head or kv")
    scores = truncated_scores(q_rot[:, :, None], k_rot, d)  # [B, H, 1, S]
    if group == "kv":
        scores = sum_groups(scores, k_rot.shape[1])
    return scores[:, :, 0]


def decode_topk(scores: torch.Tensor, lengths: torch.Tensor, kmax: int) -> torch.Tensor:
    """Top-kmax token indices [B, R, kmax] (best first) among the first lengths[b] tokens of each row."""
    valid = torch.arange(scores.shape[-1], device=scores.device)[None, :] < lengths[:, None]  # [B, S]
    return scores.masked_fill(~valid[:, None], NEG_INF).topk(kmax, dim=-1).indices


def decode_gather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top: torch.Tensor, budgets: torch.Tensor, *, scaling: float, group: Group
) -> torch.Tensor:
    """Exact attention of q [B, H, D] over the first budgets[b] listed rows top [B, R, kmax] of
    k, v [B, Hkv, S, D], gathered: [B, H, D] float32 (softmax in float32)."""
    b, h, dim = q.shape
    hkv, s = k.shape[1], k.shape[2]
    rows, kmax = top.shape[1], top.shape[2]
    arange = torch.arange(rows, device=q.device)
    kv_head = arange // (h // hkv) if group == "head" else arange
    flat = (torch.arange(b, device=q.device)[:, None, None] * hkv + kv_head[None, :, None]) * s + top  # [B, R, kmax]
    k_sel = k.reshape(-1, dim)[flat].float()  # [B, R, kmax, D]
    v_sel = v.reshape(-1, dim)[flat].float()
    listed = torch.arange(kmax, device=q.device)[None, :] < budgets[:, None]  # [B, kmax]
    qg = q.float().reshape(b, rows, h // rows, dim)
    scores = (qg @ k_sel.transpose(-1, -2)) * scaling  # [B, R, H/R, kmax]
    probs = torch.softmax(scores.masked_fill(~listed[:, None, None, :], NEG_INF), dim=-1)
    return (probs @ v_sel).reshape(b, h, dim)


def decode_select(q_rot: torch.Tensor, k_rot: torch.Tensor, lengths: torch.Tensor, *, spec: LokiSpec) -> torch.Tensor:
    """The kept keys of each (sequence, query head) at decode time as a mask [B, H, S] (bool).

    q_rot [B, H, D] and k_rot [B, Hkv, S, D] are already in the basis; the first spec.dims(D) dims
    are scored; sequence b holds lengths[b] valid keys (the rest of S is padding)."""
    h = q_rot.shape[1]
    scores = decode_scores(q_rot, k_rot, d=spec.dims(q_rot.shape[-1]), group=spec.group)
    budgets = decode_budget(lengths, spec.kf)  # [B]
    top = decode_topk(scores, lengths, int(budgets.max()))
    listed = torch.arange(top.shape[-1], device=q_rot.device)[None, :] < budgets[:, None]  # [B, kmax]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, top, listed[:, None].expand_as(top))
    return expand_kv(keep[..., None], h)[..., 0] if spec.group == "kv" else keep


def decode_attention(
    q_rot: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, spec: LokiSpec, scaling: float
) -> torch.Tensor:
    """Loki decode step over a rotated cache: [B, H, D] float32 output."""
    budgets = decode_budget(lengths, spec.kf)
    scores = decode_scores(q_rot, k_rot, d=spec.dims(q_rot.shape[-1]), group=spec.group)
    top = decode_topk(scores, lengths, spec.max_budget(k_rot.shape[2]))
    return decode_gather_attention(q_rot, k_rot, v, top, budgets, scaling=scaling, group=spec.group)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """Full attention of one query per sequence, q [B, H, D], over the first lengths[b] rows of
    k, v [B, Hkv, S, D]: [B, H, D] float32 (the oracle of kernels/decode_full.py, and its CPU path)."""
    h = q.shape[1]
    logits = torch.einsum("bhd,bhsd->bhs", q.float(), expand_kv(k, h).float()) * scaling  # [B, H, S]
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [B, S]
    weights = logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhs,bhsd->bhd", weights, expand_kv(v, h).float())
