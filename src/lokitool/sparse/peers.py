"""Loki's peers in the reference's selector family, the `union` group mode, and the byte model that
puts every method at equal bytes per decode step.

Each peer only says how to score the causal keys of a query row (reference.Selector); budgets,
sinks, groups and exact attention over the kept keys are the reference's, as for Loki.

SparQ (Ribar et al. 2024): per query row and head, the r dims with the largest |q_i| are the only
    components of the keys read: score = sum over those i of q_i k_i. No calibration. With a
    selection shared by a KV group (group kv or union) the r dims are chosen once per KV head by
    the group's summed |q_i|, so that K is read once. (SparQ's mean-value correction is not here.)
Quest (Tang et al. 2024): keys in pages of P tokens; per page the elementwise min m and max M of its
    keys bound q.k from above: sum_i max(q_i m_i, q_i M_i). Every token scores its page's bound, so
    that `select` keeps whole pages, best bound first; the row's own page is partial (its bound over
    the keys up to the row, as a decoder's page metadata would be), and the page where the budget
    runs out keeps its newest tokens.
Double Sparsity (Yang et al. 2024): r outlier channels per KV head fixed offline; score = sum over
    those channels of q_i k_i. The paper ranks channels by mean |q_i k_i| on calibration data; a
    calibration file holds E[q q^T] and E[k k^T] but not E|q_i k_i|, so channels are ranked by
    sqrt(E[q_i^2] E[k_i^2]), the Cauchy-Schwarz bound of E|q_i k_i|. Scoring on r channels is Loki's
    truncated score in a basis of coordinate axes (a permutation), which is how it runs here.

The `union` group mode (one kept set per KV head from its query heads' lists in turns, for GQA) is
the reference's (reference.union_scores), beside `head` and `kv`.

Bytes per decode step, relative to full attention, with bench's byte model (K and V are 1 together;
bench/kernels.py): scoring reads 0.5 x scan of the keys (scan: dims read / D, Quest 2 / P (min and
max per page of P), exact top-k 1); attention reads the kept K and V rows: rows x kf, rows = 1 for a
selection shared per KV head (kv, union) and G = H / Hkv for one per query head (group head on a GQA
model reads up to G different kept sets of each KV head; H2O always selects per query head).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .reference import Selector, expand_kv, truncated_scores

DEFAULT_PAGE = 16
# Methods whose scoring reads d = df x D dims of the keys (per KV head; SparQ per query head under group head).
DIM_SCANNERS = ("loki", "random-basis", "double-sparsity", "sparq")


# ----------------------------------------------------------------------------------------------
# SparQ


def top_magnitude_dims(q: torch.Tensor, r: int, num_kv_heads: int | None = None) -> torch.Tensor:
    """[B, H, b, D] -> bool [B, H, b, D]: the r dims of largest |q_i| per row (num_kv_heads given:
    chosen once per KV head by the summed |q_i| of its query heads, broadcast back)."""
    mag = q.float().abs()
    b, h, rows, d = mag.shape
    if num_kv_heads is not None:
        mag = mag.reshape(b, num_kv_heads, h // num_kv_heads, rows, d).sum(2)
    chosen = torch.zeros_like(mag, dtype=torch.bool).scatter_(-1, mag.topk(r, dim=-1).indices, True)
    return expand_kv(chosen, h) if num_kv_heads is not None else chosen


def sparq_selector(r: int, shared: bool = False) -> Selector:
    """SparQ's approximate scores on the r largest-|q| dims of each row; shared: dims chosen per KV head."""

    def score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q_r = q.float() * top_magnitude_dims(q, r, k.shape[1] if shared else None)  # other dims add exactly 0
        return q_r @ expand_kv(k, q.shape[1]).float().transpose(-1, -2)

    return Selector("sparq", score=score)


# ----------------------------------------------------------------------------------------------
# Quest


