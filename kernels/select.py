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

Split mode (`choose_mode`): rows too few to fill the card (batch 1: 40 rows for 132 multiprocessors)
or longer than the register tile run over a grid of chunks x rows instead. Four radix passes of 8
bits find the k-th largest key exactly: each program histograms its chunk's keys that match the
prefix fixed so far and adds the nonzero bins into the row's histogram; the next pass picks the bin
holding the k-th key from it. The last pass also stores, per chunk, its keys above the 24-bit bucket
and the suffix sums of its histogram, so the write pass (a program per chunk again) knows from the
threshold alone how many tokens earlier chunks keep, ties included. Five launches, each reading the
row's scores (in L2 by then) once.

Ties: every key above the threshold is kept, then keys equal to it in increasing token order
until k are kept, so each row keeps exactly k tokens (torch.topk breaks such ties arbitrarily).

The budgets themselves come from a one-program kernel (`decode_budgets`): k = max(1, floor(kf x n))
in float64, as the oracle's token_budget computes them, in one launch instead of five torch ops.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import Pinned, float_bits, keep_configs, launch, launch_args, multiprocessors, pow2, write_budgets

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
    """budgets[b] = max(1, floor(kf x lengths[b])) (_common.write_budgets; loki_decode has the score
    kernel write them instead, saving a launch)."""
    write_budgets(lengths_ptr, budgets_ptr, kf_bits, num_seqs, BLOCK)


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


# Split selection: one row over many programs (a grid of chunks x rows), for rows too few to fill the
# card (batch 1) and rows longer than the register tile. Four radix passes of 8 bits find the row's
# k-th largest key exactly: each pass histograms the chunk's keys whose higher digits match the
# prefix fixed so far and adds the nonzero bins into the row's histogram; the next pass picks the bin
# holding the k-th key from it. Past the first pass few keys match the prefix, and a chunk with few
# adds them by an atomic each instead of a block histogram. The scores of a row sit in L2 between passes.

NPASS = tl.constexpr(4)
SPARSE = tl.constexpr(16)  # a chunk with fewer than CH / SPARSE keys in the bucket adds them one atomic each


@triton.jit
def _radix_digit(keys, PASS: tl.constexpr):
    """The PASS-th 8-bit digit of int32 keys, most significant first (pass 0 signed, shifted to 0..255).
    Within equal higher digits, lower digits order as the keys do (two's complement)."""
    if PASS == 0:
        digit = (keys >> 24) + 128
    else:
        digit = (keys >> (24 - 8 * PASS)) & 255
    return digit


@triton.jit
def _radix_descend(hist_ptr, state_ptr, kk, PASS: tl.constexpr, NB: tl.constexpr):
    """(prefix, remaining) after the digit of pass PASS: the key's top 8 x (PASS + 1) bits (signed, as
    `keys >> shift` gives them) and how many of the kk largest keys lie in that bucket. Pass 0 starts
    from the whole row; later passes continue from what the pass after the previous one stored in
    state_ptr (slot PASS - 1)."""
    if PASS == 0:
        prefix = kk * 0
        remaining = kk
    else:
        prefix = tl.load(state_ptr + 2 * (PASS - 1))
        remaining = tl.load(state_ptr + 2 * (PASS - 1) + 1)
    hist = tl.load(hist_ptr + PASS * NB + tl.arange(0, NB))
    digit, above, _ = _pick_bin(hist, remaining, NB)
    if PASS == 0:
        prefix = digit - 128
    else:
        prefix = (prefix << 8) | digit
    return prefix, remaining - above


