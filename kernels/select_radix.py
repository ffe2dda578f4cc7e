"""Split selection (select.py's "split" mode): the exact k-th largest key of a row spread over many
programs, a grid of chunks x rows, for rows too few to fill the card (batch 1) and rows longer than
the register tile.

Four radix passes of 8 bits over the row's int32 keys, most significant digit first: each pass
histograms the chunk's keys whose higher digits match the prefix fixed so far and adds the nonzero
bins into the row's histogram; the next pass picks the bin holding the k-th key from it. The last pass
also stores, per chunk, its keys above the 24-bit bucket and the suffix sums of its histogram, so the
write phase (a fifth) knows from the threshold alone how many tokens earlier chunks keep, ties
included, and writes the chunk's kept tokens at that offset.

The five phases run in one launch on the GPU, or one launch each. In one launch a row's programs meet
at a barrier of their own between phases: each adds 1 to the row's arrival counter after its
histogram (a block barrier, then a release add), and the next phase starts once the counter reaches
phase x active chunks (acquire reads). Such a wait is only safe where every program of the grid is
resident at once: `one_launch_chunk` sizes chunks so that a grid has at most PER_SM programs a
multiprocessor, launched with registers capped to fit (`one_launch_registers`). The CPU interpreter
(which runs programs one after another) and larger grids launch phase by phase, where the counters
are already complete when a phase starts and no program waits. Either way each program counts its
departure at the end, and the row's last one zeroes the histograms and counters for the next call.
On an H200 (benchmarks/select_modes.py, llama3-8b kv, batch 1, 8 rows of 32768) the selection took
0.0313 ms in five launches and 0.0233 in one; whole steps 0.0572 and 0.0506 ms.

A float's top 8 bits leave ~28% of a row's scores in the k-th key's bucket (sign and 7 of 8 exponent
bits), so two passes histogram large buckets; wider digits would save a pass, but tl.histogram's cost
grows with its bins: on an H200 (benchmarks/select_profile.py, B=16 x 40 rows of 131072) a 12-bit first
pass took 6.2 ms against 0.35 ms for 8 bits. Past the second pass few keys match the prefix, and a chunk
with few adds them by an atomic each instead of a block histogram.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import env_pow2, pow2
from .select_keys import _chunk_program, _load_keys, _write_chunk

NPASS = 4  # radix passes of DIGIT bits
DIGIT = 8
NB = 1 << DIGIT  # bins per pass
HIST_ROW = NPASS * NB  # ints of histogram per row
SYNC = 2  # ints of counters per row: arrivals (phases x chunks), departures
SPARSE = tl.constexpr(16)  # a chunk with fewer than CH / SPARSE keys in the bucket adds them one atomic each
MIN_CHUNK = 1024  # keys a program holds for one launch, at least (one_launch_chunk)
MAX_CHUNK = 8192  # and at most (one_launch_chunk)
PER_SM = 2  # programs a multiprocessor holds at once in one launch (programs_per_sm)
SPIN_LIMIT = tl.constexpr(1 << 22)  # reads of a row's counter before a barrier gives up (_row_wait)


@triton.jit
def _pick_bin(hist, kk, NB: tl.constexpr):
    """Bin of `hist` (counts per ascending digit) holding the kk-th largest, and the count above it."""
    bins = tl.arange(0, NB)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    b = tl.max(tl.where(at_or_above >= kk, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > b, hist, 0), axis=0)
    return b, above


@triton.jit
def _descend(row_hist, prefix, remaining, Q: tl.constexpr, NB: tl.constexpr):
    """(prefix, remaining) after the digit of pass Q: the key's digits up to and including Q (signed, as
    `keys >> shift` gives them) and how many of the kk largest keys lie in that bucket. The histogram
    is read past L1 (another program wrote it)."""
    hist = tl.load(row_hist + Q * NB + tl.arange(0, NB), cache_modifier=".cg")
    digit, above = _pick_bin(hist, remaining, NB)
    if Q == 0:
        prefix = digit - NB // 2
    else:
        prefix = prefix * NB + digit  # (prefix << width) | digit
    return prefix, remaining - above


@triton.jit
def _row_arrive(counter_ptr):
    """Count this program in at the row's counter once all its threads' writes are issued (a barrier
    of the block, then a release add by one thread: what a cooperative grid sync does)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release")


