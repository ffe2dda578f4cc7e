"""Stage 2 of Loki decode: exact top-k per score row, as ascending lists of kept token indices.

Each row (b, r) of float32 scores keeps k_b = max(1, floor(kf x lengths[b])) of its lengths[b]
tokens. Scores map to order-preserving int32 keys (a negative float becomes minus its magnitude
bits, so -0.0 and +0.0 tie as floats do). One program per row holds the row's keys in registers
and finds a threshold t with #(keys >= t) = k, or else the k-th largest key, by bisection over the
key range: each step is one count (compare and add per key, one block reduction), ~20-32 steps,
stopping early when a count hits k. The scores are ~1% of the KV bytes and are read once.
Kept indices are then written in token order by a second kernel with a program per chunk of 1024
tokens (the row program stores its threshold and the kept count of each chunk, so a chunk knows
its offset): keys are held as [tokens / 32, 32], a 32-bit mask per group of 32 tokens gives each
kept token its rank inside the group (popcount of the bits below it), and a cumsum over the groups
gives the group offsets. Writing from one program per row instead cost as much as the search.
Rows with ties at the threshold (more keys equal to it than needed) are written by their row
program, in token order.

Rows longer than the register tile (BLOCK) go to a second kernel: a 512-bin histogram of the top 9
key bits (sign and exponent), then 32-bin histograms of 5 more bits while the bucket holding the
k-th key is larger than BLOCK, then that bucket is compacted into a scratch tile and bisected.

Ties: every key above the threshold is kept, then keys equal to it in increasing token order
until k are kept, so each row keeps exactly k tokens (torch.topk breaks such ties arbitrarily).

The budgets themselves come from a one-program kernel (`decode_budgets`): k = max(1, floor(kf x n))
in float64, as the oracle's token_budget computes them, in one launch instead of five torch ops.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._common import Pinned, keep_configs, launch, launch_args, pow2

DEFAULT_BLOCK_CAP = 16384  # longest row held in registers
GROUP = 32  # tokens per bit-mask group
WRITE_CHUNK = 1024  # tokens per program of the index-writing kernel
ROW_WRITTEN = tl.constexpr(2147483647)  # threshold slot of a row its own program wrote (only one NaN has this key)

# ----------------------------------------------------------------------------------------------
# JIT helpers


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
def _kth_key(keys, kk, lo, hi):
    """A threshold t in [lo, hi] with #(keys >= t) = kk if one exists, else the kk-th largest key,
    given #(keys >= lo) >= kk and that it lies in [lo, hi] (padding keys are INT32_MIN). lo, hi int64."""
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum(tl.where(keys >= mid.to(tl.int32), 1, 0))
        ok = count >= kk
        lo = tl.where(ok, mid, lo)
        hi = tl.where(count == kk, mid, tl.where(ok, hi, mid - 1))
    return lo.to(tl.int32)


