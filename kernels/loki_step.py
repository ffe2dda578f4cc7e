"""Loki decode in one launch, for rows too few to fill the card (batch 1): score, select, attend, merge.

loki_decode's three stages (score.py, select.py's split mode, attention.py) each fill the card at batch
1 only briefly: every launch pays its ramp and drain, and at 8 selection rows (llama3-8b, batch 1,
group="kv") these cost more than the bytes (reports/bench/stage-lab). Here one grid of chunks x rows
runs them all, each program on one chunk of CH tokens of one selection row:

    phase S  the chunk's approximate scores (the first d dims of the scored plane, summed over the row's
             query heads as score.py sums them), stored to the row's scratch and read back as keys
    0-3      select_radix.py's four radix passes over the row (a barrier of the row between passes)
    4        the chunk's kept tokens written at its offset in the row's index list
    5        after a last barrier, an equal share of the row's kept tokens (not only the chunk's own: the
             kept set may crowd into a few chunks) attended by the row's query heads (attention.py's
             piece), its partial output stored
    merge    the row's last program to finish merges the row's pieces into the output and zeroes the
             row's histograms and counters for the next call

Budgets k = max(1, floor(kf x n)) are computed in every program (_common.token_budget). A row's programs
meet at barriers of their own (select_radix._row_arrive/_row_wait), which is only safe where every
program of the grid is resident at once: StepPlan sizes chunks as the one-launch selection does
(select_radix.one_launch_chunk, registers capped) and checks the compiled kernel's registers and shared
memory against the multiprocessor before its first launch. Elsewhere (the CPU interpreter, grids too
large, cards before Hopper) the same kernel runs phase by phase, one launch each, where no program waits.

loki_decode takes this path where its selection would run split in one launch (select.choose_mode: rows
fewer than a quarter of the multiprocessors, longer than SPLIT_MIN tokens) in chunks of at most MAX_CHUNK
tokens (`takes_step`: llama3-8b group kv at batch 1, 16k-64k); LOKITOOL_FUSED_STEP=0 turns it off, =1
takes it at every shape (benchmarks, tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import select, select_radix
from ._common import dot_f32, env_switch, float_bits, interpreting, launch, pow2, token_budget, upcast_dot
from .attention import LOG2E, MERGE_TILE, _attend_piece
from .layout import Keys, LokiKeys
from .select_keys import _chunk_program

ATTEND = 5  # the attention phase, after select_radix's passes (0-3) and write (4)
PHASE_ATTEND = tl.constexpr(ATTEND)
BLOCK_S = 128  # tokens per score tile
BLOCK_N = 64  # kept tokens per attention step
MAX_CHUNK = 2048  # takes_step: tokens a program, at most (benchmarks/step_lab.py, below)


@triton.jit
def _score_chunk(q_rows, stride_qh, k_base, stride_ks, row_ptr, start, n, d,
                 QPS: tl.constexpr, QPS_PAD: tl.constexpr, DP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 BLOCK_S: tl.constexpr, CH: tl.constexpr):
    """Scores of tokens [start, start + CH) below n: q . k over the first d dims, summed over the QPS query
    heads at q_rows in float32 (score.py's products and sum), stored at row_ptr + token."""
    offs_g = tl.arange(0, QPS_PAD)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < d
    q = tl.load(q_rows + offs_g[:, None] * stride_qh + offs_d[None, :], mask=(offs_g < QPS)[:, None] & d_ok[None, :], other=0.0)
    for t in range(start, tl.minimum(start + CH, n), BLOCK_S):
        offs_s = t + tl.arange(0, BLOCK_S)
        ok = offs_s < n
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = dot_f32(q, tl.trans(k), UPCAST_DOT)  # [QPS_PAD, BLOCK_S], padded heads 0
        tl.store(row_ptr + offs_s, tl.sum(s, axis=0), mask=ok)


@triton.jit
def _merge_heads(o_ptr, stride_oh, stride_os, lse_ptr, stride_lh, out_ptr, stride_outh, head_dim, npieces,
                 QPS: tl.constexpr, QP2: tl.constexpr, NSPLIT_PAD: tl.constexpr, DPAD: tl.constexpr, DC: tl.constexpr):
    """out (QPS heads at out_ptr + g x stride_outh) = the npieces partial outputs of each head weighted by
    their share of its softmax (attention._merge_pieces for all heads of a row at once: one wait on memory
    per DC dims, not one per head). Read past L1: other programs wrote them."""
    g = tl.arange(0, QP2)
    s = tl.arange(0, NSPLIT_PAD)
    g_ok = g < QPS
    ok = g_ok[:, None] & (s < npieces)[None, :]
    lse = tl.load(lse_ptr + g[:, None] * stride_lh + s[None, :], mask=ok, other=float("-inf"), cache_modifier=".cg")
    top = tl.where(g_ok, tl.max(lse, axis=1), 0.0)  # finite for real heads: every row keeps >= 1 token
    w = tl.exp2(lse - top[:, None])
    total = tl.where(g_ok, tl.sum(w, axis=1), 1.0)
    for d0 in tl.static_range(0, DPAD, DC):
        dd = d0 + tl.arange(0, DC)
        d_ok = dd < head_dim
        o = tl.load(o_ptr + g[:, None, None] * stride_oh + s[None, :, None] * stride_os + dd[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        merged = tl.sum(o * w[:, :, None], axis=1) / total[:, None]
        tl.store(out_ptr + g[:, None] * stride_outh + dd[None, :], merged.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, kh_ptr, v_ptr, lengths_ptr, kf_bits,
    scores_ptr, hist_ptr, sync_ptr, gt_ptr, suffix_ptr, idx_ptr, o_part_ptr, lse_part_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_hb, stride_hh, stride_hs,
    stride_vb, stride_vh, stride_vs,
    stride_sb, stride_sr, stride_ib, stride_ir,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    num_rows, group_size, head_dim, d, d_low, scale_log2, nch,
    FIRST: tl.constexpr, LAST: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr, NCH_PAD: tl.constexpr, GROUP: tl.constexpr,
    QPS: tl.constexpr, QPS_PAD: tl.constexpr, QP2: tl.constexpr, DP: tl.constexpr, DPAD: tl.constexpr,
    SPLIT: tl.constexpr, DLP: tl.constexpr, DHP: tl.constexpr, HAS_HIGH: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, MERGE_DC: tl.constexpr,
):
    """Phases FIRST..LAST (0: scores and the first radix pass, 1-3 passes, 4 write, 5 attention and merge)
    of chunk c of selection row (b, r); see the module docstring."""
    c, pid, b, r, n, start = _chunk_program(lengths_ptr, num_rows, CH)
    if start < n:
        kk = token_budget(n, kf_bits)
        nact = tl.cdiv(n, CH)  # chunks of the row with keys: the programs that meet at its barriers
        h0 = r * QPS  # first query head of the row
        kvh = h0 // group_size
        row_hist = hist_ptr + pid.to(tl.int64) * (4 * NB)
        arrivals = sync_ptr + pid.to(tl.int64) * 2
        row_scores = scores_ptr + b * stride_sb + r * stride_sr
        idx_row = idx_ptr + b * stride_ib + r * stride_ir
        q_rows = q_ptr + b * stride_qb + h0 * stride_qh
        if FIRST == 0:
            _score_chunk(q_rows, stride_qh, k_ptr + b * stride_kb + kvh * stride_kh, stride_ks, row_scores, start, n, d,
                         QPS, QPS_PAD, DP, UPCAST_DOT, BLOCK_S, CH)
            tl.debug_barrier()  # the chunk's scores, stored by all threads, are read back by all
        if FIRST < PHASE_ATTEND:
            select_radix._radix_phases(row_scores, n, start, kk, c, pid, nch, nact, row_hist, arrivals, gt_ptr, suffix_ptr, idx_row,
                                       FIRST, LAST if LAST < PHASE_ATTEND else PHASE_ATTEND - 1, NB, CH, NCH_PAD, GROUP)
        if LAST == PHASE_ATTEND:
            if FIRST < PHASE_ATTEND:  # every chunk's kept tokens listed before any piece reads them
                select_radix._row_arrive(arrivals)
                select_radix._row_wait(arrivals, PHASE_ATTEND * nact)
            per = tl.cdiv(kk, nact)
            lo = c * per
            hi = tl.minimum(lo + per, kk)
            _attend_piece(
                q_rows, stride_qh,
                k_ptr + b * stride_kb + kvh * stride_kh, kh_ptr + b * stride_hb + kvh * stride_hh, v_ptr + b * stride_vb + kvh * stride_vh,
                stride_ks, stride_hs, stride_vs, idx_row, lo, hi, head_dim, d_low, scale_log2,
                o_part_ptr + b * stride_ob + h0 * stride_oh + c * stride_os, stride_oh,
                lse_part_ptr + b * stride_lb + h0 * stride_lh + c, stride_lh,
                QPS, QPS_PAD, DPAD, SPLIT, DLP, DHP, HAS_HIGH, UPCAST_DOT, BLOCK_N,
            )
            if select_radix._row_depart(row_hist, arrivals, nact, NB):  # the row's last program: every piece is stored
                _merge_heads(o_part_ptr + b * stride_ob + h0 * stride_oh, stride_oh, stride_os,
                             lse_part_ptr + b * stride_lb + h0 * stride_lh, stride_lh,
                             out_ptr + b * stride_outb + h0 * stride_outh, stride_outh, head_dim, nact,
                             QPS, QP2, NCH_PAD, DPAD, MERGE_DC)


# ----------------------------------------------------------------------------------------------
# Plan and launch


def takes_step(total_rows: int, s: int, device: torch.device) -> bool:
    """Whether loki_decode runs a step of total_rows selection rows of s tokens here: where its selection
    would run split in one launch (select.selection_mode, one_launch_chunk) with chunks of at most MAX_CHUNK
    tokens, unless LOKITOOL_FUSED_STEP=0; LOKITOOL_FUSED_STEP=1 takes it at every shape (phase by phase
    where one launch cannot run: benchmarks, tests). On an H200 (benchmarks/step_lab.py, llama3-8b group kv,
    batch 1, kf 0.25; the step in one launch against the three stages in the same process): 16k 0.0363
    against 0.0377 ms (chunks of 1024), 32k 0.0471 against 0.0486 (1024), 64k 0.0685 against 0.0768
    (2048), 128k 0.1062-0.1092 against 0.1030 (4096: the step's 256 programs read the kept rows slower than
    the attention kernel's 512), so 128k keeps the stages. At 40 rows (llama2-13b, batch 1) the step's
    chunks of 8192 lost to the row kernel (32k: 0.212 against 0.127 ms); at 128 rows (llama3-8b kv, batch
    16, 16k) to the stages (0.221 against 0.152)."""
    forced = env_switch("LOKITOOL_FUSED_STEP")
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type != "cuda" or interpreting() or select.selection_mode(total_rows, s, device) != "split":
        return False
    one_launch, chunk = select.split_one_launch(total_rows, s, device, None, None)
    return one_launch and chunk <= MAX_CHUNK


class StepPlan:
    """Scratch and launch shape of one step: b x rows selection rows of s tokens in chunks of `chunk`
    (one_launch_chunk's where the grid is resident; select_radix.split_chunk's phase by phase); `rows`
    serve qps query heads each, head dim `dim`. One launch or phase by phase as the split selection decides
    (select.split_one_launch: one_launch None for its default, False phase by phase, True insists)."""

    def __init__(self, b: int, rows: int, qps: int, s: int, dim: int, device: torch.device, *,
                 one_launch: bool | None = None, chunk: int | None = None):
        self.one_launch, chunk = select.split_one_launch(b * rows, s, device, chunk, one_launch)
        self.chunk = chunk or select_radix.split_chunk(s)
        assert self.chunk == pow2(self.chunk) and self.chunk >= 32, self.chunk
        self.nch = triton.cdiv(s, self.chunk)
        self.b, self.rows, self.qps, self.s = b, rows, qps, s
        i32 = dict(dtype=torch.int32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.hist = torch.zeros(b * rows * select_radix.HIST_ROW, **i32)  # zero on entry: each call leaves them so
        self.sync = torch.zeros(b * rows * select_radix.SYNC, **i32)
        self.gt = torch.empty(b * rows * self.nch, **i32)
        self.suffix = torch.empty(b * rows * self.nch * select_radix.NB, **i32)
        self.scores = torch.empty(b, rows, s, **f32)
        self.idx = torch.empty(b, rows, s, **i32)  # kept lists (kmax <= s)
        self.o_part = torch.empty(b, rows * qps, self.nch, dim, **f32)
        self.lse_part = torch.empty(b, rows * qps, self.nch, **f32)
        self.block_s, self.block_n, self.stages, self.warps = BLOCK_S, BLOCK_N, None, select_radix.split_warps(self.chunk)
        self.checked = False


def fits_resident(compiled, per_sm: int, device: torch.device) -> bool:
    """Whether per_sm programs of a compiled kernel fit one multiprocessor at once (registers, shared
    memory, threads), from the compiled kernel's own figures; True where Triton does not give them."""
    try:
        compiled._init_handles()
        regs, shared, warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
    except AttributeError:
        return True
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", None) or 228 * 1024
    reg_file = getattr(props, "regs_per_multiprocessor", None) or 65536
    threads = 32 * warps
    return per_sm * shared <= smem and per_sm * regs * threads <= reg_file and per_sm * threads <= props.max_threads_per_multi_processor


def _launch(*, q_rot: torch.Tensor, k_rot: Keys, v: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
            kf: float, d: int, scaling: float, plan: StepPlan) -> None:
    b, h, dim = q_rot.shape
    _, hkv, s, _ = k_rot.shape
    split = isinstance(k_rot, LokiKeys)
    k_lo, k_hi = (k_rot.low, k_rot.high) if split else (k_rot, k_rot)
    if k_hi.shape[-1] == 0:  # d = D: no high plane to read
        k_hi = k_lo
    d_low = k_lo.shape[-1] if split else dim
    assert (b, plan.rows * plan.qps, s) == (plan.b, h, plan.s) and h % hkv == 0 and plan.qps in (1, h // hkv)
    assert 1 <= d <= min(dim, k_lo.shape[-1]), (d, dim, k_lo.shape)
    assert v.shape == k_rot.shape and q_rot.dtype == k_rot.dtype == v.dtype and lengths.dtype == torch.int32
    assert q_rot.stride(-1) == k_lo.stride(-1) == v.stride(-1) == out.stride(-1) == 1 and out.shape == q_rot.shape
    qps, nch = plan.qps, plan.nch
    args = dict(
        q_ptr=q_rot, k_ptr=k_lo, kh_ptr=k_hi, v_ptr=v, lengths_ptr=lengths, kf_bits=float_bits(kf),
        scores_ptr=plan.scores, hist_ptr=plan.hist, sync_ptr=plan.sync, gt_ptr=plan.gt, suffix_ptr=plan.suffix, idx_ptr=plan.idx,
        o_part_ptr=plan.o_part, lse_part_ptr=plan.lse_part, out_ptr=out,
        stride_qb=q_rot.stride(0), stride_qh=q_rot.stride(1),
        stride_kb=k_lo.stride(0), stride_kh=k_lo.stride(1), stride_ks=k_lo.stride(2),
        stride_hb=k_hi.stride(0), stride_hh=k_hi.stride(1), stride_hs=k_hi.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vs=v.stride(2),
        stride_sb=plan.scores.stride(0), stride_sr=plan.scores.stride(1), stride_ib=plan.idx.stride(0), stride_ir=plan.idx.stride(1),
        stride_ob=plan.o_part.stride(0), stride_oh=plan.o_part.stride(1), stride_os=plan.o_part.stride(2),
        stride_lb=plan.lse_part.stride(0), stride_lh=plan.lse_part.stride(1), stride_outb=out.stride(0), stride_outh=out.stride(1),
        num_rows=plan.rows, group_size=h // hkv, head_dim=dim, d=d, d_low=d_low, scale_log2=scaling * LOG2E, nch=nch,
        NB=select_radix.NB, CH=plan.chunk, NCH_PAD=pow2(nch), GROUP=32,
        QPS=qps, QPS_PAD=pow2(qps, 16), QP2=pow2(qps), DP=pow2(d, 16), DPAD=pow2(dim, 16),
        SPLIT=split, DLP=pow2(d_low, 16), DHP=pow2(max(dim - d_low, 1), 16), HAS_HIGH=dim > d_low, UPCAST_DOT=upcast_dot(q_rot.dtype),
        BLOCK_S=plan.block_s, BLOCK_N=plan.block_n, MERGE_DC=min(pow2(dim, 16), max(16, MERGE_TILE // (pow2(qps) * pow2(nch)))),
        num_warps=plan.warps,
    )
    if plan.stages:
        args["num_stages"] = plan.stages
    grid = (nch, b * plan.rows)
    if plan.one_launch:
        args["maxnreg"] = select_radix.one_launch_registers(plan.warps)
        if not plan.checked:  # a grid that is not resident at once would wait at its barriers for ever
            compiled = _step_kernel.warmup(**args, FIRST=0, LAST=ATTEND, grid=grid)
            plan.one_launch = fits_resident(compiled, select_radix.programs_per_sm(), q_rot.device)
            plan.checked = True
            if not plan.one_launch:
                args.pop("maxnreg")
    for first, last in select_radix.phases(plan.one_launch, ATTEND):
        launch(_step_kernel, grid, **args, FIRST=first, LAST=last)


def step_decode(q_rot: torch.Tensor, k_rot: Keys, v: torch.Tensor, lengths: torch.Tensor, *, kf: float, d: int, scaling: float,
              group: str = "kv", out_dtype: torch.dtype = torch.float32, plan: StepPlan | None = None) -> torch.Tensor:
    """One Loki decode step [B, H, D] through the fused kernel (what loki_decode computes; see the module
    docstring), with a fresh plan unless one is given (tests and benchmarks)."""
    b, h, dim = q_rot.shape
    hkv = k_rot.shape[1]
    rows, qps = (h, 1) if group == "head" else (hkv, h // hkv)
    plan = plan or StepPlan(b, rows, qps, k_rot.shape[2], dim, q_rot.device)
    out = torch.empty(q_rot.shape, dtype=out_dtype, device=q_rot.device)
    _launch(q_rot=q_rot, k_rot=k_rot, v=v, lengths=lengths.to(device=q_rot.device, dtype=torch.int32), out=out,
            kf=kf, d=d, scaling=scaling, plan=plan)
    return out
