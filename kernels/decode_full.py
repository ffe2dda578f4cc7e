"""Full-attention decode over a preallocated cache: split-K flash-decoding, lengths read on the GPU.

The baseline Loki is measured against in the static decode loop (sparse/static.py):

    q [B, H, D], k, v [B, Hkv, S, D] (S = the cache's capacity; float16/bfloat16, head dim contiguous)
    lengths [B] int32 on the GPU: sequence b attends to its first lengths[b] keys, 1 <= lengths[b] <= S
    -> [B, H, D] in q's dtype

No dense mask and no host synchronisation: the valid length is read by the kernel, so one launch
serves every step of a decode loop and can be captured in a CUDA graph. The capacity is cut into
`nsplit` chunks; one program per (chunk, b, KV head) streams that chunk's keys and values once for
all G = H / Hkv query heads of the group (GQA: each KV row is read once, not G times), runs an
online softmax in float32 and writes a partial output and its log-sum-exp (base 2). Chunks past a
sequence's length exit at once (lse = -inf). The merge kernel of attention.py combines the chunks.
The oracle is `lokitool.sparse.reference.dense_decode_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Pinned, dot_f32, keep_configs, launch_args, pow2, upcast_dot
from .attention import launch_merge, multiprocessors

LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------
# Autotune configs: keys per step, warps, pipeline depth; pruned by the tile size.


def _configs() -> list:
    shapes = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 3)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in shapes]


def _prune(configs, named_args, **kwargs):
    dpad = launch_args(named_args, kwargs)["DPAD"]
    return keep_configs(configs, lambda c: c.kwargs["BLOCK_N"] * dpad <= 128 * 128)


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.autotune(configs=_configs(), key=["G_PAD", "DPAD", "CHUNK_HINT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _full_decode_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, o_part_ptr, lse_part_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    num_kv_heads, group_size, head_dim, chunk, scale_log2, CHUNK_HINT,
    G_PAD: tl.constexpr, DPAD: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    row = tl.program_id(1)  # b * Hkv + KV head
    b = row // num_kv_heads
    kvh = row % num_kv_heads
    length = tl.load(lengths_ptr + b)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, DPAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < group_size
    d_ok = offs_d < head_dim
    heads = kvh * group_size + offs_g  # the query heads of this KV head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)

    m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, DPAD], dtype=tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, DPAD]
        s = dot_f32(q, tl.trans(k), UPCAST_DOT) * scale_log2  # [G_PAD, BLOCK_N], log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every block holds at least one valid key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, UPCAST_DOT)
        m = m_new

    empty = l_sum == 0.0  # a chunk past the sequence's length
    o = acc / tl.where(empty, 1.0, l_sum)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l_sum)))
    o_ptrs = o_part_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptrs, o, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_part_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


# ----------------------------------------------------------------------------------------------
# Launchers

_FULL = Pinned(_full_decode_kernel)


def num_splits(rows: int, capacity: int, num_sms: int) -> int:
    """Chunks of the capacity: about 4 programs per multiprocessor, chunks of >= 256 keys."""
    return max(1, min(triton.cdiv(4 * num_sms, rows), triton.cdiv(capacity, 256), 128))


def _launch(*, q, k, v, lengths, o_part, lse_part, scaling: float, nsplit: int) -> None:
    b, h, dim = q.shape
    _, hkv, s, _ = k.shape
    assert k.shape == v.shape and k.shape[0] == b and k.shape[3] == dim and h % hkv == 0, (q.shape, k.shape, v.shape)
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16), (q.dtype, k.dtype, v.dtype)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert lengths.shape == (b,) and lengths.dtype == torch.int32 and lengths.device == q.device
    assert o_part.shape == (b, h, nsplit, dim) and lse_part.shape == (b, h, nsplit)
    chunk = triton.cdiv(s, nsplit)
    _FULL.launch(
        (nsplit, b * hkv), (q.dtype,), q_ptr=q, k_ptr=k, v_ptr=v, lengths_ptr=lengths, o_part_ptr=o_part, lse_part_ptr=lse_part,
        stride_qb=q.stride(0), stride_qh=q.stride(1),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ks=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vs=v.stride(2),
        stride_ob=o_part.stride(0), stride_oh=o_part.stride(1), stride_os=o_part.stride(2),
        stride_lb=lse_part.stride(0), stride_lh=lse_part.stride(1),
        num_kv_heads=hkv, group_size=h // hkv, head_dim=dim, chunk=chunk, scale_log2=scaling * LOG2E,
        CHUNK_HINT=pow2(chunk), G_PAD=pow2(h // hkv, 16), DPAD=pow2(dim, 16), UPCAST_DOT=upcast_dot(q.dtype),
    )


# ----------------------------------------------------------------------------------------------
# Public wrapper


def full_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, scaling: float, nsplit: int | None = None
) -> torch.Tensor:
    """Attention [B, H, D] (q's dtype) of q [B, H, D] over the first lengths[b] rows of k, v
    [B, Hkv, S, D]; lengths int32 on q's device (see the module docstring)."""
    if lengths.dtype != torch.int32 or lengths.device != q.device:
        if lengths.device.type == "cpu" and lengths.numel() and not (1 <= int(lengths.min()) and int(lengths.max()) <= k.shape[2]):
            raise ValueError(f"lengths must lie in [1, {k.shape[2]}], got {lengths.tolist()}")
        lengths = lengths.to(device=q.device, dtype=torch.int32)
    b, h, dim = q.shape
    if nsplit is None:
        nsplit = num_splits(b * k.shape[1], k.shape[2], multiprocessors(q.device))
    o_part = torch.empty(b, h, nsplit, dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, nsplit, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, dim, dtype=q.dtype, device=q.device)
    _launch(q=q, k=k, v=v, lengths=lengths, o_part=o_part, lse_part=lse_part, scaling=scaling, nsplit=nsplit)
    launch_merge(o_part=o_part, lse_part=lse_part, out=out)
    return out
