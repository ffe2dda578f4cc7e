"""kernels/attention.py: sparse flash-decoding over the kept rows with the split-K merge."""

from __future__ import annotations

import pytest
import torch
from kernel_support import (
    DEVICE,
    TOL,
    LokiSpec,
    _one_config_per_kernel,  # noqa: F401  (autouse; importing kernel_support switches on the interpreter first)
    assert_close,
    kept_mask,
    loki,
    make_cache,
    reference_scores,
    select_topk,
    sparse_decode_attention,
)


@pytest.mark.parametrize("nsplit", [1, 3, 16])
@pytest.mark.parametrize("group", ["head", "kv"])
def test_sparse_attention_any_split(nsplit, group):
    b, h, hkv, s, dim, kf = 3, 6, 2, 150, 64, 0.2
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=nsplit)
    lengths = torch.tensor([150, 7, 1], dtype=torch.int32)
    budgets = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    scores = reference_scores(q, k, 16, group).float()
    idx = select_topk(scores.to(DEVICE), lengths.to(DEVICE), budgets.to(DEVICE), kmax=LokiSpec(kf=kf).max_budget(s))
    got = sparse_decode_attention(q, k, v, idx, budgets.to(DEVICE), scaling=dim**-0.5, group=group, nsplit=nsplit)
    keep = kept_mask(idx, budgets.to(DEVICE), s).cpu()
    if group == "kv":
        keep = keep.repeat_interleave(h // hkv, dim=1)
    want = loki.attend(q.cpu()[:, :, None], k.cpu(), v.cpu(), keep[:, :, None], dim**-0.5)[:, :, 0]
    assert_close(got, want, **TOL[torch.float16], what=f"attention with {nsplit} pieces")


