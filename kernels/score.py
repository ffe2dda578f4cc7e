"""Stage 1 of Loki decode: approximate scores over the first d dims of keys stored in the PCA basis.

    scores[b, r, s] = q_rot[b, h, :d] . k_rot[b, kvh, s, :d]        (float32, s < lengths[b])

with one row r per query head (group="head", r = h) or per KV head (group="kv": the scores of the
G = H / Hkv query heads of a KV group summed in float32, as the oracle sums them). Keys stay in the cache's
own layout [B, Hkv, S, D]: the first d dims of a row are contiguous, so a tile reads d x 2 bytes
per token and no second copy of K exists. One program reads tiles of one KV head once, for all the
query heads it serves (one MMA: [G, d] x [d, tokens]). Positions s >= lengths[b] are left unwritten.
For loki_decode the kernel also writes the selection budgets (one launch fewer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Pinned, dot_f32, float_bits, keep_configs, launch_args, pow2, upcast_dot, write_budgets
from .layout import Keys, scored_plane

# ----------------------------------------------------------------------------------------------
# Autotune configs: tokens per step, steps per program (unrolled: their independent loads can all
# be in flight at once), warps, stages; pruned so the tile fits.


def _configs() -> list:
    shapes = [  # BLOCK_S, STEPS, warps, stages
        (128, 1, 4, 1), (256, 1, 4, 1), (512, 1, 8, 1), (128, 4, 4, 1),
        (256, 2, 4, 1), (256, 4, 8, 1), (128, 4, 4, 3), (256, 4, 8, 3),
    ]
    return [triton.Config({"BLOCK_S": bs, "STEPS": st}, num_warps=w, num_stages=ns) for bs, st, w, ns in shapes]


def _prune(configs, named_args, **kwargs):
    dp = launch_args(named_args, kwargs)["DP"]
    return keep_configs(configs, lambda c: c.kwargs["BLOCK_S"] * dp <= 16384)


# ----------------------------------------------------------------------------------------------
# Kernel


@triton.autotune(configs=_configs(), key=["G_PAD", "DP", "GROUP_KV", "S_HINT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _score_kernel(
    q_ptr, k_ptr, lengths_ptr, scores_ptr, budgets_ptr, kf_bits, num_seqs,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_sb, stride_sr,
    num_kv_heads, d, S_HINT,
    G: tl.constexpr, G_PAD: tl.constexpr, DP: tl.constexpr, GROUP_KV: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BUDGETS: tl.constexpr,
    BLOCK_S: tl.constexpr, STEPS: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if BUDGETS > 0:  # loki_decode: the selection's budgets, here instead of in a launch of their own
        if (pid_s == 0) & (pid_bh == 0):
            write_budgets(lengths_ptr, budgets_ptr, kf_bits, num_seqs, BUDGETS)
    b = (pid_bh // num_kv_heads).to(tl.int64)  # int64: B x Hkv x S x D can pass 2**31
    kvh = pid_bh % num_kv_heads
    length = tl.load(lengths_ptr + b)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, DP)
    g_ok = offs_g < G
    d_ok = offs_d < d
    # the G query heads of this KV head, zero-padded to an MMA tile: [G_PAD, DP]
    q_ptrs = q_ptr + b * stride_qb + (kvh * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    s_base = scores_ptr + b * stride_sb

    for step in tl.static_range(STEPS):
        offs_s = (pid_s * STEPS + step) * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        in_len = offs_s < length
        # rows past the sequence's length are masked: they cost no memory traffic
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=in_len[:, None] & d_ok[None, :], other=0.0)
        s = dot_f32(q, tl.trans(k), UPCAST_DOT)  # [G_PAD, BLOCK_S] float32, padded rows are 0
        if GROUP_KV:
            # the oracle sums the G per-head float32 scores; so do we
            tl.store(s_base + kvh * stride_sr + offs_s, tl.sum(s, axis=0), mask=in_len)
        else:
            s_ptrs = s_base + (kvh * G + offs_g)[:, None] * stride_sr + offs_s[None, :]
            tl.store(s_ptrs, s, mask=g_ok[:, None] & in_len[None, :])


_SCORE = Pinned(_score_kernel)


# ----------------------------------------------------------------------------------------------
# Launcher


def _launch(
    *, q_rot: torch.Tensor, k_rot: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor, d: int, group_kv: bool,
    budgets: torch.Tensor | None = None, kf: float = 1.0,
) -> None:
    """k_rot [B, Hkv, S, >= d]: a plain cache, or the low plane of LokiKeys. With `budgets` ([B] int32)
    the kernel also writes the selection budgets max(1, floor(kf x lengths[b])) (select.decode_budgets'
    values)."""
    b, h, dim = q_rot.shape
    _, hkv, s, dk = k_rot.shape
    assert k_rot.shape[0] == b and h % hkv == 0, (q_rot.shape, k_rot.shape)
    assert q_rot.stride(-1) == 1 and k_rot.stride(-1) == 1, "head dim must be contiguous"
    assert 1 <= d <= min(dim, dk), (d, dim, dk)
    assert scores.shape == (b, hkv if group_kv else h, s) and scores.dtype == torch.float32 and scores.stride(-1) == 1
    assert lengths.shape == (b,) and lengths.dtype == torch.int32
    assert budgets is None or (budgets.shape == (b,) and budgets.dtype == torch.int32 and 0 < kf <= 1)
    grid = lambda meta: (triton.cdiv(s, meta["BLOCK_S"] * meta["STEPS"]), b * hkv)
    _SCORE.launch(
        grid, (q_rot.dtype, k_rot.dtype), q_ptr=q_rot, k_ptr=k_rot, lengths_ptr=lengths, scores_ptr=scores,
        budgets_ptr=lengths if budgets is None else budgets, kf_bits=float_bits(kf), num_seqs=b, BUDGETS=0 if budgets is None else pow2(b, 16),
        stride_qb=q_rot.stride(0), stride_qh=q_rot.stride(1),
        stride_kb=k_rot.stride(0), stride_kh=k_rot.stride(1), stride_ks=k_rot.stride(2),
        stride_sb=scores.stride(0), stride_sr=scores.stride(1),
        num_kv_heads=hkv, d=d, S_HINT=pow2(s),
        G=h // hkv, G_PAD=pow2(h // hkv, 16), DP=pow2(d, 16), GROUP_KV=group_kv, UPCAST_DOT=upcast_dot(q_rot.dtype),
    )


# ----------------------------------------------------------------------------------------------
# Public wrapper


def loki_scores(q_rot: torch.Tensor, k_rot: Keys, lengths: torch.Tensor, *, d: int, group: str = "head") -> torch.Tensor:
    """Approximate scores [B, H or Hkv, S] float32 of q_rot [B, H, D] against k_rot ([B, Hkv, S, D],
    or LokiKeys whose low plane holds at least d dims) over the first d dims; entries at s >= lengths[b] are undefined. The products of the float16 or
    bfloat16 inputs are exact and summed in float32 (on tensor cores)."""
    if group not in ("head", "kv"):
        raise ValueError(f"group must be 'head' or 'kv', not {group!r}")
    rows = q_rot.shape[1] if group == "head" else k_rot.shape[1]
    scores = torch.empty(q_rot.shape[0], rows, k_rot.shape[2], dtype=torch.float32, device=q_rot.device)
    if lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)
    _launch(q_rot=q_rot, k_rot=scored_plane(k_rot), lengths=lengths, scores=scores, d=d, group_kv=group == "kv")
    return scores
