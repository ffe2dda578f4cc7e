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

Split mode (`choose_mode`): rows longer than the register tile (32768 keys; rows past 16384 only
where they are at least a quarter as many as the multiprocessors) run over a grid of chunks x rows
instead. Four radix passes of 8
bits find the k-th largest key exactly: each program histograms its chunk's keys that match the
prefix fixed so far and adds the nonzero bins into the row's histogram; the next pass picks the bin
holding the k-th key from it. The last pass also stores, per chunk, its keys above the 24-bit bucket
and the suffix sums of its histogram, so the write pass (a program per chunk again) knows from the
threshold alone how many tokens earlier chunks keep, ties included. Five launches, each reading the
row's scores (in L2 by then) once. Pivot mode (select_pivot.py) brackets the k-th key from a sorted
sample of the row and reads the row twice instead; choose_mode picks it where there are many keys.

Ties: every key above the threshold is kept, then keys equal to it in increasing token order
until k are kept, so each row keeps exactly k tokens (torch.topk breaks such ties arbitrarily).

The budgets themselves come from a one-program kernel (`decode_budgets`): k = max(1, floor(kf x n))
in float64, as the oracle's token_budget computes them, in one launch instead of five torch ops.
"""

from __future__ import annotations

import os
from functools import partial

import torch
import triton
import triton.language as tl

from . import select_pivot
from ._common import Pinned, env_pow2, float_bits, keep_configs, launch, launch_args, multiprocessors, pow2, write_budgets
from .select_keys import _chunk_program, _kth_key, _load_keys, _prefix_rank, _write_chunk

DEFAULT_BLOCK_CAP = 32768  # longest row held in registers (LOKITOOL_ROW_CAP overrides: row_cap)
SHORT_ROW = 16384  # rows up to this go to the row kernel however few; longer ones only where rows are many
GROUP = 32  # tokens per bit-mask group
WRITE_CHUNK = 1024  # tokens per program of the index-writing kernel
ROW_WRITTEN = tl.constexpr(2147483647)  # threshold slot of a row its own program wrote (only one NaN has this key)

# ----------------------------------------------------------------------------------------------
# JIT helpers


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
    c, pid, b, r, n, start = _chunk_program(lengths_ptr, num_rows, BLOCK // NCH)
    thr = tl.load(thr_ptr + pid)
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
# card (batch 1) and rows longer than the register tile. Radix passes over the row's int32 keys, most
# significant digit first (digit widths `DIGITS`, summing to 32), find its k-th largest key exactly:
# each pass histograms the chunk's keys whose higher digits match the prefix fixed so far and adds the
# nonzero bins into the row's histogram; the next pass picks the bin holding the k-th key from it.
# A float's top 8 bits leave ~28% of a row's scores in the k-th key's bucket (sign and 7 of 8 exponent
# bits), so two passes histogram large buckets; wider digits would save a pass, but tl.histogram's cost
# grows with its bins: on an H200 (benchmarks/select_profile.py, B=16 x 40 rows of 131072) a 12-bit first
# pass took 6.2 ms against 0.35 ms for 8 bits. Past the second pass few keys match the prefix, and a chunk
# with few adds them by an atomic each instead of a block histogram. select_pivot.py reads a row twice
# instead of five times. The scores of a row sit in L2 between passes where they fit.

SPARSE = tl.constexpr(16)  # a chunk with fewer than CH / SPARSE keys in the bucket adds them one atomic each


@triton.jit
def _radix_digit(keys, PASS: tl.constexpr, SHIFT: tl.constexpr, NB: tl.constexpr):
    """The digit of pass PASS: the NB-bin field of int32 keys above their SHIFT low bits (pass 0 signed,
    shifted to 0..NB-1). Within equal higher digits, lower digits order as the keys do (two's complement)."""
    if PASS == 0:
        digit = (keys >> SHIFT) + NB // 2
    else:
        digit = (keys >> SHIFT) & (NB - 1)
    return digit


@triton.jit
def _radix_descend(hist_ptr, state_ptr, kk, Q: tl.constexpr, Q_OFF: tl.constexpr, Q_NB: tl.constexpr):
    """(prefix, remaining) after the digit of pass Q (its NB bins at Q_OFF of the row's histograms):
    the key's digits up to and including Q (signed, as `keys >> shift` gives them) and how many of the kk
    largest keys lie in that bucket. Pass 0 starts from the whole row; later passes continue from what
    the pass after the previous one stored in state_ptr (slot Q - 1)."""
    if Q == 0:
        prefix = kk * 0
        remaining = kk
    else:
        prefix = tl.load(state_ptr + 2 * (Q - 1))
        remaining = tl.load(state_ptr + 2 * (Q - 1) + 1)
    hist = tl.load(hist_ptr + Q_OFF + tl.arange(0, Q_NB))
    digit, above, _ = _pick_bin(hist, remaining, Q_NB)
    if Q == 0:
        prefix = digit - Q_NB // 2
    else:
        prefix = prefix * Q_NB + digit  # (prefix << width) | digit
    return prefix, remaining - above


@triton.jit
def _radix_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, hist_ptr, state_ptr, gt_ptr, suffix_ptr,
    stride_sb, stride_sr,
    num_rows, nch,
    PASS: tl.constexpr, NPASS: tl.constexpr, SHIFT: tl.constexpr, NB: tl.constexpr, OFF: tl.constexpr,
    P_SHIFT: tl.constexpr, P_NB: tl.constexpr, P_OFF: tl.constexpr, Z_OFF: tl.constexpr, Z_SIZE: tl.constexpr,
    Z_BLOCK: tl.constexpr, HIST_ROW: tl.constexpr, CH: tl.constexpr,
):
    """Pass PASS of NPASS of the radix search over one chunk of one row: its digit is the NB-bin field
    above SHIFT bits, its histogram at OFF of the row's HIST_ROW ints (P_*: the previous pass's).
    Program 0 of a row stores the bucket it read from the previous pass (state slot PASS - 1: later passes
    need not read that histogram again) and keeps the scratch clean for the next call: it zeroes Z_SIZE
    ints at Z_OFF (pass 0: every later pass's histogram; pass p >= 2: pass p - 2's, which has no reader
    left). The last pass also stores, per chunk, its keys above the last digit's bucket and the suffix
    sums of its histogram, so the write pass knows each chunk's offset from the final digit alone."""
    c, pid, b, r, n, start = _chunk_program(lengths_ptr, num_rows, CH)
    if start < n:
        kk = tl.load(budgets_ptr + b)
        bins = tl.arange(0, NB)
        row_hist = hist_ptr + pid.to(tl.int64) * HIST_ROW
        row_state = state_ptr + pid.to(tl.int64) * 2 * NPASS
        offs = start + tl.arange(0, CH)
        valid = offs < n
        keys = _load_keys(scores_ptr + b * stride_sb + r * stride_sr, offs, n)
        prefix = kk * 0
        if PASS > 0:
            prefix, remaining = _radix_descend(row_hist, row_state, kk, PASS - 1, P_OFF, P_NB)
            if c == 0:
                two = tl.arange(0, 2)
                tl.store(row_state + 2 * (PASS - 1) + two, tl.where(two == 0, prefix, remaining))
        if PASS == 0:
            match = valid
        else:  # keys whose digits above this pass equal the prefix
            match = valid & ((keys >> P_SHIFT) == prefix)
        digit = _radix_digit(keys, PASS, SHIFT, NB)
        n_match = tl.sum(tl.where(match, 1, 0), axis=0)
        hist = tl.zeros([NB], tl.int32)
        if n_match * SPARSE > CH:  # many keys in the bucket: a block histogram, one atomic per bin
            hist = tl.histogram(digit, NB, mask=match)
            tl.atomic_add(row_hist + OFF + bins, hist, mask=hist > 0, sem="relaxed")
        elif PASS < NPASS - 1:  # few (the usual case past pass 0): an atomic per key, no histogram
            tl.atomic_add(row_hist + OFF + digit, tl.full([CH], 1, tl.int32), mask=match, sem="relaxed")
        else:  # the last pass needs this chunk's histogram too (its suffix sums)
            if n_match > 0:
                hist = tl.histogram(digit, NB, mask=match)
                tl.atomic_add(row_hist + OFF + bins, hist, mask=hist > 0, sem="relaxed")
        if Z_SIZE > 0:
            if c == 0:
                zo = tl.arange(0, Z_BLOCK)
                tl.store(row_hist + Z_OFF + zo, tl.zeros([Z_BLOCK], tl.int32), mask=zo < Z_SIZE)
        if PASS == NPASS - 1:
            chunk = pid.to(tl.int64) * nch + c
            tl.store(gt_ptr + chunk, tl.sum(tl.where(valid & ((keys >> P_SHIFT) > prefix), 1, 0), axis=0))
            at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # [NB] keys of the bucket with digit >= bin
            tl.store(suffix_ptr + chunk * NB + bins, at_or_above)


