"""The Loki reference against brute force and dense attention; the model patch; eval's budgets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_tokens, tiny_calibrated, tiny_llama

from lokitool.calib.collect import collect_statistics
from lokitool.calib.run import build_calibration
from lokitool.errors import UserError
from lokitool.sparse import reference as loki
from lokitool.sparse.attention import MethodSpec, patched
from lokitool.sparse.bases import random_basis
from lokitool.sparse.reference import LokiSpec


def qkv(b=2, h=6, hkv=2, sq=37, sk=37, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g), torch.randn(b, hkv, sk, d, generator=g))


def dense(q, k, v, scaling):
    """Plain causal attention with the key offset of a cache."""
    sq, sk = q.shape[2], k.shape[2]
    kk, vv = loki.expand_kv(k, q.shape[1]), loki.expand_kv(v, q.shape[1])
    s = (q @ kk.transpose(-1, -2)) * scaling
    mask = torch.arange(sk)[None, :] <= (torch.arange(sq)[:, None] + sk - sq)
    return torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ vv


def brute_force(q, k, v, basis, d, kf, scaling, budget="per-row", sink=0):
    """One row at a time, with explicit Python loops over heads: the obviously-correct version."""
    b, h, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, sq, dim)
    for bi in range(b):
        for hi in range(h):
            kvh = hi // (h // hkv)
            p = basis[kvh]
            for i in range(sq):
                t = i + sk - sq
                keys = k[bi, kvh, : t + 1]
                approx = (q[bi, hi, i] @ p)[:d] @ (keys @ p)[:, :d].T
                if budget == "per-row":
                    kt = max(1, math.floor(kf * (t + 1)))
                else:
                    kt = min(t + 1, max(1, math.floor(kf * sk)))
                order = [j for j in range(min(sink, t + 1))]
                rest = [j for j in torch.argsort(approx, descending=True).tolist() if j not in order]
                kept = (order + rest)[:kt]
                s = (q[bi, hi, i] @ keys[kept].T) * scaling
                out[bi, hi, i] = torch.softmax(s, -1) @ v[bi, kvh, kept]
    return out


@pytest.mark.parametrize("budget", ["per-row", "window"])
@pytest.mark.parametrize("sink", [0, 3])
@pytest.mark.parametrize("offset", [0, 5])  # 5 cached keys before the queries
def test_reference_matches_brute_force(budget, sink, offset):
    q, k, v = qkv(b=2, h=6, hkv=2, sq=23, sk=23 + offset, d=8)
    basis = random_basis(1, 2, 8, seed=3)[0].float()
    got = loki.sparse_attention(q, k, v, selector=loki.loki_selector(basis, 3), scaling=0.35,
                                spec=LokiSpec(kf=0.3, budget=budget, sink=sink), block_rows=7)
    want = brute_force(q, k, v, basis, 3, 0.3, 0.35, budget, sink)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_full_budget_equals_dense_attention():
    q, k, v = qkv(sq=19, sk=30)
    want = dense(q, k, v, 0.25)
    basis = random_basis(1, 2, 16)[0].float()
    for selector in (loki.loki_selector(basis, 16), loki.exact_topk_selector(), loki.full_selector()):
        got = loki.sparse_attention(q, k, v, selector=selector, spec=LokiSpec(kf=1.0), scaling=0.25)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loki.h2o_attention(q, k, v, spec=LokiSpec(kf=1.0), scaling=0.25), want, rtol=1e-5, atol=1e-6)


def test_selection_is_causal_and_respects_budgets():
    scores = torch.randn(2, 3, 40, 40)
    positions = torch.arange(40)
    for kf, mode in [(0.25, "per-row"), (0.1, "window"), (0.5, "per-row")]:
        budgets = loki.budget_per_row(positions, kf, mode, 40)
        keep = loki.select(scores, positions, budgets, sink=2)
        assert not bool(keep[..., torch.triu(torch.ones(40, 40, dtype=torch.bool), 1)].any())  # causal
        assert torch.equal(keep.sum(-1), budgets.expand(2, 3, 40))  # exactly k_t per row
        roomy = budgets >= 2
        assert bool(keep[:, :, roomy, :2].all())  # both sinks kept when the budget allows
        assert bool(keep[:, :, :, 0].all())  # the first token always
    # per-row budget: floor(kf (t+1)), at least 1; window: min(t+1, floor(kf L))
    assert loki.budget_per_row(torch.tensor([0, 3, 7]), 0.25, "per-row", 8).tolist() == [1, 1, 2]
    assert loki.budget_per_row(torch.tensor([0, 3, 7]), 0.25, "window", 8).tolist() == [1, 2, 2]


def test_exact_topk_keeps_the_largest_scores():
    q, k, v = qkv(b=1, h=2, hkv=2, sq=30, sk=30)
    positions = torch.arange(30)
    budgets = loki.budget_per_row(positions, 0.3, "per-row", 30)
    keep = loki.select(loki.exact_scores(q, k), positions, budgets)
    s = loki.exact_scores(q, k)
    for i in (5, 17, 29):
        for h in range(2):
            row = s[0, h, i, : i + 1]
            want = set(torch.topk(row, int(budgets[i])).indices.tolist())
            assert set(torch.nonzero(keep[0, h, i]).flatten().tolist()) == want


def test_group_selection_shares_keys_within_a_kv_group():
    q, k, v = qkv(b=1, h=6, hkv=2, sq=20, sk=20)
    stats = loki.SelectionStats()
    basis = random_basis(1, 2, 16)[0].float()
    captured = {}
    original = loki.attend

    def spy(q_, k_, v_, keep, *args, **kwargs):
        captured["keep"] = keep
        return original(q_, k_, v_, keep, *args, **kwargs)

    loki.attend, saved = spy, loki.attend
    try:
        loki.sparse_attention(q, k, v, selector=loki.loki_selector(basis, 4), spec=LokiSpec(kf=0.3, group="kv"), scaling=0.25, stats=stats, compare_exact=True)
    finally:
        loki.attend = saved
    keep = captured["keep"]
    assert torch.equal(keep[:, 0], keep[:, 1]) and torch.equal(keep[:, 0], keep[:, 2])
    assert torch.equal(keep[:, 3], keep[:, 5])
    assert 0 < stats.mean_jaccard <= 1


def test_decode_reference_equals_last_row_of_prefill():
    q, k, v = qkv(b=1, h=6, hkv=2, sq=1, sk=41)
    basis = random_basis(1, 2, 16)[0].float()
    prefill = loki.sparse_attention(q, k, v, selector=loki.loki_selector(basis, 5), spec=LokiSpec(kf=0.25), scaling=0.25)
    q_rot, k_rot = loki.rotate(q, basis)[:, :, 0], loki.rotate(k, basis)
    decode = loki.decode_attention(q_rot, k_rot, v, torch.tensor([41]), spec=LokiSpec(kf=0.25, df=5 / 16), scaling=0.25)
    torch.testing.assert_close(decode, prefill[:, :, 0], rtol=1e-5, atol=1e-6)


def test_decode_reference_ragged_lengths_ignore_padding():
    q_rot, k_rot, v = qkv(b=2, h=4, hkv=2, sq=1, sk=30)
    q_rot = q_rot[:, :, 0]
    lengths = torch.tensor([30, 11])
    keep = loki.decode_select(q_rot, k_rot, lengths, spec=LokiSpec(kf=0.5, df=4 / 16))
    assert keep[1, :, 11:].sum() == 0
    assert keep.sum(-1).tolist() == [[15] * 4, [5] * 4]
    out_short = loki.decode_attention(q_rot[1:], k_rot[1:, :, :11], v[1:, :, :11], torch.tensor([11]), spec=LokiSpec(kf=0.5, df=4 / 16), scaling=0.3)
    out_padded = loki.decode_attention(q_rot, k_rot, v, lengths, spec=LokiSpec(kf=0.5, df=4 / 16), scaling=0.3)[1:]
    torch.testing.assert_close(out_padded, out_short)


# ----------------------------------------------------------------------------------------------
# In the model


@pytest.fixture(scope="module")
def tiny_with_calibration():
    return tiny_calibrated()


@pytest.mark.parametrize("basis", ["pre", "post"])
def test_loki_full_budget_reproduces_model_logits(tiny_with_calibration, basis):
    loaded, cal = tiny_with_calibration
    tokens = random_tokens(2, 33, seed=5)
    with torch.no_grad():
        want = loaded.model(input_ids=tokens).logits
        for spec in (MethodSpec("loki", LokiSpec(kf=1.0, df=1.0, basis=basis)), MethodSpec("exact-topk", LokiSpec(kf=1.0)), MethodSpec("h2o", LokiSpec(kf=1.0))):
            with patched(loaded.model, loaded.facts, spec, cal) as rec:
                got = loaded.model(input_ids=tokens).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert rec.kept_fraction() == pytest.approx(1.0)
    assert loaded.model.config._attn_implementation == "sdpa"


def test_loki_in_model_selects_with_per_row_budgets(tiny_with_calibration):
    """Inside the model, selection really happens, with exactly the per-row budgets' kept fraction."""
    loaded, cal = tiny_with_calibration
    tokens = random_tokens(1, 40, seed=7)
    spec = MethodSpec("loki", LokiSpec(kf=0.25, df=0.25, basis="pre"))
    with patched(loaded.model, loaded.facts, spec, cal) as rec, torch.no_grad():
        sparse_logits = loaded.model(input_ids=tokens).logits
    with torch.no_grad():
        dense_logits = loaded.model(input_ids=tokens).logits
    assert not torch.allclose(sparse_logits, dense_logits, atol=1e-3)  # selection really happened
    kept = rec.kept_fraction()
    budgets = loki.budget_per_row(torch.arange(40), 0.25, "per-row", 40).double()
    assert kept == pytest.approx(float((budgets / torch.arange(1, 41)).mean()), rel=1e-6)
    assert all(0 <= j <= 1 for j in rec.jaccard_per_layer())


