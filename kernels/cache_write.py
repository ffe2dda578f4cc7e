"""The static decode loop's per-layer glue in one kernel each: the cache write and the query rotation.

A decode step of the static loop (sparse/static.py) writes one key and value per sequence and KV
head at that sequence's position, and Loki first rotates the key into the PCA basis and splits it
into the two planes (layout.py); the query is rotated the same way. In PyTorch that is a float32
cast, a batched matmul, a cast back and one scatter per plane: about nine small kernels per layer,
each costing a few microseconds even inside a CUDA graph. Here:

    write_decode_kv(k_new, v_new, positions, k_dst=..., v_dst=..., basis=None)
        k_new, v_new [B, Hkv, D] (any strides, head dim contiguous); positions [B] int64 on the GPU
        k_dst: one [B, Hkv, C, D] tensor, or LokiKeys(low [B, Hkv, C, d], high [B, Hkv, C, D - d])
        basis [Hkv, D, D] float32 (directions as columns) or None: key row k @ basis[kv head]
    rotate_queries(q, basis) -> q @ basis[kv head of each query head], [B, H, D] in q's dtype

One program per (sequence, KV head, BLOCK_E output dims): each loads its columns of the basis in one
go, so a program waits on memory once. (A program per (sequence, KV head) walking the basis in four
row blocks took 7.8 us (write) and 5.3 us (rotation) per layer at batch 1 on an H200, llama3-8b, where
the kernels' bytes take well under a microsecond: benchmarks/e2e_profile.py.) Rotations are computed
in float32 (as `reference.rotate`) and rounded once to the cache dtype. The oracle is
`reference.rotate` plus indexing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch, pow2
from .layout import Keys, LokiKeys

BLOCK_E = 32  # output dims per program

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _write_kernel(
    k_ptr, v_ptr, pos_ptr, basis_ptr, klo_ptr, khi_ptr, vd_ptr,
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_lb, stride_lh, stride_ls,
    stride_hb, stride_hh, stride_hs,
    stride_db, stride_dh, stride_ds,
    num_kv_heads, head_dim, d_low,
    DPAD: tl.constexpr, ROTATE: tl.constexpr, HAS_HIGH: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)  # b * Hkv + KV head
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # the output dims of this program
    b = row // num_kv_heads
    h = row % num_kv_heads
    pos = tl.load(pos_ptr + b)
    ok = cols < head_dim
    k_src = k_ptr + b * stride_kb + h * stride_kh
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + cols, mask=ok, other=0.0)
    if ROTATE:  # k_rot[e] = sum_i k[i] * basis[h, i, e]: the basis columns in one load
        offs_i = tl.arange(0, DPAD)
        i_ok = offs_i < head_dim
        k_in = tl.load(k_src + offs_i, mask=i_ok, other=0.0).to(tl.float32)
        p = tl.load(basis_ptr + h * head_dim * head_dim + offs_i[:, None] * head_dim + cols[None, :],
                    mask=i_ok[:, None] & ok[None, :], other=0.0)
        k = tl.sum(k_in[:, None] * p, axis=0)
    else:
        k = tl.load(k_src + cols, mask=ok, other=0.0)
    dst = klo_ptr + b * stride_lb + h * stride_lh + pos * stride_ls
    tl.store(dst + cols, k.to(klo_ptr.dtype.element_ty), mask=cols < d_low)
    if HAS_HIGH:
        hi = khi_ptr + b * stride_hb + h * stride_hh + pos * stride_hs
        tl.store(hi + cols - d_low, k.to(khi_ptr.dtype.element_ty), mask=ok & (cols >= d_low))
    tl.store(vd_ptr + b * stride_db + h * stride_dh + pos * stride_ds + cols, v.to(vd_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rotate_kernel(
    q_ptr, basis_ptr, out_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh,
    num_kv_heads, group_size, head_dim,
    G_PAD: tl.constexpr, DPAD: tl.constexpr, BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)  # b * Hkv + KV head
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # the output dims of this program
    b = row // num_kv_heads
    h = row % num_kv_heads
    offs_g = tl.arange(0, G_PAD)
    offs_i = tl.arange(0, DPAD)
    g_ok = offs_g < group_size
    i_ok = offs_i < head_dim
    e_ok = cols < head_dim
    heads = h * group_size + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_i[None, :], mask=g_ok[:, None] & i_ok[None, :], other=0.0)
    p = tl.load(basis_ptr + h * head_dim * head_dim + offs_i[:, None] * head_dim + cols[None, :],
                mask=i_ok[:, None] & e_ok[None, :], other=0.0)
    out = tl.dot(q.to(tl.float32), p, input_precision="ieee")  # [G_PAD, BLOCK_E], float32 throughout
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & e_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers and public wrappers


def write_decode_kv(k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor, *, k_dst: Keys, v_dst: torch.Tensor,
                    basis: torch.Tensor | None = None) -> None:
    """k_dst[b, h, positions[b]] = k_new[b, h] (@ basis[h], split across the planes of LokiKeys) and
    v_dst[b, h, positions[b]] = v_new[b, h]; see the module docstring."""
    b, hkv, dim = k_new.shape
    low, high = (k_dst.low, k_dst.high) if isinstance(k_dst, LokiKeys) else (k_dst, None)
    d_low = low.shape[-1]
    has_high = high is not None and high.shape[-1] > 0
    high = high if has_high else low
    assert v_new.shape == (b, hkv, dim) and v_dst.shape[:2] == (b, hkv) and v_dst.shape[-1] == dim, (k_new.shape, v_new.shape, v_dst.shape)
    assert low.shape[:3] == v_dst.shape[:3] and d_low + (high.shape[-1] if has_high else 0) == dim, (low.shape, high.shape, dim)
    assert k_new.stride(-1) == v_new.stride(-1) == low.stride(-1) == high.stride(-1) == v_dst.stride(-1) == 1
    assert positions.shape == (b,) and positions.device == k_new.device and not positions.dtype.is_floating_point
    rotate = basis is not None
    block_e = min(BLOCK_E, pow2(dim, 16))
    if rotate:
        assert basis.shape == (hkv, dim, dim) and basis.dtype == torch.float32 and basis.is_contiguous(), (basis.shape, basis.dtype)
    launch(
        _write_kernel, (b * hkv, triton.cdiv(dim, block_e)), k_ptr=k_new, v_ptr=v_new, pos_ptr=positions, basis_ptr=basis if rotate else k_new,
        klo_ptr=low, khi_ptr=high, vd_ptr=v_dst,
        stride_kb=k_new.stride(0), stride_kh=k_new.stride(1), stride_vb=v_new.stride(0), stride_vh=v_new.stride(1),
        stride_lb=low.stride(0), stride_lh=low.stride(1), stride_ls=low.stride(2),
        stride_hb=high.stride(0), stride_hh=high.stride(1), stride_hs=high.stride(2),
        stride_db=v_dst.stride(0), stride_dh=v_dst.stride(1), stride_ds=v_dst.stride(2),
        num_kv_heads=hkv, head_dim=dim, d_low=d_low,
        DPAD=pow2(dim, 16), ROTATE=rotate, HAS_HIGH=has_high, BLOCK_E=block_e,
    )


def rotate_queries(q: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] times the basis [Hkv, D, D] (float32) of each head's KV head: [B, H, D] in q's dtype."""
    b, h, dim = q.shape
    hkv = basis.shape[0]
    assert h % hkv == 0 and basis.shape == (hkv, dim, dim) and basis.dtype == torch.float32 and basis.is_contiguous()
    assert q.stride(-1) == 1
    out = torch.empty(b, h, dim, dtype=q.dtype, device=q.device)
    block_e = min(BLOCK_E, pow2(dim, 16))
    launch(
        _rotate_kernel, (b * hkv, triton.cdiv(dim, block_e)), q_ptr=q, basis_ptr=basis, out_ptr=out,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_ob=out.stride(0), stride_oh=out.stride(1),
        num_kv_heads=hkv, group_size=h // hkv, head_dim=dim, G_PAD=pow2(h // hkv, 16), DPAD=pow2(dim, 16),
        BLOCK_E=block_e,
    )
    return out