@triton.jit
def _radix_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, hist_ptr, state_ptr, gt_ptr, suffix_ptr,
    stride_sb, stride_sr,
    num_rows, nch,
    PASS: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr,
):
    """Pass PASS (0..3) of the radix search over one chunk of one row. Program 0 of a row stores the
    bucket it read from the previous pass (state slot PASS - 1: later passes need not read that
    histogram again) and keeps the scratch clean for the next call: pass 0 zeroes the histograms of
    passes 1-3, pass p >= 2 that of pass p - 2 (no reader left). The last pass also stores, per chunk,
    its keys above the 24-bit bucket and the suffix sums of its histogram, so the write pass knows each
    chunk's offset from the final digit alone."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // num_rows).to(tl.int64)
    r = pid % num_rows
    n = tl.load(lengths_ptr + b)
    start = c * CH
    if start < n:
        kk = tl.load(budgets_ptr + b)
        bins = tl.arange(0, NB)
        row_hist = hist_ptr + pid.to(tl.int64) * NPASS * NB
        row_state = state_ptr + pid.to(tl.int64) * 2 * NPASS
        offs = start + tl.arange(0, CH)
        valid = offs < n
        keys = _load_keys(scores_ptr + b * stride_sb + r * stride_sr, offs, n)
        prefix = kk * 0
        if PASS > 0:
            prefix, remaining = _radix_descend(row_hist, row_state, kk, PASS - 1, NB)
            if c == 0:
                two = tl.arange(0, 2)
                tl.store(row_state + 2 * (PASS - 1) + two, tl.where(two == 0, prefix, remaining))
        if PASS == 0:
            match = valid
        else:  # keys whose digits above this pass equal the prefix
            match = valid & ((keys >> (32 - 8 * PASS)) == prefix)
        digit = _radix_digit(keys, PASS)
        n_match = tl.sum(tl.where(match, 1, 0), axis=0)
        hist = tl.zeros([NB], tl.int32)
        if n_match * SPARSE > CH:  # many keys in the bucket: a block histogram, one atomic per bin
            hist = tl.histogram(digit, NB, mask=match)
            tl.atomic_add(row_hist + PASS * NB + bins, hist, mask=hist > 0, sem="relaxed")
        elif PASS < NPASS - 1:  # few (the usual case past pass 1): an atomic per key, no histogram
            tl.atomic_add(row_hist + PASS * NB + digit, tl.full([CH], 1, tl.int32), mask=match, sem="relaxed")
        else:  # the last pass needs this chunk's histogram too (its suffix sums)
            if n_match > 0:
                hist = tl.histogram(digit, NB, mask=match)
                tl.atomic_add(row_hist + PASS * NB + bins, hist, mask=hist > 0, sem="relaxed")
        if c == 0:
            zeros = tl.zeros([NB], tl.int32)
            if PASS == 0:
                for p in tl.static_range(1, NPASS):
                    tl.store(row_hist + p * NB + bins, zeros)
            else:
                if PASS >= 2:
                    tl.store(row_hist + (PASS - 2) * NB + bins, zeros)
        if PASS == NPASS - 1:
            chunk = pid.to(tl.int64) * nch + c
            tl.store(gt_ptr + chunk, tl.sum(tl.where(valid & ((keys >> 8) > prefix), 1, 0), axis=0))
            at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # [NB] keys of the bucket with digit >= bin
            tl.store(suffix_ptr + chunk * NB + bins, at_or_above)


@triton.jit
def _radix_write_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, hist_ptr, state_ptr, gt_ptr, suffix_ptr, idx_ptr,
    stride_sb, stride_sr, stride_ib, stride_ir,
    num_rows, nch,
    CH: tl.constexpr, NB: tl.constexpr, NCH_PAD: tl.constexpr, GROUP: tl.constexpr,
):
    """The kept tokens of one chunk, in token order, at the chunk's offset in the row's list: keys
    above the threshold, then keys equal to it while the row's ties taken so far (earlier chunks
    first) stay below the number needed."""
    c = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // num_rows).to(tl.int64)
    r = pid % num_rows
    n = tl.load(lengths_ptr + b)
    start = c * CH
    if start < n:
        kk = tl.load(budgets_ptr + b)
        row_hist = hist_ptr + pid.to(tl.int64) * NPASS * NB
        thr, need = _radix_descend(row_hist, state_ptr + pid.to(tl.int64) * 2 * NPASS, kk, NPASS - 1, NB)
        low = thr & (NB - 1)  # the last digit of the threshold
        chunks = tl.arange(0, NCH_PAD)
        earlier = chunks < c
        base = pid.to(tl.int64) * nch + chunks
        ge = tl.load(suffix_ptr + base * NB + low, mask=earlier, other=0)  # keys of the 24-bit bucket >= thr
        gt_low = tl.load(suffix_ptr + base * NB + low + 1, mask=earlier & (chunks * 0 + low < NB - 1), other=0)
        above = tl.load(gt_ptr + base, mask=earlier, other=0) + gt_low
        ties_before = tl.sum(ge - gt_low, axis=0)
        offset = tl.sum(above, axis=0) + tl.minimum(ties_before, need)

        mine = pid.to(tl.int64) * nch + c
        ties_here = tl.load(suffix_ptr + mine * NB + low)
        if low < NB - 1:
            ties_here -= tl.load(suffix_ptr + mine * NB + low + 1)

        tokens = start + tl.arange(0, CH // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [CH / GROUP, GROUP]
        keys = _load_keys(scores_ptr + b * stride_sb + r * stride_sr, tokens, n)
        if ties_before + ties_here <= need:  # every tie here is kept (or there is none)
            keep = keys >= thr
        elif ties_before >= need:  # none is
            keep = keys > thr
        else:  # the chunk where the kept ties run out: rank them
            tie_rank, _ = _prefix_rank(keys == thr, GROUP)
            keep = (keys > thr) | ((keys == thr) & (ties_before + tie_rank < need))
        pos, _ = _prefix_rank(keep, GROUP)
        tl.store(idx_ptr + b * stride_ib + r * stride_ir + offset + pos, tokens, mask=keep)


_SELECT = Pinned(_select_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers

RADIX_BINS = 256  # bins of each of the 4 radix passes (8-bit digits)
RADIX_PASSES = 4
MODES = ("auto", "row", "split")


def split_chunk(s: int) -> int:
    """Tokens per program of the split selection: programs enough to fill the card at batch 1 (at
    least 4 per row), each histogram pass a few thousand keys per program."""
    if s <= 8192:
        return max(GROUP, min(1024, pow2(triton.cdiv(s, 4))))
    return 2048 if s <= 32768 else 4096


def choose_mode(total_rows: int, s: int, num_sms: int, block_cap: int = DEFAULT_BLOCK_CAP) -> str:
    """"split" (a row over many programs) for rows longer than the register tile, "row" (a program
    per row) otherwise. On an H200 (benchmarks/select_modes.py, llama2-13b / llama3-8b shapes, kf 0.25)
    the row kernel was faster wherever it can run, batch 1 included (40 rows on 132 multiprocessors):
    select 17 vs 25 us at 4k, 29 vs 36 us at 16k; at 16k batch 16, 33 vs 66 us (128 rows, group kv)
    and 98 vs 253 us (640 rows). The split mode's five dependent launches cost more than the idle
    multiprocessors gain. LOKITOOL_SELECT=row|split forces one where both can run (benchmarks)."""
    forced = os.environ.get("LOKITOOL_SELECT", "auto")
    if forced not in MODES:
        raise ValueError(f"LOKITOOL_SELECT={forced!r} is not one of {', '.join(MODES)}")
    if s > pow2(block_cap, 128):
        return "split"  # the row kernel holds whole rows only
    return "row" if forced == "auto" else forced


def selection_mode(total_rows: int, s: int, device: torch.device) -> str:
    """The mode loki_decode's selection runs in for total_rows rows of s tokens on this device."""
    return choose_mode(total_rows, s, multiprocessors(device))


