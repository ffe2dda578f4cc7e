"""kernels/score.py: approximate scores over the first d rotated dims, against the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_support import (
    DEVICE,
    _one_config_per_kernel,  # noqa: F401  (autouse; importing kernel_support switches on the interpreter first)
    assert_close,
    loki_scores,
    make_cache,
    reference_scores,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,h,hkv,s,dim,d,group",
    [
        (2, 4, 4, 77, 64, 16, "head"),  # MHA, S not a multiple of any block
        (3, 8, 2, 200, 128, 32, "head"),  # GQA 4
        (3, 8, 2, 200, 128, 32, "kv"),
        (2, 9, 3, 65, 64, 1, "kv"),  # smollm2 shape, d = 1
        (1, 6, 2, 33, 48, 48, "head"),  # d = D, D not a power of two
    ],
)
def test_scores_match_reference(b, h, hkv, s, dim, d, group, dtype):
    q, k, _ = make_cache(b, h, hkv, s, dim, dtype, seed=b + s)
    lengths = torch.tensor([s, max(1, s // 3), 5][:b], dtype=torch.int32, device=DEVICE)
    got = loki_scores(q, k, lengths, d=d, group=group).cpu()
    ref = reference_scores(q, k, d, group).float()
    for i, n in enumerate(lengths.tolist()):
        assert_close(got[i, :, :n], ref[i, :, :n], atol=1e-4, rtol=1e-5, what=f"scores of sequence {i}")

