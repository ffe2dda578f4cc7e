"""Keys and index lists shared by the selection kernels (select.py, select_pivot.py): float32 scores as
order-preserving int32 keys, prefix ranks of keep masks, the k-th key of a register tile, and the
write of one chunk's kept tokens."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order under signed comparison: sign-magnitude bits to two's
    complement, so -0.0 and +0.0 both map to 0 (they tie, as floats compare)."""
    i = x.to(tl.int32, bitcast=True)
    return tl.where(i < 0, -(i & 0x7FFFFFFF), i)


@triton.jit
def _load_keys(row_ptr, offs, n):
    """Keys at token offsets `offs` (any shape); INT32_MIN, below every real key, past n."""
    valid = offs < n
    x = tl.load(row_ptr + offs, mask=valid, other=0.0)
    return tl.where(valid, _ordered_key(x), -2147483648)


@triton.jit
def _popcount(x):
    """Set bits of int32 x (SWAR; arithmetic shifts are masked, so negative x works)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0x3F


@triton.jit
def _prefix_rank(mask, GROUP: tl.constexpr):
    """mask [NG, GROUP] (tokens in row-major order) -> int32 [NG, GROUP]: how many True come first;
    also returns the total."""
    lane = tl.arange(0, GROUP).to(tl.int64)
    bit = (tl.full([GROUP], 1, tl.int64) << lane).to(tl.int32)  # lane 31 -> sign bit
    below = ((tl.full([GROUP], 1, tl.int64) << lane) - 1).to(tl.int32)
    bits = tl.sum(tl.where(mask, bit[None, :], 0), axis=1)  # [NG] the group's mask (distinct bits: sum = or)
    counts = _popcount(bits)
    before = tl.cumsum(counts, axis=0) - counts  # [NG] kept in earlier groups
    return before[:, None] + _popcount(bits[:, None] & below[None, :]), tl.sum(counts, axis=0)


@triton.jit
def _bisect(lo, hi, mid, count, kk):
    """One bisection step of the threshold search: [lo, hi] narrowed by count = #(keys >= mid); a count
    of exactly kk ends the search at mid (lo = hi)."""
    ok = count >= kk
    return tl.where(ok, mid, lo), tl.where(count == kk, mid, tl.where(ok, hi, mid - 1))


@triton.jit
def _kth_key(keys, kk, lo, hi):
    """A threshold t in [lo, hi] with #(keys >= t) = kk if one exists, else the kk-th largest key,
    given #(keys >= lo) >= kk and that it lies in [lo, hi] (padding keys are INT32_MIN). lo, hi int64."""
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        lo, hi = _bisect(lo, hi, mid, tl.sum(tl.where(keys >= mid.to(tl.int32), 1, 0)), kk)
    return lo.to(tl.int32)


@triton.jit
def _write_chunk(keys, tokens, thr, need, ties_before, ties_here, out_ptr, GROUP: tl.constexpr):
    """Store, in token order from out_ptr on, a chunk's kept tokens: keys above the threshold, then keys
    equal to it while the row's ties taken so far (ties_before in earlier chunks) stay below `need`.
    keys, tokens [CH / GROUP, GROUP]; ties_here: the chunk's keys equal to thr."""
    if ties_before + ties_here <= need:  # every tie here is kept (or there is none)
        keep = keys >= thr
    elif ties_before >= need:  # none is
        keep = keys > thr
    else:  # the chunk where the kept ties run out: rank them
        tie_rank, _ = _prefix_rank(keys == thr, GROUP)
        keep = (keys > thr) | ((keys == thr) & (ties_before + tie_rank < need))
    pos, _ = _prefix_rank(keep, GROUP)
    tl.store(out_ptr + pos, tokens, mask=keep)


@triton.jit
def _chunk_program(lengths_ptr, num_rows, CH: tl.constexpr):
    """Where a program of a (chunks, rows) grid works: chunk c of selection row pid (sequence b, row r of
    it, b as int64 for pointer arithmetic), the sequence's length n and the chunk's first token."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // num_rows).to(tl.int64)
    return c, pid, b, pid % num_rows, tl.load(lengths_ptr + b), c * CH
