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




def test_merge_in_narrower_loads_gives_the_same_output(monkeypatch):
    """The merge loads a head's pieces x dims at once where they fit MERGE_TILE, else in narrower
    column blocks (merge_dims; LOKITOOL_MERGE_DC forces a width): the same output, in the merge kernel
    (sparse_decode_attention; loki_decode with group kv) and in the attention's own last-piece merge
    (loki_decode with a query head a row). Equal to float32 rounding, not bit for bit: compiled for another
    tile width, the sum over pieces may add them in another order (on the H200 the outputs were not
    bit-equal); a piece or dim merged wrongly would be off by far more."""
    from lokitool.kernels import attention, clear_plans, loki_decode

    assert attention.merge_dims(64, 128) == 128 and attention.merge_dims(9, 128) == 128
    assert attention.merge_dims(64, 256) == 128 and attention.merge_dims(64, 48) == 64  # padded head dim
    b, h, hkv, s, dim, kf = 2, 4, 2, 120, 64, 0.5
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=9)
    lengths = torch.tensor([120, 50], dtype=torch.int32, device=DEVICE)
    spec = LokiSpec(kf=kf, df=0.25, group="kv")
    budgets = loki.decode_budget(lengths.long().cpu(), kf).to(torch.int32).to(DEVICE)
    idx = select_topk(reference_scores(q, k, 16, "kv").float().to(DEVICE), lengths, budgets, kmax=spec.max_budget(s))

    def both():
        clear_plans()
        sparse = sparse_decode_attention(q, k, v, idx, budgets, scaling=dim**-0.5, group="kv", nsplit=4)
        per_head = LokiSpec(kf=kf, df=0.25, group="head")
        assert not attention.merges_inside(h // hkv) and attention.merges_inside(1)
        return sparse, loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5), loki_decode(q, k, v, lengths, spec=per_head, scaling=dim**-0.5)

    wide = both()
    for bad in ("24", "8", "wide"):
        monkeypatch.setenv("LOKITOOL_MERGE_DC", bad)
        with pytest.raises(ValueError, match="LOKITOOL_MERGE_DC"):
            attention.merge_dims(4, 128)
    monkeypatch.setenv("LOKITOOL_MERGE_DC", "16")
    assert attention.merge_dims(64, 128) == 16
    narrow = both()
    clear_plans()
    for w, n in zip(wide, narrow):
        torch.testing.assert_close(n, w, rtol=1e-5, atol=1e-6)


def test_split_count_by_rows():
    """num_splits (H200, 132 multiprocessors): batch-1 row counts keep ~8 programs per multiprocessor (fewer
    pieces made their whole step slower); many rows get ~4 and at least 2 pieces; pieces never shorter than
    64 kept rows, never more than 64 of them."""
    from lokitool.kernels.attention import num_splits

    sms = 132
    assert num_splits(40, 8192, sms) == 27  # llama2-13b, batch 1, 32k
    assert num_splits(8, 8192, sms) == 64  # llama3-8b kv, batch 1: capped at 64
    assert num_splits(128, 4096, sms) == 5  # llama3-8b kv, batch 16, 16k
    assert num_splits(640, 16384, sms) == 2  # llama2-13b, batch 16, 64k: at least 2
    assert num_splits(640, 64, sms) == 1  # one piece of 64 kept rows
    assert num_splits(40, 200, sms) == 4  # pieces of >= 64 kept rows