@triton.jit
def _radix_write_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, hist_ptr, state_ptr, gt_ptr, suffix_ptr, idx_ptr,
    stride_sb, stride_sr, stride_ib, stride_ir,
    num_rows, nch,
    NPASS: tl.constexpr, NB: tl.constexpr, OFF: tl.constexpr, HIST_ROW: tl.constexpr,
    CH: tl.constexpr, NCH_PAD: tl.constexpr, GROUP: tl.constexpr,
):
    """The kept tokens of one chunk, in token order, at the chunk's offset in the row's list: keys
    above the threshold, then keys equal to it while the row's ties taken so far (earlier chunks
    first) stay below the number needed. NB, OFF: the last pass's bins and histogram offset."""
    c, pid, b, r, n, start = _chunk_program(lengths_ptr, num_rows, CH)
    if start < n:
        kk = tl.load(budgets_ptr + b)
        row_hist = hist_ptr + pid.to(tl.int64) * HIST_ROW
        thr, need = _radix_descend(row_hist, state_ptr + pid.to(tl.int64) * 2 * NPASS, kk, NPASS - 1, OFF, NB)
        low = thr & (NB - 1)  # the last digit of the threshold
        chunks = tl.arange(0, NCH_PAD)
        earlier = chunks < c
        base = pid.to(tl.int64) * nch + chunks
        ge = tl.load(suffix_ptr + base * NB + low, mask=earlier, other=0)  # keys of the last bucket >= thr
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
        _write_chunk(keys, tokens, thr, need, ties_before, ties_here, idx_ptr + b * stride_ib + r * stride_ir + offset, GROUP)


