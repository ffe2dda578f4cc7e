"""Loki over a whole window on the GPU (what `eval --ppl` runs): every query row selects its own keys.

`sparse_prefill` computes what the oracle `lokitool.sparse.reference.sparse_attention` computes, with its two
costly steps moved to the decode kernels:

    per block of query rows (as the oracle):
      scores = selector.score(q_block, prepared)        torch, the oracle's own code: same numbers
      idx    = select_topk(scores, t + 1, k_t)          select.py, one selection row per (t, head)
      out    = sparse_decode_attention(q_t, k, v, idx)  attention.py, each query row a "sequence"

Each query row t is handed to the decode kernels as a sequence of length t + 1 over the layer's
keys (a stride-0 batch of the same K and V), so the kept keys of a row are gathered and only those
are read; no [rows, keys] mask or dense softmax is formed. Sinks are forced in by scoring them +inf:
selection keeps equal scores in token order, so the first min(sink, k_t) keys are kept, as the
oracle keeps them. Exact attention runs on the model's own q, k, v (fp16 or bf16): q.k needs no
rotation. Selection statistics (kept fraction, Jaccard with exact top-k) are recorded as the
oracle records them, from masks built per block.
"""

from __future__ import annotations

import torch

from ..sparse.reference import LokiSpec, SelectionStats, Selector, budget_per_row, exact_scores, sum_groups
from .attention import sparse_decode_attention
from .select import kept_mask, select_topk

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def _select(scores: torch.Tensor, positions: torch.Tensor, budgets: torch.Tensor, sink: int) -> torch.Tensor:
    """scores [R, b, Sk] of one sequence -> kept indices [b, R, kmax] int32 (row t keeps budgets[t]
    of its positions[t] + 1 causal keys; the first `sink` keys scored +inf)."""
    rows = scores.transpose(0, 1)  # [b, R, Sk]: selection row (t, r)
    if sink:
        rows = rows.clone()
        rows[..., :sink] = float("inf")
    rows = rows.contiguous()
    lengths = (positions + 1).to(torch.int32)
    return select_topk(rows, lengths, budgets.to(torch.int32), kmax=int(budgets.max()))


def _keep_mask(idx: torch.Tensor, budgets: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Kept indices [b, R, kmax] -> keep mask [1, R, b, Sk], the oracle's layout for one sequence."""
    return kept_mask(idx, budgets, num_keys).transpose(0, 1)[None]


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    selector: Selector,
    spec: LokiSpec,
    scaling: float,
    block_rows: int = 512,
    stats: SelectionStats | None = None,
    compare_exact: bool = False,
) -> torch.Tensor:
    """reference.sparse_attention's contract (q [B, H, Sq, D], k, v [B, Hkv, Sk, D] -> [B, H, Sq, D]
    float32), for selectors that score (not `full`), with q, k, v in float16 or bfloat16."""
    if selector.score is None:
        raise ValueError("sparse_prefill needs a selector that scores keys (full attention has nothing to select)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton path needs q, k, v in float16 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    offset = sk - sq
    out = torch.empty(b, h, sq, v.shape[-1], dtype=torch.float32, device=q.device)
    prepared = selector.prepare(k)
    for start in range(0, sq, block_rows):
        stop = min(sq, start + block_rows)
        qb = q[:, :, start:stop]
        positions = torch.arange(start + offset, stop + offset, device=q.device)
        budgets = budget_per_row(positions, spec.kf, spec.budget, sk)  # [b] k_t
        scores = selector.score(qb, prepared)  # [B, H, b, Sk] float32
        exact = exact_scores(qb, k) if stats is not None and compare_exact else None
        if spec.group == "kv":  # one row per KV head: its query heads share the kept set
            scores = sum_groups(scores, hkv)
            exact = sum_groups(exact, hkv) if exact is not None else None
        for i in range(b):  # a stride-0 batch over one sequence's keys (one stride per dim)
            idx = _select(scores[i], positions, budgets, spec.sink)  # [b, R, kmax]
            rows = stop - start
            q_rows = qb[i].transpose(0, 1)  # [b, H, D]: row t is a one-token "sequence"
            k_rows = k[i : i + 1].expand(rows, -1, -1, -1)
            v_rows = v[i : i + 1].expand(rows, -1, -1, -1)
            o = sparse_decode_attention(q_rows, k_rows, v_rows, idx, budgets, scaling=scaling, group=spec.group)  # [b, H, D]
            out[i, :, start:stop] = o.transpose(0, 1)
            if stats is not None:
                keep = _keep_mask(idx, budgets, sk)
                exact_keep = None
                if exact is not None:
                    exact_keep = _keep_mask(_select(exact[i], positions, budgets, spec.sink), budgets, sk)
                stats.add(keep, positions, exact_keep)
    return out
