"""kernels/decode_full.py: full-attention decode over a preallocated cache against SDPA and the dense oracle."""

from __future__ import annotations

import pytest
import torch
from kernel_support import (
    DEVICE,
    TOL,
    _one_config_per_kernel,  # noqa: F401  (autouse; importing kernel_support switches on the interpreter first)
    assert_close,
    loki,
    make_cache,
)

from lokitool.kernels import full_decode


def sdpa_reference(q, k, v, lengths, scaling):
    """Each sequence through torch's SDPA over its own valid prefix (GQA expanded), float32: [B, H, D]."""
    h = q.shape[1]
    outs = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        kb = loki.expand_kv(k[b : b + 1, :, :n].float().cpu(), h)
        vb = loki.expand_kv(v[b : b + 1, :, :n].float().cpu(), h)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b : b + 1, :, None].float().cpu(), kb, vb, scale=scaling)[:, :, 0])
    return torch.cat(outs)


@pytest.mark.parametrize(
    "b, h, hkv, s, dim, lengths, nsplit",
    [
        (1, 4, 4, 37, 32, [37], 1),  # MHA, one chunk, odd length
        (2, 8, 2, 200, 64, [200, 1], 3),  # GQA 4, a length-1 sequence, chunks past its length
        (3, 6, 2, 130, 48, [5, 130, 77], 4),  # GQA 3 (group not a power of two), head dim not a power of two
        (2, 4, 1, 300, 32, [299, 150], None),  # MQA, the launcher's own split count
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_decode_matches_sdpa_over_each_valid_prefix(b, h, hkv, s, dim, lengths, nsplit, dtype):
    q, k, v = make_cache(b, h, hkv, s, dim, dtype, seed=b + s)
    v[:, :, max(lengths):] = 1e4  # rows past every length must not leak into any output
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scaling = dim**-0.5
    out = full_decode(q, k, v, lens, scaling=scaling, nsplit=nsplit)
    assert out.dtype == dtype and out.shape == (b, h, dim)
    expected = sdpa_reference(q, k, v, lens, scaling)
    assert_close(out, expected, **TOL[dtype], what=f"full_decode vs SDPA {dtype}")
    oracle = loki.dense_decode_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), scaling=scaling)
    assert_close(oracle, expected, atol=1e-4, rtol=1e-4, what="dense oracle vs SDPA")


def test_full_decode_reads_lengths_on_the_device_each_call():
    """The same buffers with the lengths changed in place (as a decode loop does) give the new answer."""
    b, h, hkv, s, dim = 2, 4, 2, 96, 32
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=3)
    lens = torch.tensor([10, 40], dtype=torch.int32, device=DEVICE)
    first = full_decode(q, k, v, lens, scaling=0.2, nsplit=2)
    lens += 50
    second = full_decode(q, k, v, lens, scaling=0.2, nsplit=2)
    assert_close(first, sdpa_reference(q, k, v, torch.tensor([10, 40]), 0.2), **TOL[torch.float16], what="before")
    assert_close(second, sdpa_reference(q, k, v, torch.tensor([60, 90]), 0.2), **TOL[torch.float16], what="after")


def test_full_decode_refuses_lengths_out_of_range():
    q, k, v = make_cache(1, 2, 2, 16, 16, torch.float16)
    with pytest.raises(ValueError, match="lengths must lie in"):
        full_decode(q, k, v, torch.tensor([17]), scaling=0.25)
