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

Split mode (`choose_mode`, select_radix.py): rows longer than the register tile (32768 keys; rows past
16384 only where they are at least a quarter as many as the multiprocessors), and rows past 8192 where
they are fewer than that (batch 1) and fit one launch, run over a grid of chunks x rows instead: four radix passes of 8 bits find the k-th largest key exactly, then each chunk writes its
kept tokens. One launch where every program of the grid can be resident at once (the row's programs meet
at barriers of their own), five elsewhere. Pivot mode (select_pivot.py) brackets the k-th key from a
sorted sample of the row and reads the row twice instead; choose_mode picks it where there are many keys.

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

from . import select_pivot, select_radix
from ._common import (
    Pinned,
    env_pow2,
    env_switch,
    float_bits,
    interpreting,
    keep_configs,
    launch,
    launch_args,
    multiprocessors,
    pow2,
    write_budgets,
)
from .select_keys import _chunk_program, _kth_key, _load_keys, _prefix_rank

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


_SELECT = Pinned(_select_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers

MODES = ("auto", "row", "split", "pivot")
PIVOT_MIN_KEYS = 1 << 21  # choose_mode: pivot past the register tile once rows x tokens reach this
SPLIT_MIN = 8192  # choose_mode: rows too few to fill the card go to split in one launch past this many tokens


def row_cap() -> int:
    """Longest row the row kernel holds in registers: DEFAULT_BLOCK_CAP, or LOKITOOL_ROW_CAP (a power of
    two from 128 to 65536; benchmarks compare longer register tiles with the split and pivot modes)."""
    return env_pow2("LOKITOOL_ROW_CAP", 128, 65536) or DEFAULT_BLOCK_CAP


def choose_mode(total_rows: int, s: int, num_sms: int, block_cap: int | None = None, one_launch: bool | None = None) -> str:
    """"row" (a program per row) for rows that fit the register tile; longer rows over many programs:
    "pivot" (select_pivot.py) where rows x tokens reach PIVOT_MIN_KEYS, "split" (radix passes) otherwise.
    On an H200 (benchmarks/select_modes.py and select_profile.py, llama2-13b / llama3-8b shapes, kf 0.25):
    the row kernel was faster wherever it can run, batch 1 included (40 rows on 132 multiprocessors):
    select 17 vs 25 us at 4k, 29 vs 36 us at 16k; at 16k batch 16, 33 vs 66 us (128 rows, group kv)
    and 98 vs 253 us (640 rows). Past the tile, pivot's row sample (a sort of 2048 keys then, ~0.03 ms a wave of
    rows) pays off once there are PIVOT_MIN_KEYS keys to select from in all (benchmarks/select_profile.py):
    640 rows of 131072 tokens, 0.86 ms against 1.62 for the radix passes; 40 x 131072 (batch 1), 0.098
    against 0.119; 8 x 131072 (batch 1, group kv), 0.058 against 0.040; whole steps at 40 x 65536
    (llama2-13b, batch 1), 0.228 ms against 0.241 (reports/bench/select-profile/one-launch-cap), so
    PIVOT_MIN_KEYS sits between 2^20 keys (lost) and 2^21.3 (won). Its candidates fit up to
    select_pivot.MAX_TOKENS a row; longer rows go to split.
    Rows of 16384-32768 tokens (a 32768-key tile, 16-32 warps): whole loki_decode steps at 32k
    (LOKITOOL_ROW_CAP, benchmarks/select_modes.py) were faster in the row kernel than in pivot at 128 and
    640 rows (0.275 vs 0.299 ms, 1.179 vs 1.277) and than split at 40 (0.127 vs 0.133), slower than split
    at 8 (0.072 vs 0.061): such rows take the row kernel where they are at least a quarter as many as the
    multiprocessors. A 65536-key tile lost to split and pivot everywhere (0.148 vs 0.082 ms at 8 rows,
    0.278 vs 0.226 at 40).
    Split in one launch (select_radix.py, 2026-11-30, select_modes.py "split1"): where rows are that few and
    longer than SPLIT_MIN tokens, it beat the row kernel at 8 x 16384 (llama3-8b kv, batch 1: whole step
    0.0413 vs 0.0441 ms) and the five-launch split at 8 x 32768 (0.0506 vs 0.0572); not at 40 rows
    (llama2-13b, batch 1, 16384: 0.0944 vs 0.0843 in the row kernel), where a row's program holds 16384 keys.
    one_launch: whether split may run in one launch on the device (one_launch_default(device); None: ask
    the environment only). LOKITOOL_SELECT=row|split|pivot forces a mode (row only where it can run;
    benchmarks)."""
    forced = os.environ.get("LOKITOOL_SELECT", "auto")
    if forced not in MODES:
        raise ValueError(f"LOKITOOL_SELECT={forced!r} is not one of {', '.join(MODES)}")
    block_cap = block_cap or row_cap()
    fits = s <= pow2(block_cap, 128)  # the row kernel holds whole rows only
    if forced == "auto" or (forced == "row" and not fits):
        few = 4 * total_rows < num_sms
        if one_launch is None:
            one_launch = one_launch_default()
        if few and s > SPLIT_MIN and one_launch and select_radix.one_launch_chunk(total_rows, s, num_sms):
            return "split"
        if fits and (s <= SHORT_ROW or not few):
            return "row"
        return "pivot" if s <= select_pivot.MAX_TOKENS and total_rows * s >= PIVOT_MIN_KEYS else "split"
    return forced


def selection_mode(total_rows: int, s: int, device: torch.device) -> str:
    """The mode loki_decode's selection runs in for total_rows rows of s tokens on this device."""
    return choose_mode(total_rows, s, multiprocessors(device), one_launch=one_launch_default(device))


class SelectPlan:
    """How one selection of scores [B, R, S] runs, and its scratch. mode "row": a program per row
    holding BLOCK keys (thresholds and kept counts per write chunk). mode "split": chunks of CHUNK
    tokens, a program each, select_radix.py's radix passes (histograms [B x R, 4 x 256] and per-row
    counters, kept zero between calls; per-chunk counts and suffix sums of the last digit), in one launch
    or five (`one_launch`: None for `split_one_launch`'s choice). mode "pivot": chunks as split, a
    `sample`-key row sample (select_pivot.sample_size for budget share kf where None), `cap` candidate slots
    per row (select_pivot.py)."""

    def __init__(
        self, b: int, rows: int, s: int, device: torch.device, *, mode: str, block_cap: int | None = None,
        chunk: int | None = None, cap: int | None = None, sample: int | None = None, one_launch: bool | None = None,
        kf: float | None = None,
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
        if mode == "split":
            self.one_launch, chunk = split_one_launch(b * rows, s, device, chunk, one_launch)
        self.chunk = chunk or (pivot_chunk(s) if mode == "pivot" else select_radix.split_chunk(s))  # a program per chunk of a row
        assert self.chunk == triton.next_power_of_2(self.chunk) and self.chunk >= GROUP, self.chunk
        self.nch = triton.cdiv(s, self.chunk)
        if mode == "pivot":
            self.sample = sample or select_pivot.sample_size(s, kf)
            self.cap = cap or select_pivot.candidate_cap(s, self.sample)
            self.ws = {
                "state": torch.empty(b * rows * select_pivot.STATE.value, **i32),
                "gt": torch.empty(b * rows * self.nch, **i32),
                "above": torch.empty(b * rows * self.nch, **i32),
                "ties": torch.empty(b * rows * self.nch, **i32),
                "cand_key": torch.empty(b * rows * self.cap, **i32),
                "cand_tok": torch.empty(b * rows * self.cap, **i32),
            }
        else:
            self.ws = {  # histograms and counters zero on entry: each call leaves them so
                "hist": torch.zeros(b * rows * select_radix.HIST_ROW, **i32),
                "sync": torch.zeros(b * rows * select_radix.SYNC, **i32),
                "gt": torch.empty(b * rows * self.nch, **i32),
                "suffix": torch.empty(b * rows * self.nch * select_radix.NB, **i32),
            }


PIVOT_CHUNK = 1024  # tokens per program of the pivot mode's compact and write kernels (pivot_chunk)


def pivot_chunk(s: int) -> int:
    """Tokens per program of the pivot mode's compact and write kernels: PIVOT_CHUNK (at most the row), or
    LOKITOOL_PIVOT_CHUNK (a power of two from 256 to 16384; benchmarks/select_modes.py --pivot-chunks). On an
    H200 (kf 0.25, whole loki_decode steps, reports/bench/select-profile/pivot-chunks) 1024 beat the 4096 of
    before everywhere it runs, 2048 by a little: llama2-13b B=16 64k 2.347 / 2.352 / 2.423 ms at 1024 / 2048 /
    4096, 128k 4.482 / 4.515 / 4.613; llama3-8b kv B=16 64k 0.519 / 0.521 / 0.537, 128k 0.956 / 0.964 / 0.987."""
    return env_pow2("LOKITOOL_PIVOT_CHUNK", 256, 16384) or min(PIVOT_CHUNK, pow2(s, 32))


def pivot_warps(chunk: int) -> int:
    """Warps of the pivot mode's compact and write kernels: select_radix.split_warps(chunk), or
    LOKITOOL_PIVOT_WARPS (a power of two from 1 to 16; benchmarks/select_profile.py)."""
    return env_pow2("LOKITOOL_PIVOT_WARPS", 1, 16) or select_radix.split_warps(chunk)


ONE_LAUNCH_CAPABILITY = (9, 0)  # one_launch_default: Hopper and later, where the one launch was measured


def one_launch_default(device: torch.device | None = None) -> bool:
    """Whether the split mode runs in one launch where its grid fits: LOKITOOL_SPLIT_ONE_LAUNCH=1 insists
    on it (a plan where it cannot is refused), 0 launches phase by phase. Unset: yes on CUDA devices of
    compute capability 9.0 and up (measured on an H200, where two programs of every chunk size share a
    multiprocessor; other cards' shared memory and thread limits were not checked), and not where CUDA
    MPS limits this process to part of the multiprocessors (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE below 100):
    a grid sized from the device's count might not be resident at once there, and its barriers would
    wait forever. Without a device, only the environment is asked."""
    env = env_switch("LOKITOOL_SPLIT_ONE_LAUNCH")
    if env is not None:
        return env
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100").strip()
    if share.replace(".", "", 1).isdigit() and float(share) < 100:
        return False
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_capability(device) >= ONE_LAUNCH_CAPABILITY
    return True


def split_one_launch(total_rows: int, s: int, device: torch.device, chunk: int | None, one_launch: bool | None) -> tuple[bool, int | None]:
    """(one launch?, chunk) for the split mode. One launch needs every program resident at once: on a GPU,
    at most select_radix.programs_per_sm() per multiprocessor (one_launch_chunk picks the chunk); the
    interpreter runs programs one after another, so there it is refused. LOKITOOL_SPLIT_ONE_LAUNCH=0|1
    sets the default (benchmarks: 0 launches phase by phase)."""
    if one_launch is None:
        one_launch = one_launch_default(device)
        forced = env_switch("LOKITOOL_SPLIT_ONE_LAUNCH") is True
    else:
        forced = one_launch
    device = torch.device(device)
    num_sms = multiprocessors(device)
    resident = device.type == "cuda" and not interpreting()
    if one_launch and resident:
        fit = select_radix.one_launch_chunk(total_rows, s, num_sms) if chunk is None else chunk
        if fit is not None and select_radix.resident(total_rows, s, fit, num_sms):
            return True, fit
    if forced and one_launch:
        why = "the interpreter runs programs one at a time" if not resident else f"{total_rows} rows of {s} need more programs than {num_sms} multiprocessors hold"
        raise ValueError(f"the split selection cannot run in one launch here: {why}")
    return False, chunk


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
        warps = pivot_warps(plan.chunk)
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
        assert ws["hist"].numel() == b * rows * select_radix.HIST_ROW and ws["suffix"].numel() == b * rows * plan.nch * select_radix.NB
        common = dict(
            scores_ptr=scores, lengths_ptr=lengths, budgets_ptr=budgets, hist_ptr=ws["hist"], sync_ptr=ws["sync"],
            gt_ptr=ws["gt"], suffix_ptr=ws["suffix"], **strides, **out, num_rows=rows, nch=plan.nch,
            NB=select_radix.NB, CH=plan.chunk, NCH_PAD=pow2(plan.nch), GROUP=GROUP, num_warps=select_radix.split_warps(plan.chunk),
        )
        grid = (plan.nch, b * rows)
        if plan.one_launch:  # registers capped so that the grid is resident at once
            common["maxnreg"] = select_radix.one_launch_registers(select_radix.split_warps(plan.chunk))
        return [partial(launch, select_radix._radix_kernel, grid, **common, FIRST=first, LAST=last)
                for first, last in select_radix.phases(plan.one_launch)]
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
        mode = choose_mode(b * rows, s, multiprocessors(scores.device), block_cap, one_launch=one_launch_default(scores.device))
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
