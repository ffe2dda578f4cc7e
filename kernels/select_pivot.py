"""Pivot selection: exact top-k of long rows in two passes over the scores (select.py's "pivot" mode).

The radix mode (select.py) reads a row five times and histograms it twice; on an H200 each of its
passes costs 2-3.5x a plain read of the scores (benchmarks/select_profile.py). Here a row is read twice:

1. sample (a program per row): M keys at evenly spaced tokens (`sample_size`), sorted; the keys at sample
   ranks k x M / n -+ MARGIN sampling deviations bracket the k-th largest key: [lo, hi].
2. compact (a program per chunk): counts the chunk's keys above hi and appends its keys inside
   [lo, hi] (a few percent of the row) with their tokens to the row's candidate list (one atomic per
   chunk reserves the space).
3. resolve (a program per row): the exact k-th key among the candidates (bisection in registers),
   then per chunk the number of kept keys above the threshold and of keys equal to it.
   Where the bracket missed the k-th key or the candidates overflow their buffer (heavy ties, a
   constant row), the program finds the threshold by bisection over the whole row instead: exact,
   slow, and only there.
4. write (a program per chunk): the chunk's kept tokens at its offset, ties in token order, as the
   radix mode writes them (select_keys._write_chunk).

Which keys are kept never depends on the sample, only how fast they are found.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from .select_keys import _bisect, _chunk_program, _kth_key, _load_keys, _prefix_rank, _write_chunk

SAMPLES = (1024, 2048, 4096)  # row sample sizes, cheapest first (sample_size)
MARGIN = 5.0  # bracket half-width, in standard deviations of the sample rank of the k-th key (a miss: ~6e-7 a row)
MAX_TOKENS = 131072  # longest row whose bracket fits the MAX_CAP candidate slots at any budget (sample_size)
MAX_CAP = 16384  # candidate slots a row, at most (the resolve program holds them in registers)
OVERFLOW_SD = 3.0  # sample_size: slots left above the expected candidates, in standard deviations of their count
STATE = tl.constexpr(8)  # ints of per-row state: lo, hi, candidates, threshold, ties needed


def bracket_share(sample: int, p: float = 0.5) -> float:
    """Expected share of a row's keys inside the bracket of a `sample`-key sample, budget share p = k / n."""
    return 2 * (MARGIN * math.sqrt(sample * p * (1 - p)) + 8) / sample


def candidate_cap(s: int, sample: int) -> int:
    """Candidate slots per row: 1.5x the bracket's expected share of s tokens at the widest (k = n / 2),
    a power of two in [256, MAX_CAP]."""
    return min(MAX_CAP, max(256, triton.next_power_of_2(int(1.5 * bracket_share(sample) * s) + 1)))


def sample_size(s: int, kf: float | None = None) -> int:
    """Keys of each row's sample: the smallest of SAMPLES whose bracket leaves the MAX_CAP slots
    OVERFLOW_SD standard deviations above the expected candidates of a row of s tokens at budget share kf
    (the widest, 1/2, where None): a row whose candidates overflow takes the slow whole-row search.
    The count's deviation is a sample gap's, sqrt(g (1 - g) / M) x s for a bracket share g; a simulation of
    1000 rows of normal scores agreed (benchmarks/pivot_samples.py, reports/bench/select-profile/samples):
    at 131072 tokens and 2048 keys, kf 0.25, 13441 +- 868 candidates (one row of 1000 overflowed; 3.4 sd),
    kf 0.5 15493 +- 901 (1.0 sd: 159 rows of 1000), hence 4096 keys there (9.8 sd); at 65536 tokens, 1024
    keys: 9850 +- 735 (8.9 sd).
    A larger sample costs its sort (640 rows on an H200: 0.048 / 0.128 / ~0.47 ms for 1024 / 2048 / 4096
    keys), a smaller one candidates."""
    p = 0.5 if kf is None else min(kf, 0.5)  # k = floor(kf n) / n <= kf; p (1 - p) grows up to 1/2
    for m in SAMPLES:
        g = bracket_share(m, p)
        if g * s + OVERFLOW_SD * math.sqrt(g * (1 - g) / m) * s <= MAX_CAP:
            return m
    return SAMPLES[-1]