class SelectPlan:
    """How one selection of scores [B, R, S] runs, and its scratch. mode "row": a program per row
    holding BLOCK keys (thresholds and kept counts per write chunk). mode "split": chunks of CHUNK
    tokens, a program each (radix histograms [B x R, RADIX_PASSES, RADIX_BINS], kept zero between calls;
    per-row state; per-chunk counts and suffix sums)."""

    def __init__(self, b: int, rows: int, s: int, device: torch.device, *, mode: str, block_cap: int = DEFAULT_BLOCK_CAP, chunk: int | None = None):
        assert mode in ("row", "split"), mode
        self.mode = mode
        i32 = dict(dtype=torch.int32, device=device)
        if mode == "row":
            self.block = tile(s, block_cap)
            assert s <= self.block, (s, self.block)
            nch = max(1, self.block // WRITE_CHUNK)
            self.ws = {"thr": torch.empty(b * rows, **i32), "counts": torch.empty(b * rows * nch, **i32)}
        else:
            self.chunk = chunk or split_chunk(s)
            assert self.chunk == triton.next_power_of_2(self.chunk) and self.chunk >= GROUP, self.chunk
            self.nch = triton.cdiv(s, self.chunk)
            self.ws = {
                "hist": torch.zeros(b * rows * RADIX_PASSES * RADIX_BINS, **i32),  # zero on entry: each call leaves it so
                "state": torch.empty(b * rows * 2 * RADIX_PASSES, **i32),
                "gt": torch.empty(b * rows * self.nch, **i32),
                "suffix": torch.empty(b * rows * self.nch * RADIX_BINS, **i32),
            }


def _launch(*, scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, idx: torch.Tensor, plan: SelectPlan) -> None:
    b, rows, s = scores.shape
    assert scores.dtype == torch.float32 and scores.stride(-1) == 1
    assert lengths.shape == (b,) and budgets.shape == (b,) and lengths.dtype == budgets.dtype == torch.int32
    assert idx.shape[:2] == (b, rows) and idx.dtype == torch.int32 and idx.stride(-1) == 1
    strides = dict(stride_sb=scores.stride(0), stride_sr=scores.stride(1))
    if plan.mode == "split":
        ws = plan.ws
        assert ws["hist"].numel() == b * rows * RADIX_PASSES * RADIX_BINS and ws["suffix"].numel() == b * rows * plan.nch * RADIX_BINS
        common = dict(
            scores_ptr=scores, lengths_ptr=lengths, budgets_ptr=budgets, hist_ptr=ws["hist"], state_ptr=ws["state"],
            gt_ptr=ws["gt"], suffix_ptr=ws["suffix"], **strides, num_rows=rows, nch=plan.nch, CH=plan.chunk, NB=RADIX_BINS,
        )
        warps = 8 if plan.chunk >= 2048 else 4
        for p in range(RADIX_PASSES):
            launch(_radix_kernel, (plan.nch, b * rows), **common, PASS=p, num_warps=warps)
        launch(
            _radix_write_kernel, (plan.nch, b * rows), **common, idx_ptr=idx, stride_ib=idx.stride(0), stride_ir=idx.stride(1),
            NCH_PAD=pow2(plan.nch), GROUP=GROUP, num_warps=warps,
        )
        return
    block = plan.block
    nch = max(1, block // WRITE_CHUNK)
    thr, counts = plan.ws["thr"], plan.ws["counts"]
    assert block == triton.next_power_of_2(block) and block >= 128 and s <= block, (block, s)
    assert thr.numel() == b * rows and counts.numel() == b * rows * nch
    common = dict(
        scores_ptr=scores, lengths_ptr=lengths, idx_ptr=idx, thr_ptr=thr, counts_ptr=counts, **strides,
        stride_ib=idx.stride(0), stride_ir=idx.stride(1), num_rows=rows, BLOCK=block, GROUP=GROUP, NCH=nch,
    )
    _SELECT.launch((b * rows,), (), budgets_ptr=budgets, **common)
    launch(_write_kernel, (nch, b * rows), **common, num_warps=4)


def _launch_budgets(*, lengths: torch.Tensor, budgets: torch.Tensor, kf: float) -> None:
    assert lengths.dim() == 1 and lengths.dtype == torch.int32 and budgets.shape == lengths.shape and budgets.dtype == torch.int32
    assert 0 < kf <= 1, kf
    kf_bits = float_bits(kf)
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
    scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, *, kmax: int, block_cap: int = DEFAULT_BLOCK_CAP,
    mode: str = "auto", chunk: int | None = None,
) -> torch.Tensor:
    """Kept token indices [B, R, kmax] int32 of scores [B, R, S]: row (b, r) lists its budgets[b]
    largest-scoring tokens among the first lengths[b], ascending; entries past budgets[b] are undefined.
    mode "row" (a program per row, rows up to block_cap), "split" (chunks of `chunk` tokens over many
    programs) or "auto" (choose_mode)."""
    b, rows, s = scores.shape
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    idx = torch.empty(b, rows, kmax, dtype=torch.int32, device=scores.device)
    if mode == "auto" or s > pow2(block_cap, 128):
        mode = choose_mode(b * rows, s, multiprocessors(scores.device), block_cap) if mode == "auto" else "split"
    if lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)
    if budgets.dtype != torch.int32:
        budgets = budgets.to(torch.int32)
    plan = SelectPlan(b, rows, s, scores.device, mode=mode, block_cap=block_cap, chunk=chunk)
    _launch(scores=scores, lengths=lengths, budgets=budgets, idx=idx, plan=plan)
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