@triton.jit
def _row_wait(counter_ptr, target):
    """Spin until the row's counter reaches target (acquire: what the counted programs wrote is seen).
    Gives up after SPIN_LIMIT reads (seconds): a grid that was not resident after all then returns wrong
    results, which the tests catch, instead of hanging the device."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        spins += 1


@triton.jit
def _radix_kernel(
    scores_ptr, lengths_ptr, budgets_ptr, hist_ptr, sync_ptr, gt_ptr, suffix_ptr, idx_ptr,
    stride_sb, stride_sr, stride_ib, stride_ir,
    num_rows, nch,
    FIRST: tl.constexpr, LAST: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr, NCH_PAD: tl.constexpr, GROUP: tl.constexpr,
):
    """Phases FIRST..LAST (0-3: radix passes, 4: the write) of the selection of one chunk of one row."""
    c, pid, b, r, n, start = _chunk_program(lengths_ptr, num_rows, CH)
    if start < n:
        nact = tl.cdiv(n, CH)  # chunks of the row with keys: the programs that meet at its barriers
        row_hist = hist_ptr + pid.to(tl.int64) * (4 * NB)
        arrivals = sync_ptr + pid.to(tl.int64) * 2
        _radix_phases(scores_ptr + b * stride_sb + r * stride_sr, n, start, tl.load(budgets_ptr + b), c, pid, nch, nact,
                      row_hist, arrivals, gt_ptr, suffix_ptr, idx_ptr + b * stride_ib + r * stride_ir,
                      FIRST, LAST, NB, CH, NCH_PAD, GROUP)
        if LAST == 4:
            _row_depart(row_hist, arrivals, nact, NB)


@triton.jit
def _radix_phases(
    row_ptr, n, start, kk, c, pid, nch, nact, row_hist, arrivals, gt_ptr, suffix_ptr, out_row,
    FIRST: tl.constexpr, LAST: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr, NCH_PAD: tl.constexpr, GROUP: tl.constexpr,
):
    """Phases FIRST..LAST (LAST <= 4) of chunk c of a row of n keys at row_ptr, budget kk, kept tokens
    listed from out_row. Phases before FIRST ran in earlier launches: their histograms are complete, so
    the prefix is rebuilt from them without waiting. Inside one launch a phase waits for the row's other
    nact chunks. Each pass counts this program in at the row's barrier; the write does not (callers
    that go on after it arrive themselves)."""
    offs = start + tl.arange(0, CH)
    valid = offs < n
    keys = _load_keys(row_ptr, offs, n)
    bins = tl.arange(0, NB)
    chunk = pid.to(tl.int64) * nch + c
    prefix = kk * 0
    remaining = kk
    if FIRST > 1:
        for q in tl.static_range(FIRST - 1):  # passes finished by earlier launches
            prefix, remaining = _descend(row_hist, prefix, remaining, q, NB)
    for p in tl.static_range(FIRST, LAST + 1):
        if p > 0:
            if p > FIRST:
                _row_wait(arrivals, p * nact)
            prefix, remaining = _descend(row_hist, prefix, remaining, p - 1, NB)
        if p < 4:
            if p == 0:
                match = valid
                digit = (keys >> 24) + NB // 2  # signed top digit, shifted to 0..NB-1
            else:  # keys whose digits above this pass equal the prefix
                match = valid & ((keys >> (32 - 8 * p)) == prefix)
                digit = (keys >> (24 - 8 * p)) & (NB - 1)
            n_match = tl.sum(tl.where(match, 1, 0), axis=0)
            hist = tl.zeros([NB], tl.int32)
            if n_match * SPARSE > CH:  # many keys in the bucket: a block histogram, one atomic per bin
                hist = tl.histogram(digit, NB, mask=match)
                tl.atomic_add(row_hist + p * NB + bins, hist, mask=hist > 0, sem="relaxed")
            elif p < 3:  # few (the usual case past pass 0): an atomic per key, no histogram
                tl.atomic_add(row_hist + p * NB + digit, tl.full([CH], 1, tl.int32), mask=match, sem="relaxed")
            else:  # the last pass needs this chunk's histogram too (its suffix sums)
                if n_match > 0:
                    hist = tl.histogram(digit, NB, mask=match)
                    tl.atomic_add(row_hist + p * NB + bins, hist, mask=hist > 0, sem="relaxed")
            if p == 3:
                above_bucket = tl.sum(tl.where(valid & ((keys >> 8) > prefix), 1, 0), axis=0)
                tl.store(gt_ptr + chunk, above_bucket)
                at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys of the bucket with digit >= bin
                tl.store(suffix_ptr + chunk * NB + bins, at_or_above)
            _row_arrive(arrivals)
        else:  # the keys again as [CH / GROUP, GROUP] (from L2 or L1: read a moment ago)
            tokens = start + tl.arange(0, CH // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            _write_phase(_load_keys(row_ptr, tokens, n), tokens, prefix, remaining, c, pid, nch, gt_ptr, suffix_ptr,
                         out_row, NB, NCH_PAD, GROUP)


@triton.jit
def _write_phase(keys, tokens, thr, need, c, pid, nch, gt_ptr, suffix_ptr, out_ptr,
                 NB: tl.constexpr, NCH_PAD: tl.constexpr, GROUP: tl.constexpr):
    """The chunk's kept tokens, in token order, at its offset in the row's list: keys above the
    threshold thr, then keys equal to it while the row's ties taken so far (earlier chunks first) stay
    below `need`. The earlier chunks' counts come from their last pass (gt, suffix sums)."""
    low = thr & (NB - 1)  # the last digit of the threshold
    chunks = tl.arange(0, NCH_PAD)
    earlier = chunks < c
    base = pid.to(tl.int64) * nch + chunks
    ge = tl.load(suffix_ptr + base * NB + low, mask=earlier, other=0, cache_modifier=".cg")  # keys of the last bucket >= thr
    gt_low = tl.load(suffix_ptr + base * NB + low + 1, mask=earlier & (chunks * 0 + low < NB - 1), other=0, cache_modifier=".cg")
    above = tl.load(gt_ptr + base, mask=earlier, other=0, cache_modifier=".cg") + gt_low
    ties_before = tl.sum(ge - gt_low, axis=0)
    offset = tl.sum(above, axis=0) + tl.minimum(ties_before, need)

    mine = pid.to(tl.int64) * nch + c
    ties_here = tl.load(suffix_ptr + mine * NB + low)
    if low < NB - 1:
        ties_here -= tl.load(suffix_ptr + mine * NB + low + 1)
    _write_chunk(keys, tokens, thr, need, ties_before, ties_here, out_ptr + offset, GROUP)


