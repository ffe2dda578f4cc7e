"""Stage 3 of Loki decode: exact attention over the kept rows only (sparse flash-decoding).

For each selection row (b, r) the kept token indices idx[b, r, :k_b] (from select.py) are split
into NSPLIT contiguous pieces; one program per (piece, row) gathers those K and V rows (each row
D x 2 contiguous bytes: unkept rows are never read), runs an online softmax in float32 for the
query heads that share the selection, and writes a partial output and its log-sum-exp. The pieces
are merged by their log-sum-exp: by a second small kernel, or (loki_decode, where a row serves one
query head: merges_inside) by the row's last piece to finish, which a counter per row finds (one
launch fewer). Keys come as one [B, Hkv, S, D] tensor or in
the two-plane Loki layout (layout.py: a kept row is then read from both planes).

A selection row serves QPS query heads: 1 with group="head" (row r is query head r), and
G = H / Hkv with group="kv" (row r is KV head r, whose G query heads share one kept set, so each
kept row is read once for all of them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Pinned,
    dot_f32,
    env_pow2,
    keep_configs,
    launch,
    launch_args,
    multiprocessors,
    pow2,
    upcast_dot,
)
from .layout import Keys, LokiKeys

LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------
# Autotune configs: kept rows per step, warps, pipeline depth; pruned by the tile size.


def _configs() -> list:
    shapes = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 8, 2), (128, 8, 3)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in shapes]


def _prune(configs, named_args, **kwargs):
    dpad = launch_args(named_args, kwargs)["DPAD"]
    return keep_configs(configs, lambda c: c.kwargs["BLOCK_N"] * dpad <= 128 * 128)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _merge_pieces(o_part_ptr, lse_part_ptr, out_ptr, b, h, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  stride_outb, stride_outh, head_dim, nsplit, NSPLIT_PAD: tl.constexpr, DPAD: tl.constexpr, DC: tl.constexpr):
    """out[b, h] = the pieces' partial outputs weighted by their share of the softmax (from their
    log-sum-exps, base 2; stored in out's dtype); empty pieces (lse -inf) weigh 0. Pieces are read past L1 (.cg): other
    programs wrote them. DC dims per load (merge_dims: all of them where a head's pieces x dims fit
    MERGE_TILE), so a head's merge waits on memory once, not once per 32 dims."""
    offs_s = tl.arange(0, NSPLIT_PAD)
    s_ok = offs_s < nsplit
    lse = tl.load(lse_part_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    w = tl.exp2(lse - tl.max(lse, axis=0))
    total = tl.sum(w, axis=0)
    for d0 in tl.static_range(0, DPAD, DC):
        offs_d = d0 + tl.arange(0, DC)
        d_ok = offs_d < head_dim
        o = tl.load(
            o_part_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg",
        )
        merged = tl.sum(o * w[:, None], axis=0) / total
        tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_d, merged.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _attend_piece(
    q_rows, stride_qh, k_base, kh_base, v_base, stride_ks, stride_hs, stride_vs, idx_row, lo, hi,
    head_dim, d_low, scale_log2, o_ptr, stride_oh, lse_ptr, stride_lh,
    QPS: tl.constexpr, QPS_PAD: tl.constexpr, DPAD: tl.constexpr, SPLIT: tl.constexpr, DLP: tl.constexpr,
    DHP: tl.constexpr, HAS_HIGH: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One piece: an online softmax of the QPS query heads at q_rows (head g at q_rows + g x stride_qh)
    over the kept tokens idx_row[lo:hi] of one KV head (keys at k_base, and kh_base for the high plane
    where SPLIT, values at v_base), float32; stores the piece's output of head g at o_ptr + g x stride_oh
    and its base-2 log-sum-exp at lse_ptr + g x stride_lh (-inf and 0 for an empty piece). The kept
    indices are read past L1 (.cg): in loki_step.py other programs of the same launch wrote them."""
    offs_g = tl.arange(0, QPS_PAD)
    offs_d = tl.arange(0, DPAD)
    g_ok = offs_g < QPS
    d_ok = offs_d < head_dim
    q_rows = q_rows + offs_g[:, None] * stride_qh
    if SPLIT:  # keys in two planes: the first d_low dims, and the rest (layout.py)
        offs_l = tl.arange(0, DLP)
        offs_h = tl.arange(0, DHP)
        l_ok = offs_l < d_low
        h_ok = offs_h < head_dim - d_low
        q_lo = tl.load(q_rows + offs_l[None, :], mask=g_ok[:, None] & l_ok[None, :], other=0.0)  # [QPS_PAD, DLP]
        q_hi = tl.load(q_rows + d_low + offs_h[None, :], mask=g_ok[:, None] & h_ok[None, :], other=0.0)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [QPS_PAD, DPAD]

    m_i = tl.full([QPS_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([QPS_PAD], dtype=tl.float32)
    acc = tl.zeros([QPS_PAD, DPAD], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        tok = tl.load(idx_row + offs_n, mask=n_ok, other=0, cache_modifier=".cg").to(tl.int64)  # [BLOCK_N] kept token ids
        kv_mask = n_ok[:, None] & d_ok[None, :]
        if SPLIT:
            k_lo = tl.load(k_base + tok[:, None] * stride_ks + offs_l[None, :], mask=n_ok[:, None] & l_ok[None, :], other=0.0)
            qk = dot_f32(q_lo, tl.trans(k_lo), UPCAST_DOT)
            if HAS_HIGH:
                k_hi = tl.load(kh_base + tok[:, None] * stride_hs + offs_h[None, :], mask=n_ok[:, None] & h_ok[None, :], other=0.0)
                qk += dot_f32(q_hi, tl.trans(k_hi), UPCAST_DOT)
        else:
            k = tl.load(k_base + tok[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, DPAD]
            qk = dot_f32(q, tl.trans(k), UPCAST_DOT)
        qk = qk * scale_log2  # [QPS_PAD, BLOCK_N], log2 units
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every step has a kept row
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + tok[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, UPCAST_DOT)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + offs_g[:, None] * stride_oh + offs_d[None, :], o, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + offs_g * stride_lh, lse, mask=g_ok)


@triton.autotune(configs=_configs(), key=["QPS_PAD", "DPAD", "SPLIT", "ROWS_HINT", "MERGE"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _sparse_attention_kernel(
    q_ptr, k_ptr, kh_ptr, v_ptr, idx_ptr, budgets_ptr, o_part_ptr, lse_part_ptr, out_ptr, done_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_hb, stride_hh, stride_hs,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_ir,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    num_rows, group_size, head_dim, d_low, scale_log2, nsplit, ROWS_HINT,
    QPS: tl.constexpr, QPS_PAD: tl.constexpr, DPAD: tl.constexpr,
    SPLIT: tl.constexpr, DLP: tl.constexpr, DHP: tl.constexpr, HAS_HIGH: tl.constexpr,
    UPCAST_DOT: tl.constexpr, MERGE: tl.constexpr, NSPLIT_PAD: tl.constexpr, MERGE_DC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_split = tl.program_id(0)
    pid_row = tl.program_id(1)
    b = (pid_row // num_rows).to(tl.int64)
    r = pid_row % num_rows
    h0 = r * QPS  # first query head served by this selection row
    kvh = h0 // group_size

    kk = tl.load(budgets_ptr + b)
    per_split = tl.cdiv(kk, nsplit)
    lo = pid_split * per_split
    hi = tl.minimum(lo + per_split, kk)
    _attend_piece(
        q_ptr + b * stride_qb + h0 * stride_qh, stride_qh,
        k_ptr + b * stride_kb + kvh * stride_kh, kh_ptr + b * stride_hb + kvh * stride_hh, v_ptr + b * stride_vb + kvh * stride_vh,
        stride_ks, stride_hs, stride_vs, idx_ptr + b * stride_ib + r * stride_ir, lo, hi, head_dim, d_low, scale_log2,
        o_part_ptr + b * stride_ob + h0 * stride_oh + pid_split * stride_os, stride_oh,
        lse_part_ptr + b * stride_lb + h0 * stride_lh + pid_split, stride_lh,
        QPS, QPS_PAD, DPAD, SPLIT, DLP, DHP, HAS_HIGH, UPCAST_DOT, BLOCK_N,
    )
    if MERGE:  # the row's last piece to finish merges all of them (done_ptr: a counter per row, left at 0)
        tl.debug_barrier()  # every thread's stores of this piece precede the release below
        finished = tl.atomic_add(done_ptr + pid_row, 1, sem="acq_rel")
        if finished == nsplit - 1:
            for g in range(QPS):
                _merge_pieces(o_part_ptr, lse_part_ptr, out_ptr, b, h0 + g, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                              stride_outb, stride_outh, head_dim, nsplit, NSPLIT_PAD, DPAD, MERGE_DC)
            tl.store(done_ptr + pid_row, 0)


_ATTENTION = Pinned(_sparse_attention_kernel)


@triton.jit
def _merge_kernel(
    o_part_ptr, lse_part_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    num_heads, head_dim, nsplit,
    NSPLIT_PAD: tl.constexpr, DPAD: tl.constexpr, MERGE_DC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    h = pid % num_heads
    _merge_pieces(o_part_ptr, lse_part_ptr, out_ptr, b, h, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  stride_outb, stride_outh, head_dim, nsplit, NSPLIT_PAD, DPAD, MERGE_DC)


# ----------------------------------------------------------------------------------------------
# Launchers


def num_splits(rows: int, kmax: int, num_sms: int) -> int:
    """Pieces per selection row, pieces of >= 64 kept rows: ~8 programs per multiprocessor where the rows
    are few (batch 1: fewer than half as many rows as multiprocessors), else ~4 and at least 2 pieces a row.
    With the merge inside the kernel (the last piece of a row merges), a row's time is its slowest piece:
    at batch 1 (llama2-13b, 40 rows) 27 pieces made a faster step than 14; with many rows fewer, longer
    pieces won (H200, benchmarks/stage_lab.py, kf 0.25): llama3-8b kv B=16 16k (128 rows) 0.079 ms at 5
    pieces against 0.095 at 9 and 0.093 at 20; llama2-13b B=16 64k (640 rows) 1.29 ms at 2-8 against 1.34 at 1."""
    if 2 * rows < num_sms:
        want = triton.cdiv(8 * num_sms, rows)
    else:
        want = max(2, triton.cdiv(4 * num_sms, rows))
    return max(1, min(want, triton.cdiv(kmax, 64), 64))


def merges_inside(qps: int) -> bool:
    """Whether loki_decode merges a row's pieces in the row's last piece (one launch fewer) rather than in
    the merge kernel: only where a selection row serves one query head. A row of G query heads (group="kv")
    merges its heads one after another in one program, after the row's slowest piece has finished; the
    merge kernel takes every head at once. H200, kf 0.25 (benchmarks/attn_lab.py, reports/bench/stage-lab/
    attn-lab and pdl/attn_pdl0): llama3-8b kv B=1 32k 30.4 and 33.9 us inside against 24.1 and 24.3 with
    the merge kernel, B=1 128k 59.6 / 60.2 against 54.4 / 54.5, B=16 16k 91.2 against 87.3; llama2-13b
    (one head a row) B=1 32k 67.2 against 66.7."""
    return qps == 1


MERGE_TILE = 8192  # partial-output elements the merge loads at once (a head's pieces x dims)


def merge_dims(nsplit: int, dim: int) -> int:
    """Dims per load of the merge: all of a head's pieces and dims in one load where they fit MERGE_TILE,
    so merging a head waits on memory once (LOKITOOL_MERGE_DC: a fixed width; benchmarks)."""
    width = env_pow2("LOKITOOL_MERGE_DC", 16) or max(16, MERGE_TILE // pow2(nsplit))
    return min(pow2(dim, 16), width)


def _launch(
    *, q_rot, k_rot: Keys, v, idx, budgets, o_part, lse_part, scaling: float, qps: int, nsplit: int,
    out: torch.Tensor | None = None, done: torch.Tensor | None = None,
) -> None:
    """With `out` and `done` (int32 [B x R] zeros, left at zero) each row's last piece merges the
    pieces into out itself: no launch_merge."""
    b, h, dim = q_rot.shape
    _, hkv, s, _ = k_rot.shape
    rows, kmax = idx.shape[1], idx.shape[2]
    split = isinstance(k_rot, LokiKeys)
    k_lo, k_hi = (k_rot.low, k_rot.high) if split else (k_rot, k_rot)
    if k_hi.shape[-1] == 0:  # d = D: no high plane to read
        k_hi = k_lo
    d_low = k_lo.shape[-1] if split else dim
    assert v.shape == k_rot.shape and k_rot.shape[0] == b and k_rot.shape[3] == dim, (q_rot.shape, k_rot.shape, v.shape)
    assert q_rot.dtype == k_rot.dtype == v.dtype and q_rot.dtype in (torch.float16, torch.bfloat16), q_rot.dtype
    assert q_rot.stride(-1) == k_lo.stride(-1) == v.stride(-1) == 1 and (k_hi.shape[-1] == 0 or k_hi.stride(-1) == 1)
    assert h % hkv == 0 and rows * qps == h and idx.shape[0] == b and idx.dtype == torch.int32
    assert budgets.shape == (b,) and budgets.dtype == torch.int32
    assert o_part.shape == (b, h, nsplit, dim) and lse_part.shape == (b, h, nsplit)
    merge = out is not None
    if merge:
        assert out.shape == (b, h, dim) and out.stride(-1) == 1
        assert done is not None and done.numel() == b * rows and done.dtype == torch.int32
    grid = (nsplit, b * rows)
    _ATTENTION.launch(
        grid, (q_rot.dtype,), q_ptr=q_rot, k_ptr=k_lo, kh_ptr=k_hi, v_ptr=v, idx_ptr=idx, budgets_ptr=budgets, o_part_ptr=o_part, lse_part_ptr=lse_part,
        stride_qb=q_rot.stride(0), stride_qh=q_rot.stride(1),
        stride_kb=k_lo.stride(0), stride_kh=k_lo.stride(1), stride_ks=k_lo.stride(2),
        stride_hb=k_hi.stride(0), stride_hh=k_hi.stride(1), stride_hs=k_hi.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vs=v.stride(2),
        stride_ib=idx.stride(0), stride_ir=idx.stride(1),
        stride_ob=o_part.stride(0), stride_oh=o_part.stride(1), stride_os=o_part.stride(2),
        stride_lb=lse_part.stride(0), stride_lh=lse_part.stride(1),
        out_ptr=out if merge else o_part, done_ptr=done if merge else budgets,
        stride_outb=out.stride(0) if merge else 0, stride_outh=out.stride(1) if merge else 0,
        MERGE=merge, NSPLIT_PAD=pow2(nsplit), MERGE_DC=merge_dims(nsplit, dim),
        num_rows=rows, group_size=h // hkv, head_dim=dim, d_low=d_low, scale_log2=scaling * LOG2E,
        nsplit=nsplit, ROWS_HINT=pow2(triton.cdiv(kmax, nsplit)),
        QPS=qps, QPS_PAD=pow2(qps, 16), DPAD=pow2(dim, 16),
        SPLIT=split, DLP=pow2(d_low, 16), DHP=pow2(max(dim - d_low, 1), 16), HAS_HIGH=dim > d_low,
        UPCAST_DOT=upcast_dot(q_rot.dtype),
    )


def launch_merge(*, o_part, lse_part, out) -> None:
    """out [B, H, D] (any float dtype) from the pieces o_part [B, H, nsplit, D] and their base-2
    log-sum-exps lse_part [B, H, nsplit] (float32): also the merge of kernels/decode_full.py."""
    b, h, nsplit, dim = o_part.shape
    assert lse_part.shape == (b, h, nsplit) and out.shape == (b, h, dim)
    assert o_part.stride(-1) == out.stride(-1) == lse_part.stride(-1) == 1
    launch(
        _merge_kernel, (b * h,), o_part_ptr=o_part, lse_part_ptr=lse_part, out_ptr=out,
        stride_ob=o_part.stride(0), stride_oh=o_part.stride(1), stride_os=o_part.stride(2),
        stride_lb=lse_part.stride(0), stride_lh=lse_part.stride(1),
        stride_outb=out.stride(0), stride_outh=out.stride(1),
        num_heads=h, head_dim=dim, nsplit=nsplit,
        NSPLIT_PAD=pow2(nsplit), DPAD=pow2(dim, 16), MERGE_DC=merge_dims(nsplit, dim),
    )


# ----------------------------------------------------------------------------------------------
# Public wrapper


def sparse_decode_attention(
    q_rot: torch.Tensor,
    k_rot: Keys,
    v: torch.Tensor,
    idx: torch.Tensor,
    budgets: torch.Tensor,
    *,
    scaling: float,
    group: str = "head",
    nsplit: int | None = None,
) -> torch.Tensor:
    """Attention [B, H, D] float32 of q_rot [B, H, D] over the kept rows idx [B, R, kmax] (the first
    budgets[b] of each row) of k_rot (a [B, Hkv, S, D] tensor or LokiKeys) and v [B, Hkv, S, D];
    R = H (group="head") or Hkv (group="kv")."""
    b, h, dim = q_rot.shape
    hkv = k_rot.shape[1]
    qps = 1 if group == "head" else h // hkv
    rows = idx.shape[1]
    if nsplit is None:
        nsplit = num_splits(b * rows, idx.shape[2], multiprocessors(q_rot.device))
    o_part = torch.empty(b, h, nsplit, dim, dtype=torch.float32, device=q_rot.device)
    lse_part = torch.empty(b, h, nsplit, dtype=torch.float32, device=q_rot.device)
    out = torch.empty(b, h, dim, dtype=torch.float32, device=q_rot.device)
    _launch(
        q_rot=q_rot, k_rot=k_rot, v=v, idx=idx, budgets=budgets if budgets.dtype == torch.int32 else budgets.to(torch.int32),
        o_part=o_part, lse_part=lse_part,
        scaling=scaling, qps=qps, nsplit=nsplit,
    )
    launch_merge(o_part=o_part, lse_part=lse_part, out=out)
    return out