def test_method_spec_validation():
    with pytest.raises(UserError, match="unknown method"):
        MethodSpec("magic", LokiSpec(kf=0.5))
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        MethodSpec("loki", LokiSpec(kf=1.5, df=0.5))
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        MethodSpec("loki", LokiSpec(kf=0.5, df=0.0))
    with pytest.raises(UserError, match="exactly one"):
        MethodSpec("loki", LokiSpec(kf=0.5, df=None))
    with pytest.raises(UserError, match="needs --kf"):
        MethodSpec("exact-topk")


def test_calibration_of_another_model_is_refused(tiny_with_calibration):
    _, cal = tiny_with_calibration
    other = tiny_llama(num_heads=4, num_kv_heads=4, head_dim=16)
    with pytest.raises(UserError, match="calibrate this model first"):
        with patched(other.model, other.facts, MethodSpec("loki", LokiSpec(kf=0.5, df=0.5)), cal):
            pass


@pytest.mark.embedded
def test_embedded_loki_full_budget_matches_full_attention(embedded_model, tmp_path):
    """kf = df = 1 on the real model: Loki's logits equal the model's own attention."""
    from lokitool.calib.data import load_windows

    windows = load_windows(embedded_model, "default", seq_len=64, num_tokens=128, bos=True, purpose="calibrate")
    stats = collect_statistics(embedded_model.model, embedded_model.facts, windows.tokens, batch_size=2, with_queries=False)
    cal = build_calibration(stats, embedded_model.facts, {"dataset": windows.dataset})
    tokens = windows.tokens[:1]
    with torch.no_grad():
        want = embedded_model.model(input_ids=tokens).logits
        with patched(embedded_model.model, embedded_model.facts, MethodSpec("loki", LokiSpec(kf=1.0, df=1.0, basis="post")), cal):
            got = embedded_model.model(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# LokiSpec: the one owner of d, budgets and their validation


def test_dims_round_half_up_and_stay_in_range():
    assert LokiSpec(df=0.25).dims(64) == 16
    assert LokiSpec(df=0.25).dims(10) == 3  # 2.5 rounds up (Python's round() would give 2)
    assert LokiSpec(df=0.24).dims(10) == 2
    assert LokiSpec(df=0.001).dims(64) == 1  # never below 1
    assert LokiSpec(df=1.0).dims(64) == 64
    assert all(LokiSpec(df=d / 48).dims(48) == d for d in range(1, 49))  # df = d / D gives d back


def test_token_budget_per_row_and_window():
    visible = torch.tensor([1, 3, 4, 8, 40])
    assert loki.token_budget(visible, 0.25).tolist() == [1, 1, 1, 2, 10]
    assert loki.token_budget(visible, 0.25, "window", 8).tolist() == [1, 2, 2, 2, 2]
    spec = LokiSpec(kf=0.3)
    assert spec.max_budget(70) == 21 == int(spec.budgets(torch.tensor([70])))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kf=0.0), r"--kf must be in \(0, 1\]"),
        (dict(kf=1.5), r"--kf must be in \(0, 1\]"),
        (dict(df=0.0), r"--df must be in \(0, 1\]"),
        (dict(df=0.5, variance=0.9), "one of --df and --variance"),
        (dict(basis="nope"), "unknown basis"),
        (dict(budget="all"), "--budget"),
        (dict(group="layer"), "--group"),
        (dict(sink=-1), "--sink"),
    ],
)
def test_spec_refuses_bad_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        LokiSpec(**kwargs)


@pytest.mark.parametrize("group", ["head", "kv"])
def test_decode_gather_equals_masked_dense_attention(group):
    """The staged decode (scores -> top-k indices -> gathered attention) equals exact attention
    under decode_select's keep mask, computed densely here."""
    g = torch.Generator().manual_seed(1)
    b, h, hkv, s, dim = 3, 6, 2, 70, 32
    q = torch.randn(b, h, dim, generator=g)
    k = torch.randn(b, hkv, s, dim, generator=g)
    v = torch.randn(b, hkv, s, dim, generator=g)
    lengths = torch.tensor([70, 1, 33])
    spec = LokiSpec(kf=0.3, df=8 / dim, group=group)
    got = loki.decode_attention(q, k, v, lengths, spec=spec, scaling=dim**-0.5)
    keep = loki.decode_select(q, k, lengths, spec=spec)  # [B, H, S]
    assert keep.sum(-1).tolist() == [[21] * h, [1] * h, [9] * h]
    scores = (q[:, :, None] @ loki.expand_kv(k, h).transpose(-1, -2))[:, :, 0] * dim**-0.5
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    want = (probs[:, :, None] @ loki.expand_kv(v, h))[:, :, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