@triton.jit
def _row_depart(row_hist, sync, nact, NB: tl.constexpr):
    """Count this program out; the row's last one (every other has read what it needed) zeroes the
    row's histograms and counters for the next call. Returns whether this program was the last: what
    the others stored before departing is then visible to it (loki_step.py merges the row's pieces)."""
    tl.debug_barrier()
    left = tl.atomic_add(sync + 1, 1, sem="acq_rel")
    last = left == nact - 1
    if last:
        tl.store(row_hist + tl.arange(0, 4 * NB), tl.zeros([4 * NB], tl.int32))
        two = tl.arange(0, 2)
        tl.store(sync + two, tl.zeros([2], tl.int32))
    return last


# ----------------------------------------------------------------------------------------------
# Launch shapes


def split_chunk(s: int) -> int:
    """Tokens per program, phase by phase: programs enough to fill the card at batch 1 (at least 4 per
    row), each histogram pass a few thousand keys per program."""
    if s <= 8192:
        return max(32, min(1024, pow2(triton.cdiv(s, 4))))
    return 2048 if s <= 32768 else 4096


def programs_per_sm() -> int:
    """Programs of one launch a multiprocessor must hold at once: PER_SM, or LOKITOOL_SPLIT_PER_SM (1, 2
    or 4; benchmarks)."""
    return env_pow2("LOKITOOL_SPLIT_PER_SM", 1, 4) or PER_SM


def one_launch_chunk(rows: int, s: int, num_sms: int, per_sm: int | None = None) -> int | None:
    """Tokens per program for one launch: the smallest power of two from MIN_CHUNK up that leaves at most
    per_sm programs per multiprocessor (all resident, so the barriers cannot wait on a program that never
    starts: `one_launch_registers` caps registers so that they fit), or None past MAX_CHUNK keys a
    program. On an H200 (benchmarks/select_modes.py --split-chunks, llama3-8b kv, batch 1, two programs a
    multiprocessor), the selection alone: 8 x 32768 keys 0.0233 ms in chunks of 1024, 0.0236 of 2048,
    0.0291 of 4096; 8 x 65536, 0.0278 of 2048, 0.0296 of 4096; 8 x 131072, 0.0374 of 4096, 0.0441 of 8192.
    Programs of 16384 keys lost to the five launches and to pivot (whole steps, select_modes.py,
    reports/bench/select-profile/one-launch-cap): llama2-13b batch 1, 64k (40 rows) 0.281 ms against 0.241
    and 0.228; llama3-8b per query head, batch 1, 128k (32 rows) 0.311 against 0.293 and 0.265; at 8192
    keys (32 x 65536) one launch was level with pivot (0.148 against 0.149): MAX_CHUNK is 8192."""
    chunk = min(MIN_CHUNK, pow2(s))
    while chunk <= MAX_CHUNK and not resident(rows, s, chunk, num_sms, per_sm):
        chunk *= 2  # rows beyond per_sm x num_sms never fit: the bound ends the search
    return chunk if chunk <= MAX_CHUNK else None


def resident(rows: int, s: int, chunk: int, num_sms: int, per_sm: int | None = None) -> bool:
    """Whether a grid of rows x chunks of `chunk` tokens fits per_sm programs a multiprocessor."""
    return rows * triton.cdiv(s, chunk) <= num_sms * (per_sm or programs_per_sm())


def one_launch_registers(warps: int, per_sm: int | None = None) -> int:
    """Registers per thread (Triton's maxnreg) that let per_sm programs of `warps` warps share a
    multiprocessor's 65536 (Hopper, Ampere); shared memory (a few KB a program) is far from its limit."""
    threads = 32 * warps * (per_sm or programs_per_sm())
    return min(255, 65536 // threads // 8 * 8)


def split_warps(chunk: int) -> int:
    return 16 if chunk >= 8192 else 8 if chunk >= 2048 else 4


def phases(one_launch: bool, last: int = NPASS) -> list[tuple[int, int]]:
    """(FIRST, LAST) of each launch of phases 0..last (the radix passes and the write: NPASS; loki_step.py
    goes on to its attention phase)."""
    return [(0, last)] if one_launch else [(p, p) for p in range(last + 1)]