_SELECT = Pinned(_select_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers

DIGITS = (8, 8, 8, 8)  # bits per radix pass, most significant first (benchmarks/select_profile.py: wider digits cost more in tl.histogram than the pass they save)


def radix_passes(digits: tuple[int, ...] = DIGITS) -> list[dict]:
    """Each pass's constants for _radix_kernel: its digit (SHIFT low bits below it, NB bins), where its
    histogram sits in the row's (OFF), the previous pass's, and what its program 0 zeroes."""
    assert sum(digits) == 32 and all(1 <= w <= 12 for w in digits) and digits[-1] <= 10, digits
    offs = [sum(1 << w for w in digits[:p]) for p in range(len(digits) + 1)]
    row = offs[-1]
    passes = []
    for p, w in enumerate(digits):
        shift = 32 - sum(digits[: p + 1])
        if p == 0:
            z_off, z_size = offs[1], row - offs[1]  # every later pass's histogram
        elif p >= 2:
            z_off, z_size = offs[p - 2], 1 << digits[p - 2]
        else:
            z_off, z_size = 0, 0
        prev = passes[-1] if passes else dict(SHIFT=32, NB=1, OFF=0)
        passes.append(dict(
            PASS=p, NPASS=len(digits), SHIFT=shift, NB=1 << w, OFF=offs[p], P_SHIFT=prev["SHIFT"], P_NB=prev["NB"],
            P_OFF=prev["OFF"], Z_OFF=z_off, Z_SIZE=z_size, Z_BLOCK=pow2(max(z_size, 1)), HIST_ROW=row,
        ))
    return passes


MODES = ("auto", "row", "split", "pivot")
PIVOT_MIN_KEYS = 1 << 22  # choose_mode: pivot past the register tile once rows x tokens reach this


def split_chunk(s: int) -> int:
    """Tokens per program of the split selection: programs enough to fill the card at batch 1 (at
    least 4 per row), each histogram pass a few thousand keys per program."""
    if s <= 8192:
        return max(GROUP, min(1024, pow2(triton.cdiv(s, 4))))
    return 2048 if s <= 32768 else 4096


def split_warps(chunk: int) -> int:
    return 16 if chunk >= 8192 else 8 if chunk >= 2048 else 4


def row_cap() -> int:
    """Longest row the row kernel holds in registers: DEFAULT_BLOCK_CAP, or LOKITOOL_ROW_CAP (a power of
    two from 128 to 65536; benchmarks compare longer register tiles with the split and pivot modes)."""
    return env_pow2("LOKITOOL_ROW_CAP", 128, 65536) or DEFAULT_BLOCK_CAP


def choose_mode(total_rows: int, s: int, num_sms: int, block_cap: int | None = None) -> str:
    """"row" (a program per row) for rows that fit the register tile; longer rows over many programs:
    "pivot" (select_pivot.py) where rows x tokens reach PIVOT_MIN_KEYS, "split" (radix passes) otherwise.
    On an H200 (benchmarks/select_modes.py and select_profile.py, llama2-13b / llama3-8b shapes, kf 0.25):
    the row kernel was faster wherever it can run, batch 1 included (40 rows on 132 multiprocessors):
    select 17 vs 25 us at 4k, 29 vs 36 us at 16k; at 16k batch 16, 33 vs 66 us (128 rows, group kv)
    and 98 vs 253 us (640 rows). Past the tile, pivot's row sample (a sort of 2048 keys, ~0.03 ms a wave of
    rows) pays off once there are PIVOT_MIN_KEYS keys to select from in all (benchmarks/select_profile.py):
    640 rows of 131072 tokens, 0.86 ms against 1.62 for the radix passes; 40 x 131072 (batch 1), 0.098
    against 0.119; 8 x 131072 (batch 1, group kv), 0.058 against 0.040. Its candidates fit up to
    select_pivot.MAX_TOKENS a row; longer rows go to split.
    Rows of 16384-32768 tokens (a 32768-key tile, 16-32 warps): whole loki_decode steps at 32k
    (LOKITOOL_ROW_CAP, benchmarks/select_modes.py) were faster in the row kernel than in pivot at 128 and
    640 rows (0.275 vs 0.299 ms, 1.179 vs 1.277) and than split at 40 (0.127 vs 0.133), slower than split
    at 8 (0.072 vs 0.061): such rows take the row kernel where they are at least a quarter as many as the
    multiprocessors. A 65536-key tile lost to split and pivot everywhere (0.148 vs 0.082 ms at 8 rows,
    0.278 vs 0.226 at 40).
    LOKITOOL_SELECT=row|split|pivot forces a mode (row only where it can run; benchmarks)."""
    forced = os.environ.get("LOKITOOL_SELECT", "auto")
    if forced not in MODES:
        raise ValueError(f"LOKITOOL_SELECT={forced!r} is not one of {', '.join(MODES)}")
    block_cap = block_cap or row_cap()
    fits = s <= pow2(block_cap, 128)  # the row kernel holds whole rows only
    if forced == "auto" or (forced == "row" and not fits):
        if fits and (s <= SHORT_ROW or 4 * total_rows >= num_sms):
            return "row"
        return "pivot" if s <= select_pivot.MAX_TOKENS and total_rows * s >= PIVOT_MIN_KEYS else "split"
    return forced


def selection_mode(total_rows: int, s: int, device: torch.device) -> str:
    """The mode loki_decode's selection runs in for total_rows rows of s tokens on this device."""
    return choose_mode(total_rows, s, multiprocessors(device))


class SelectPlan:
    """How one selection of scores [B, R, S] runs, and its scratch. mode "row": a program per row
    holding BLOCK keys (thresholds and kept counts per write chunk). mode "split": chunks of CHUNK
    tokens, a program each, radix passes of `digits` bits (histograms [B x R, sum of 2^digit bins],
    kept zero between calls; per-row state; per-chunk counts and suffix sums of the last digit). mode
    "pivot": chunks as split, a `sample`-key row sample, `cap` candidate slots per row (select_pivot.py)."""

    def __init__(
        self, b: int, rows: int, s: int, device: torch.device, *, mode: str, block_cap: int | None = None,
        chunk: int | None = None, digits: tuple[int, ...] = DIGITS, cap: int | None = None, sample: int = select_pivot.SAMPLE,
    ):
        assert mode in ("row", "split", "pivot"), mode
        self.mode = mode
        i32 = dict(dtype=torch.int32, device=device)
        if mode == "row":
            self.block = tile(s, block_cap or row_cap())
            assert s <= self.block, (s, self.block)
            nch = max(1, self.block // WRITE_CHUNK)
            self.ws = {"thr": torch.empty(b * rows, **i32), "counts": torch.empty(b * rows * nch, **i32)}
            return
        self.chunk = chunk or split_chunk(s)  # split and pivot: a program per chunk of a row
        assert self.chunk == triton.next_power_of_2(self.chunk) and self.chunk >= GROUP, self.chunk
        self.nch = triton.cdiv(s, self.chunk)
        if mode == "pivot":
            self.cap = cap or select_pivot.candidate_cap(s, sample)
            self.sample = sample
            self.ws = {
                "state": torch.empty(b * rows * select_pivot.STATE.value, **i32),
                "gt": torch.empty(b * rows * self.nch, **i32),
                "above": torch.empty(b * rows * self.nch, **i32),
                "ties": torch.empty(b * rows * self.nch, **i32),
                "cand_key": torch.empty(b * rows * self.cap, **i32),
                "cand_tok": torch.empty(b * rows * self.cap, **i32),
            }
        else:
            self.passes = radix_passes(digits)
            last = self.passes[-1]
            self.ws = {
                "hist": torch.zeros(b * rows * last["HIST_ROW"], **i32),  # zero on entry: each call leaves it so
                "state": torch.empty(b * rows * 2 * len(digits), **i32),
                "gt": torch.empty(b * rows * self.nch, **i32),
                "suffix": torch.empty(b * rows * self.nch * last["NB"], **i32),
            }


def _launch(*, scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, idx: torch.Tensor, plan: SelectPlan) -> None:
    for step in _steps(scores=scores, lengths=lengths, budgets=budgets, idx=idx, plan=plan):
        step()


def _steps(*, scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, idx: torch.Tensor, plan: SelectPlan) -> list:
    """The selection's launches in order, each a callable (benchmarks/select_profile.py times them one by one)."""
    b, rows, s = scores.shape
    assert scores.dtype == torch.float32 and scores.stride(-1) == 1
    assert lengths.shape == (b,) and budgets.shape == (b,) and lengths.dtype == budgets.dtype == torch.int32
    assert idx.shape[:2] == (b, rows) and idx.dtype == torch.int32 and idx.stride(-1) == 1
    strides = dict(stride_sb=scores.stride(0), stride_sr=scores.stride(1))
    out = dict(idx_ptr=idx, stride_ib=idx.stride(0), stride_ir=idx.stride(1))
    ws = plan.ws
    if plan.mode == "pivot":
        per_row, per_chunk = (b * rows,), (plan.nch, b * rows)
        common = dict(scores_ptr=scores, lengths_ptr=lengths, state_ptr=ws["state"], **strides, num_rows=rows)
        sized = dict(nch=plan.nch, CH=plan.chunk)
        cands = dict(cand_key_ptr=ws["cand_key"], cand_tok_ptr=ws["cand_tok"], CAP=plan.cap)
        counts = dict(above_ptr=ws["above"], ties_ptr=ws["ties"], NCH_PAD=pow2(plan.nch))
        warps = split_warps(plan.chunk)
        return [
            partial(launch, select_pivot._sample_kernel, per_row, **common, budgets_ptr=budgets, M=plan.sample,
                    MARGIN_SD=select_pivot.MARGIN, num_warps=8),
            partial(launch, select_pivot._compact_kernel, per_chunk, **common, **sized, **cands, gt_ptr=ws["gt"], GROUP=GROUP,
                    num_warps=warps),
            partial(launch, select_pivot._resolve_kernel, per_row, **common, **sized, **cands, **counts, budgets_ptr=budgets,
                    gt_ptr=ws["gt"], num_warps=min(16, max(4, plan.cap // 1024))),
            partial(launch, select_pivot._pivot_write_kernel, per_chunk, **common, **sized, **counts, **out, GROUP=GROUP,
                    num_warps=warps),
        ]
    if plan.mode == "split":
        last = plan.passes[-1]
        assert ws["hist"].numel() == b * rows * last["HIST_ROW"] and ws["suffix"].numel() == b * rows * plan.nch * last["NB"]
        common = dict(
            scores_ptr=scores, lengths_ptr=lengths, budgets_ptr=budgets, hist_ptr=ws["hist"], state_ptr=ws["state"],
            gt_ptr=ws["gt"], suffix_ptr=ws["suffix"], **strides, num_rows=rows, nch=plan.nch, CH=plan.chunk,
        )
        warps = split_warps(plan.chunk)
        grid = (plan.nch, b * rows)
        return [partial(launch, _radix_kernel, grid, **common, **p, num_warps=warps) for p in plan.passes] + [
            partial(launch, _radix_write_kernel, grid, **common, **out, NPASS=last["NPASS"], NB=last["NB"], OFF=last["OFF"],
                    HIST_ROW=last["HIST_ROW"], NCH_PAD=pow2(plan.nch), GROUP=GROUP, num_warps=warps),
        ]
    block = plan.block
    nch = max(1, block // WRITE_CHUNK)
    assert block == triton.next_power_of_2(block) and block >= 128 and s <= block, (block, s)
    assert ws["thr"].numel() == b * rows and ws["counts"].numel() == b * rows * nch
    common = dict(
        scores_ptr=scores, lengths_ptr=lengths, thr_ptr=ws["thr"], counts_ptr=ws["counts"], **strides, **out,
        num_rows=rows, BLOCK=block, GROUP=GROUP, NCH=nch,
    )
    return [
        partial(_SELECT.launch, (b * rows,), (), budgets_ptr=budgets, **common),
        partial(launch, _write_kernel, (nch, b * rows), **common, num_warps=4),
    ]


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


def tile(s: int, block_cap: int) -> int:
    """Tokens a row program holds in registers: the row length, as a power of two in [128, block_cap]."""
    return min(pow2(s, 128), pow2(block_cap, 128))


def select_topk(
    scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor, *, kmax: int, block_cap: int | None = None,
    mode: str = "auto", chunk: int | None = None, cap: int | None = None,
) -> torch.Tensor:
    """Kept token indices [B, R, kmax] int32 of scores [B, R, S]: row (b, r) lists its budgets[b]
    largest-scoring tokens among the first lengths[b], ascending; entries past budgets[b] are undefined.
    mode "row" (a program per row, rows up to block_cap), "split" (radix passes over chunks of `chunk`
    tokens, many programs a row), "pivot" (select_pivot.py: a sampled bracket, candidates compacted into
    `cap` slots a row) or "auto" (choose_mode)."""
    b, rows, s = scores.shape
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    idx = torch.empty(b, rows, kmax, dtype=torch.int32, device=scores.device)
    if mode == "auto":
        mode = choose_mode(b * rows, s, multiprocessors(scores.device), block_cap)
    elif mode == "row" and s > pow2(block_cap or row_cap(), 128):
        mode = "split"
    if lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)
    if budgets.dtype != torch.int32:
        budgets = budgets.to(torch.int32)
    plan = SelectPlan(b, rows, s, scores.device, mode=mode, block_cap=block_cap, chunk=chunk, cap=cap)
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