def page_extremes(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [B, Hkv, S, D] -> per-page min and max [B, Hkv, S/P, D] (last page over the keys it has), and
    the running min and max within each page up to each key [B, Hkv, S, D] (a partial page's extremes)."""
    b, hkv, s, d = k.shape
    pages = -(-s // page)
    k = k.float()
    pad = pages * page - s
    lo = torch.cat([k, k.new_full((b, hkv, pad, d), float("inf"))], 2).reshape(b, hkv, pages, page, d)
    hi = torch.cat([k, k.new_full((b, hkv, pad, d), float("-inf"))], 2).reshape(b, hkv, pages, page, d)
    run_lo = lo.cummin(3).values.reshape(b, hkv, pages * page, d)[:, :, :s]
    run_hi = hi.cummax(3).values.reshape(b, hkv, pages * page, d)[:, :, :s]
    return lo.amin(3), hi.amax(3), run_lo, run_hi


def upper_bound(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """sum_i max(q_i lo_i, q_i hi_i) of q [..., D] against lo, hi [..., D] (broadcast), float32."""
    return (q.clamp_min(0) * hi + q.clamp_max(0) * lo).sum(-1)


def newest_first(bound: torch.Tensor, page: int) -> torch.Tensor:
    """float64 token scores: the float32 page bound plus less than a quarter of its float32 spacing,
    growing with the token's place in its page. Distinct bounds keep their order; the tokens of one
    page rank newest first, so the page where the budget runs out keeps its newest tokens."""
    spacing = (torch.nextafter(bound, torch.full_like(bound, float("inf"))) - bound).double()
    place = (torch.arange(bound.shape[-1], device=bound.device) % page).double() / page  # [Sk] in [0, 1)
    return bound.double() + spacing * place / 4


def quest_selector(page: int = DEFAULT_PAGE) -> Selector:
    """Quest's page bounds as token scores (positional: the row's own page is partial)."""

    def score(q: torch.Tensor, prepared, positions: torch.Tensor) -> torch.Tensor:
        lo, hi, run_lo, run_hi = prepared
        h = q.shape[1]
        qf = q.float()  # [B, H, b, D]
        full = qf.clamp_min(0) @ expand_kv(hi, h).transpose(-1, -2) + qf.clamp_max(0) @ expand_kv(lo, h).transpose(-1, -2)
        sk = run_lo.shape[2]
        page_of = torch.arange(sk, device=q.device) // page  # [Sk]
        bound = full[..., page_of]  # [B, H, b, Sk]: each token its page's bound
        own = upper_bound(qf, expand_kv(run_lo[:, :, positions], h), expand_kv(run_hi[:, :, positions], h))  # [B, H, b]
        in_own = page_of[None, :] == (positions // page)[:, None]  # [b, Sk]
        bound = torch.where(in_own, own[..., None], bound)
        return newest_first(bound, page)

    return Selector("quest", prepare=lambda k: page_extremes(k, page), score=score, positional=True)


# ----------------------------------------------------------------------------------------------
# Double Sparsity


def outlier_channels(calibration, kind: str = "post") -> torch.Tensor:
    """Channels per (layer, KV head) ranked by sqrt(E[q_i^2] E[k_i^2]), largest first: [L, Hkv, D] int64.
    (The Cauchy-Schwarz bound of E|q_i k_i|, which Double Sparsity ranks by; the file lacks the latter.)"""
    if kind not in calibration.query_moment:
        raise UserError("double-sparsity needs query statistics: recalibrate with `lokitool calibrate --queries`")
    q2 = torch.diagonal(calibration.query_moment[kind].to(torch.float64), dim1=-2, dim2=-1)  # [L, Hkv, D]
    k2 = torch.diagonal(calibration.key_second_moment(kind), dim1=-2, dim2=-1)
    return (q2.clamp_min(0) * k2.clamp_min(0)).sqrt().argsort(dim=-1, descending=True, stable=True)


def channel_basis(calibration, kind: str = "post") -> torch.Tensor:
    """[L, Hkv, D, D] permutation bases, columns the coordinate axes in outlier order: Loki's selector
    in this basis with d = r scores exactly Double Sparsity's r channels."""
    order = outlier_channels(calibration, kind)
    eye = torch.eye(order.shape[-1], dtype=torch.float64)
    return eye[:, order].permute(1, 2, 0, 3)  # eye[:, order][i, l, h, j] = [order[l, h, j] == i]


def double_sparsity_selector(channels: torch.Tensor, r: int) -> Selector:
    """channels [Hkv, >= r] of one layer: score on the first r (a direct gather, for tests and clarity)."""
    idx = channels[:, :r]

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, Hx, S, D] -> [B, Hx, S, r], each head its KV head's channels
        hx, hkv = x.shape[1], idx.shape[0]
        per_head = idx.repeat_interleave(hx // hkv, 0).to(x.device)  # [Hx, r]
        return torch.gather(x, -1, per_head[None, :, None, :].expand(x.shape[0], hx, x.shape[2], r))

    return Selector("double-sparsity", prepare=gather, score=lambda q, k_r: truncated_scores(gather(q), k_r, r))


# ----------------------------------------------------------------------------------------------
# Bytes per decode step


def scan_fraction(method: str, *, df: float | None, page: int | None) -> float:
    """Share of K that scoring reads, nominal (d = df x D before rounding; SparQ per KV head)."""
    if method in DIM_SCANNERS:
        return df
    if method == "quest":
        return 2 / page
    if method == "exact-topk":
        return 1.0
    return 0.0  # full attends to everything, H2O reads only what it keeps


def step_bytes(method: str, kf: float | None, *, scan: float, rows: float = 1) -> float:
    """Bytes per decode step relative to full attention: 0.5 x scan + rows x kf (full: 1)."""
    if method == "full":
        return 1.0
    return 0.5 * scan + rows * kf


def kf_for_bytes(method: str, budget: float, *, df: float | None, page: int | None) -> float | None:
    """The kf that spends `budget` bytes per step with a selection shared per KV head (rows = 1).
    Exact top-k reads all of K (0.5) to score: under that it runs as the selection oracle with the
    kf of the d-dim scanners at this budget (its record carries the bytes it really reads)."""
    if method == "full":
        return None
    if method == "exact-topk" and budget <= 0.5:
        return kf_for_bytes("loki", budget, df=df if df is not None else 0.25, page=page)
    kf = budget - 0.5 * scan_fraction(method, df=df, page=page)
    if kf <= 0:
        raise UserError(f"--bytes {budget:g} leaves nothing to attend with for {method} (scoring alone reads {budget - kf:g})")
    return round(min(kf, 1.0), 6)