@triton.jit
def _emit_row(row_ptr, n, thr, need, out_ptr, CHUNK: tl.constexpr, GROUP: tl.constexpr):
    """Write, in token order, the tokens kept by a row: keys > thr, then the first `need` keys equal
    to thr. Reads the row again in CHUNKs (it was just read: L2 holds it), so the big register tile
    is dead by now. One program per row: only for rows with ties at the threshold and rows longer
    than the register tile (others go to _write_kernel)."""
    tokens = tl.arange(0, CHUNK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [CHUNK / GROUP, GROUP]
    ties = n * 0
    written = n * 0
    for start in range(0, n, CHUNK):
        keys = _load_keys(row_ptr, start + tokens, n)
        eq = keys == thr
        tie_rank, n_eq = _prefix_rank(eq, GROUP)
        keep = (keys > thr) | (eq & (ties + tie_rank < need))
        ties += n_eq
        pos, n_keep = _prefix_rank(keep, GROUP)
        tl.store(out_ptr + written + pos, start + tokens, mask=keep)
        written += n_keep


@triton.jit
def _pick_bin(hist, kk, NB: tl.constexpr):
    """Bin of `hist` (counts per ascending digit) holding the kk-th largest; counts above and in it."""
    bins = tl.arange(0, NB)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    b = tl.max(tl.where(at_or_above >= kk, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > b, hist, 0), axis=0)
    inside = tl.sum(tl.where(bins == b, hist, 0), axis=0)
    return b, above, inside


# ----------------------------------------------------------------------------------------------
# Autotune configs: warps per row program (pruned to at most 64 keys per thread) and the tokens
# per step of the index-writing pass.


def _configs() -> list:
    return [triton.Config({"CHUNK": c}, num_warps=w) for c in (1024, 4096) for w in (4, 8, 16, 32)]


def _prune(configs, named_args, **kwargs):
    block = launch_args(named_args, kwargs)["BLOCK"]
    fits = lambda c: 32 * c.num_warps <= block <= 64 * 32 * c.num_warps and c.kwargs["CHUNK"] <= block  # noqa: E731
    return keep_configs(configs, fits)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _budget_kernel(lengths_ptr, budgets_ptr, kf_bits, num_seqs, BLOCK: tl.constexpr):
    """budgets[b] = max(1, floor(kf x lengths[b])), in float64 (kf arrives as its int64 bit pattern:
    a float scalar argument would be rounded to float32)."""
    offs = tl.arange(0, BLOCK)
    ok = offs < num_seqs
    n = tl.load(lengths_ptr + offs, mask=ok, other=0)
    kf = kf_bits.to(tl.int64).to(tl.float64, bitcast=True)
    k = tl.floor(n.to(tl.float64) * kf).to(tl.int32)
    tl.store(budgets_ptr + offs, tl.maximum(k, 1), mask=ok)


@triton.autotune(configs=_configs(), key=["BLOCK"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _select_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, idx_ptr, thr_ptr, counts_ptr,
    stride_sb, stride_sr, stride_ib, stride_ir,
    num_rows,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, NCH: tl.constexpr,
):
    """Rows of at most BLOCK tokens, held in registers; longer rows are left to _select_long_kernel."""
    pid = tl.program_id(0)
    b = (pid // num_rows).to(tl.int64)
    r = pid % num_rows
    n = tl.load(lengths_ptr + b)
    if n <= BLOCK:
        kk = tl.load(budgets_ptr + b)
        row_ptr = scores_ptr + b * stride_sb + r * stride_sr
        tokens = tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BLOCK / GROUP, GROUP]
        keys = _load_keys(row_ptr, tokens, n)
        thr = _kth_key(keys, kk, tl.full([], -2147483647, tl.int64), tl.full([], 2147483647, tl.int64))
        keep = tl.where(keys >= thr, 1, 0)  # [BLOCK / GROUP, GROUP]
        per_group = tl.sum(keep, axis=1)
        n_ge = tl.sum(per_group, axis=0)
        if n_ge > kk:  # ties at the threshold (rare with float scores): take them in token order here
            need = kk - tl.sum(tl.where(keys > thr, 1, 0))  # ties to keep, >= 1
            _emit_row(row_ptr, n, thr, need, idx_ptr + b * stride_ib + r * stride_ir, CHUNK, GROUP)
            tl.store(thr_ptr + pid, ROW_WRITTEN)  # nothing left for _write_kernel
        else:  # every key >= thr is kept: _write_kernel writes them, a program per chunk
            tl.store(thr_ptr + pid, thr)
            per_chunk = tl.sum(tl.reshape(per_group, [NCH, BLOCK // GROUP // NCH]), axis=1)
            tl.store(counts_ptr + pid.to(tl.int64) * NCH + tl.arange(0, NCH), per_chunk)


@triton.jit
def _write_kernel(
    scores_ptr, lengths_ptr, idx_ptr, thr_ptr, counts_ptr,
    stride_sb, stride_sr, stride_ib, stride_ir,
    num_rows,
    BLOCK: tl.constexpr, NCH: tl.constexpr, GROUP: tl.constexpr,
):
    """Kept tokens (key >= the row's threshold) of one chunk of BLOCK / NCH tokens, written at the
    chunk's offset in the row's list: the kept counts of the earlier chunks (from _select_kernel)
    summed. Many programs per row, so the writes of all rows overlap."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // num_rows).to(tl.int64)
    r = pid % num_rows
    n = tl.load(lengths_ptr + b)
    thr = tl.load(thr_ptr + pid)
    start = c * (BLOCK // NCH)
    if (n <= BLOCK) & (start < n) & (thr != ROW_WRITTEN):
        chunks = tl.arange(0, NCH)
        counts = tl.load(counts_ptr + pid.to(tl.int64) * NCH + chunks)
        offset = tl.sum(tl.where(chunks < c, counts, 0), axis=0)
        tokens = start + tl.arange(0, BLOCK // NCH // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        keys = _load_keys(scores_ptr + b * stride_sb + r * stride_sr, tokens, n)
        keep = keys >= thr
        pos, _ = _prefix_rank(keep, GROUP)
        tl.store(idx_ptr + b * stride_ib + r * stride_ir + offset + pos, tokens, mask=keep)


@triton.jit
def _select_long_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, idx_ptr, scratch_ptr,
    stride_sb, stride_sr, stride_ib, stride_ir,
    num_rows,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
):
    """Rows longer than BLOCK: narrow to one bucket of at most BLOCK keys, then as above."""
    pid = tl.program_id(0)
    b = (pid // num_rows).to(tl.int64)
    r = pid % num_rows
    n = tl.load(lengths_ptr + b)
    if n > BLOCK:
        kk = tl.load(budgets_ptr + b)
        row_ptr = scores_ptr + b * stride_sb + r * stride_sr
        offs = tl.arange(0, CHUNK)
        tokens = tl.arange(0, CHUNK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]

        # top 9 bits (sign, exponent): the bucket holding the kk-th largest key
        hist = tl.zeros([512], dtype=tl.int32)
        for start in range(0, n, CHUNK):
            chunk = _load_keys(row_ptr, start + offs, n)
            hist += tl.histogram((chunk >> 23) + 256, 512, mask=start + offs < n)
        b9, above, inside = _pick_bin(hist, kk, 512)
        prefix = b9 - 256
        resolved = n * 0 + 9
        while (inside > BLOCK) & (resolved < 32):  # 5 more bits at a time
            nbits = tl.minimum(32 - resolved, 5)
            shift = 32 - resolved - nbits
            sub = tl.zeros([32], dtype=tl.int32)
            for start in range(0, n, CHUNK):
                chunk = _load_keys(row_ptr, start + offs, n)
                match = (start + offs < n) & ((chunk >> (32 - resolved)) == prefix)
                digit = (chunk >> shift) & ((tl.full([], 1, tl.int32) << nbits) - 1)
                sub += tl.histogram(digit, 32, mask=match)
            b5, above5, inside = _pick_bin(sub, kk - above, 32)
            prefix = (prefix << nbits) | b5
            resolved += nbits
            above += above5

        # compact the bucket, in token order, into this row's scratch tile and bisect it there
        scratch_row = scratch_ptr + pid.to(tl.int64) * BLOCK
        written = n * 0
        for start in range(0, n, CHUNK):
            chunk = _load_keys(row_ptr, start + tokens, n)
            match = (chunk >> (32 - resolved)) == prefix
            match = match & (start + tokens < n)
            pos, n_match = _prefix_rank(match, GROUP)
            tl.store(scratch_row + written + pos, chunk, mask=match & (written + pos < BLOCK))
            written += n_match
        tl.debug_barrier()  # the tile is read back by other threads of this program
        tile = tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        keys = tl.load(scratch_row + tile, mask=tile < tl.minimum(inside, BLOCK), other=-2147483648)
        lo = prefix.to(tl.int64) << (32 - resolved)  # the bucket's key range: thr must stay inside it
        hi = lo + (tl.full([], 1, tl.int64) << (32 - resolved)) - 1
        thr = _kth_key(keys, kk - above, lo, hi)
        need = kk - above - tl.sum(tl.where(keys > thr, 1, 0))

        _emit_row(row_ptr, n, thr, need, idx_ptr + b * stride_ib + r * stride_ir, CHUNK, GROUP)


_SELECT = Pinned(_select_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers


def workspace(b: int, rows: int, s: int, block: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Scratch of one selection: each row's threshold, kept counts per write chunk, and (rows longer
    than the register tile) a tile per row for the bucket being bisected."""
    nch = max(1, block // WRITE_CHUNK)
    empty = lambda n: torch.empty(n, dtype=torch.int32, device=device)  # noqa: E731
    return {"thr": empty(b * rows), "counts": empty(b * rows * nch), "scratch": empty(b * rows * block if s > block else 0)}


def _launch(
    *, scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, idx: torch.Tensor, block: int,
    thr: torch.Tensor, counts: torch.Tensor, scratch: torch.Tensor,
) -> None:
    b, rows, s = scores.shape
    nch = max(1, block // WRITE_CHUNK)
    assert scores.dtype == torch.float32 and scores.stride(-1) == 1
    assert lengths.shape == (b,) and budgets.shape == (b,) and lengths.dtype == budgets.dtype == torch.int32
    assert idx.shape[:2] == (b, rows) and idx.dtype == torch.int32 and idx.stride(-1) == 1
    assert block == triton.next_power_of_2(block) and block >= 128, block
    assert thr.numel() == b * rows and counts.numel() == b * rows * nch and (s <= block or scratch.numel() == b * rows * block)
    common = dict(
        scores_ptr=scores, lengths_ptr=lengths, budgets_ptr=budgets, idx_ptr=idx,
        stride_sb=scores.stride(0), stride_sr=scores.stride(1), stride_ib=idx.stride(0), stride_ir=idx.stride(1),
        num_rows=rows, BLOCK=block, GROUP=GROUP,
    )
    _SELECT.launch((b * rows,), (), thr_ptr=thr, counts_ptr=counts, **common, NCH=nch)
    launch(
        _write_kernel, (nch, b * rows),
        scores_ptr=scores, lengths_ptr=lengths, idx_ptr=idx, thr_ptr=thr, counts_ptr=counts,
        stride_sb=scores.stride(0), stride_sr=scores.stride(1), stride_ib=idx.stride(0), stride_ir=idx.stride(1),
        num_rows=rows, BLOCK=block, NCH=nch, GROUP=GROUP, num_warps=4,
    )
    if s > block:
        launch(_select_long_kernel, (b * rows,), scratch_ptr=scratch, **common, CHUNK=min(block, 2048), num_warps=16 if block >= 8192 else 8)


def _launch_budgets(*, lengths: torch.Tensor, budgets: torch.Tensor, kf: float) -> None:
    assert lengths.dim() == 1 and lengths.dtype == torch.int32 and budgets.shape == lengths.shape and budgets.dtype == torch.int32
    assert 0 < kf <= 1, kf
    kf_bits = struct.unpack("<q", struct.pack("<d", kf))[0]
    launch(
        _budget_kernel, (1,), lengths_ptr=lengths, budgets_ptr=budgets, kf_bits=kf_bits, num_seqs=lengths.shape[0], BLOCK=pow2(lengths.shape[0], 16)
    )


# ----------------------------------------------------------------------------------------------
# Public wrappers


def decode_budgets(lengths: torch.Tensor, kf: float) -> torch.Tensor:
    """int32 [B] budgets k = max(1, floor(kf x lengths[b])) of lengths [B] int32: the values of the
    oracle's decode_budget (float64 product, floored), in one launch and no host sync."""
    budgets = torch.empty_like(lengths)
    _launch_budgets(lengths=lengths, budgets=budgets, kf=kf)
    return budgets


def tile(s: int, block_cap: int = DEFAULT_BLOCK_CAP) -> int:
    """Tokens a row program holds in registers: the row length, as a power of two in [128, block_cap]."""
    return min(pow2(s, 128), pow2(block_cap, 128))


def select_topk(
    scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, *, kmax: int, block_cap: int = DEFAULT_BLOCK_CAP
) -> torch.Tensor:
    """Kept token indices [B, R, kmax] int32 of scores [B, R, S]: row (b, r) lists its budgets[b]
    largest-scoring tokens among the first lengths[b], ascending; entries past budgets[b] are undefined."""
    b, rows, s = scores.shape
    idx = torch.empty(b, rows, kmax, dtype=torch.int32, device=scores.device)
    block = tile(s, block_cap)
    if lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)
    if budgets.dtype != torch.int32:
        budgets = budgets.to(torch.int32)
    _launch(scores=scores, lengths=lengths, budgets=budgets, idx=idx, block=block, **workspace(b, rows, s, block, scores.device))
    return idx


def kept_mask(idx: torch.Tensor, budgets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Keep mask [B, R, seq_len] (bool) from kept indices, as loki.decode_select returns it."""
    b, rows, kmax = idx.shape
    ranks = torch.arange(kmax, device=idx.device)
    listed = ranks[None, None, :] < budgets.to(idx.device)[:, None, None]
    mask = torch.zeros(b, rows, seq_len + 1, dtype=torch.bool, device=idx.device)
    # unlisted slots (undefined contents) scatter into a spare column that is dropped
    target = torch.where(listed, idx.long().clamp(0, seq_len - 1), torch.full_like(idx, seq_len, dtype=torch.long))
    mask.scatter_(-1, target, True)
    return mask[..., :seq_len]