@triton.jit
def _sample_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, state_ptr,
    stride_sb, stride_sr, num_rows,
    M: tl.constexpr, MARGIN_SD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_rows).to(tl.int64)
    r = pid % num_rows
    n = tl.load(lengths_ptr + b)
    kk = tl.load(budgets_ptr + b)
    pos = tl.arange(0, M).to(tl.int64) * n // M
    ranked = tl.sort(_load_keys(scores_ptr + b * stride_sb + r * stride_sr, pos, n))  # ascending; the j-th largest at M - j
    p = kk.to(tl.float32) / n.to(tl.float32)
    jstar = p * M
    margin = MARGIN_SD * tl.sqrt(M * p * (1.0 - p)) + 8.0
    hi_rank = tl.ceil(jstar - margin).to(tl.int32)  # ranks from the top, 1-based
    lo_rank = tl.floor(jstar + margin).to(tl.int32)
    at = tl.arange(0, M)
    hi = tl.max(tl.where(at == M - hi_rank, ranked, -2147483648), axis=0)
    lo = tl.max(tl.where(at == M - lo_rank, ranked, -2147483648), axis=0)
    hi = tl.where(hi_rank < 1, 2147483647, hi)
    lo = tl.maximum(tl.where(lo_rank > M, -2147483647, lo), -2147483647)  # real keys are >= -2^31 + 1
    slot = tl.arange(0, 4)
    tl.store(state_ptr + pid.to(tl.int64) * STATE + slot, tl.where(slot == 0, lo, tl.where(slot == 1, hi, 0)), mask=slot < 3)


