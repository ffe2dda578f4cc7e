"""Loki decode in three kernels: approximate scores -> exact top-k -> sparse flash-decoding.

`loki_decode` computes what the oracle `lokitool.sparse.reference.decode_attention` computes, over a cache
whose keys are stored already rotated into the PCA basis. In the Loki layout the d scored dims of
all tokens are one contiguous plane and the other D - d dims a second one: each key element is
stored once, the score pass streams the first plane, the exact attention reads kept rows from both.

    q_rot [B, H, D], v [B, Hkv, S, D]            (float16 or bfloat16, head dim contiguous)
    k_rot: LokiKeys(low [B, Hkv, S, d], high [B, Hkv, S, D - d])  (the Loki layout, layout.py)
           or one tensor [B, Hkv, S, D]
    lengths [B]: sequence i holds lengths[i] valid tokens, 1 <= lengths[i] <= S
    -> [B, H, D] float32

Stages, each callable (and timed by the benchmark) on its own:
    scores = loki_scores(q_rot, k_rot, lengths, d=d, group=group)              # score.py
    idx    = select_topk(scores, lengths, budgets, kmax=spec.max_budget(S))    # select.py
    out    = sparse_decode_attention(q_rot, k_rot, v, idx, budgets, scaling=s, group=group)
No stage synchronises with the host (lengths given on the GPU are trusted), so a decode step can be
captured in a CUDA graph.

Host cost: a decode step runs outside a graph too (eager decoding, the first steps of a server), so
one call is kept to a handful of launches and a few allocations: checks read shapes only, the
budgets come from one small kernel (select.decode_budgets), and each autotuned kernel launches
through the config pinned for its shape after the first call (_common.Pinned). Pass lengths as
int32 on the GPU: anything else costs a conversion per call.
"""

from __future__ import annotations

import torch

from ..sparse.reference import LokiSpec
from .attention import sparse_decode_attention
from .layout import Keys, LokiKeys
from .score import loki_scores
from .select import decode_budgets, select_topk


def check_inputs(q_rot: torch.Tensor, k_rot: Keys, v: torch.Tensor, lengths: torch.Tensor, *, d: int) -> None:
    """Shapes, dtypes and ranges (the spec validated its own settings); lengths are range-checked
    only when they live on the CPU."""
    if isinstance(k_rot, LokiKeys):
        low, high = k_rot
        if low.dim() != 4 or high.shape[:3] != low.shape[:3] or high.dtype != low.dtype:
            raise ValueError(f"LokiKeys planes must be [B, Hkv, S, d] and [B, Hkv, S, D - d]; got {tuple(low.shape)}, {tuple(high.shape)}")
        if d > low.shape[-1]:
            raise ValueError(f"d={d} is larger than the scored plane ({low.shape[-1]} dims); split the keys at d")
    if q_rot.dim() != 3 or len(k_rot.shape) != 4 or v.shape != k_rot.shape:
        raise ValueError(f"expected q_rot [B, H, D] and k_rot, v [B, Hkv, S, D]; got {tuple(q_rot.shape)}, {tuple(k_rot.shape)}, {tuple(v.shape)}")
    b, h, dim = q_rot.shape
    if k_rot.shape[0] != b or k_rot.shape[3] != dim or h % k_rot.shape[1]:
        raise ValueError(f"q_rot {tuple(q_rot.shape)} does not match k_rot {tuple(k_rot.shape)} (H must be a multiple of Hkv)")
    if not (q_rot.dtype == k_rot.dtype == v.dtype) or q_rot.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q_rot, k_rot, v must share dtype float16 or bfloat16; got {q_rot.dtype}, {k_rot.dtype}, {v.dtype}")
    if not 1 <= d <= dim:
        raise ValueError(f"d={d} must lie in [1, {dim}]")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
    if lengths.device.type == "cpu" and lengths.numel() and not (1 <= int(lengths.min()) and int(lengths.max()) <= k_rot.shape[2]):
        raise ValueError(f"lengths must lie in [1, {k_rot.shape[2]}], got {lengths.tolist()}")


def loki_decode(
    q_rot: torch.Tensor,
    k_rot: Keys,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    spec: LokiSpec,
    scaling: float,
) -> torch.Tensor:
    """One Loki decode step: [B, H, D] float32 (see the module docstring); d = spec.dims(D)."""
    d = spec.dims(q_rot.shape[-1])
    check_inputs(q_rot, k_rot, v, lengths, d=d)
    if lengths.dtype != torch.int32 or lengths.device != q_rot.device:
        lengths = lengths.to(device=q_rot.device, dtype=torch.int32)
    budgets = decode_budgets(lengths, spec.kf)  # [B] int32 k = max(1, floor(kf x length)), as the oracle's decode_budget
    scores = loki_scores(q_rot, k_rot, lengths, d=d, group=spec.group)  # [B, R, S] float32
    idx = select_topk(scores, lengths, budgets, kmax=spec.max_budget(k_rot.shape[2]))  # [B, R, kmax] int32
    return sparse_decode_attention(q_rot, k_rot, v, idx, budgets, scaling=scaling, group=spec.group)