@triton.jit
def _compact_kernel(
    scores_ptr, lengths_ptr, state_ptr, gt_ptr, cand_key_ptr, cand_tok_ptr,
    stride_sb, stride_sr, num_rows, nch,
    CH: tl.constexpr, CAP: tl.constexpr, GROUP: tl.constexpr,
):
    c, pid, b, r, n, start = _chunk_program(lengths_ptr, num_rows, CH)
    if start < n:
        row_state = state_ptr + pid.to(tl.int64) * STATE
        lo = tl.load(row_state)
        hi = tl.load(row_state + 1)
        tokens = start + tl.arange(0, CH // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [CH / GROUP, GROUP]
        keys = _load_keys(scores_ptr + b * stride_sb + r * stride_sr, tokens, n)  # padding (INT32_MIN) is below lo
        tl.store(gt_ptr + pid.to(tl.int64) * nch + c, tl.sum(tl.sum(tl.where(keys > hi, 1, 0), axis=1), axis=0))
        inside = (keys >= lo) & (keys <= hi)
        rank, n_in = _prefix_rank(inside, GROUP)
        if n_in > 0:
            base = tl.atomic_add(row_state + 2, n_in, sem="relaxed")
            pos = base + rank
            ok = inside & (pos < CAP)
            slots = pid.to(tl.int64) * CAP + pos
            tl.store(cand_key_ptr + slots, keys, mask=ok)
            tl.store(cand_tok_ptr + slots, tokens, mask=ok)


@triton.jit
def _row_kth_key(row_ptr, n, kk, CH: tl.constexpr):
    """The threshold _kth_key finds, over a whole row read from memory in chunks at each step."""
    lo = tl.full([], -2147483647, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    offs = tl.arange(0, CH)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = n * 0
        for start in range(0, n, CH):
            count += tl.sum(tl.where(_load_keys(row_ptr, start + offs, n) >= mid.to(tl.int32), 1, 0), axis=0)
        lo, hi = _bisect(lo, hi, mid, count, kk)
    return lo.to(tl.int32)


@triton.jit
def _resolve_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, state_ptr, gt_ptr, above_ptr, ties_ptr, cand_key_ptr, cand_tok_ptr,
    stride_sb, stride_sr, num_rows, nch,
    CH: tl.constexpr, CAP: tl.constexpr, NCH_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_rows).to(tl.int64)
    r = pid % num_rows
    n = tl.load(lengths_ptr + b)
    kk = tl.load(budgets_ptr + b)
    row_state = state_ptr + pid.to(tl.int64) * STATE
    lo = tl.load(row_state)
    hi = tl.load(row_state + 1)
    count = tl.load(row_state + 2)
    chunks = tl.arange(0, NCH_PAD)
    live = chunks * CH < n
    row_chunks = pid.to(tl.int64) * nch + chunks
    gt = tl.load(gt_ptr + row_chunks, mask=live, other=0)  # [NCH_PAD] keys above hi per chunk
    n_gt = tl.sum(gt, axis=0)
    if (count <= CAP) & (n_gt < kk) & (n_gt + count >= kk):  # the k-th key is among the candidates
        slot = tl.arange(0, CAP)
        listed = slot < count
        cand = tl.load(cand_key_ptr + pid.to(tl.int64) * CAP + slot, mask=listed, other=-2147483648)
        chunk_of = tl.load(cand_tok_ptr + pid.to(tl.int64) * CAP + slot, mask=listed, other=0) // CH
        want = kk - n_gt
        thr = _kth_key(cand, want, lo.to(tl.int64), hi.to(tl.int64))
        above = gt + tl.histogram(chunk_of, NCH_PAD, mask=listed & (cand > thr))
        ties = tl.histogram(chunk_of, NCH_PAD, mask=listed & (cand == thr))
    else:  # the bracket missed, or too many candidates: the whole row, exactly
        row_ptr = scores_ptr + b * stride_sb + r * stride_sr
        thr = _row_kth_key(row_ptr, n, kk, CH)
        above = gt * 0
        ties = gt * 0
        offs = tl.arange(0, CH)
        for c in range(0, tl.cdiv(n, CH)):
            keys = _load_keys(row_ptr, c * CH + offs, n)
            above = tl.where(chunks == c, tl.sum(tl.where(keys > thr, 1, 0), axis=0), above)
            ties = tl.where(chunks == c, tl.sum(tl.where(keys == thr, 1, 0), axis=0), ties)
    need = kk - tl.sum(above, axis=0)  # ties to keep, in token order
    tl.store(above_ptr + row_chunks, above, mask=live)
    tl.store(ties_ptr + row_chunks, ties, mask=live)
    slot = tl.arange(0, 2)
    tl.store(row_state + 3 + slot, tl.where(slot == 0, thr, need))


@triton.jit
def _pivot_write_kernel(
    scores_ptr, lengths_ptr, state_ptr, above_ptr, ties_ptr, idx_ptr,
    stride_sb, stride_sr, stride_ib, stride_ir, num_rows, nch,
    CH: tl.constexpr, NCH_PAD: tl.constexpr, GROUP: tl.constexpr,
):
    c, pid, b, r, n, start = _chunk_program(lengths_ptr, num_rows, CH)
    if start < n:
        row_state = state_ptr + pid.to(tl.int64) * STATE
        thr = tl.load(row_state + 3)
        need = tl.load(row_state + 4)
        chunks = tl.arange(0, NCH_PAD)
        earlier = chunks < c
        row_chunks = pid.to(tl.int64) * nch + chunks
        ties_before = tl.sum(tl.load(ties_ptr + row_chunks, mask=earlier, other=0), axis=0)
        offset = tl.sum(tl.load(above_ptr + row_chunks, mask=earlier, other=0), axis=0) + tl.minimum(ties_before, need)
        ties_here = tl.load(ties_ptr + pid.to(tl.int64) * nch + c)
        tokens = start + tl.arange(0, CH // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [CH / GROUP, GROUP]
        keys = _load_keys(scores_ptr + b * stride_sb + r * stride_sr, tokens, n)
        _write_chunk(keys, tokens, thr, need, ties_before, ties_here, idx_ptr + b * stride_ib + r * stride_ir + offset, GROUP)
