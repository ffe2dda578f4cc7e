"""SparQ, Quest, Double Sparsity and union groups against brute force written here; bytes per step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_tokens, tiny_llama

from lokitool.errors import UserError
from lokitool.evals.config import EvalConfig
from lokitool.sparse import peers
from lokitool.sparse import reference as ref
from lokitool.sparse.attention import MethodSpec, patched
from lokitool.sparse.reference import LokiSpec

B, H, HKV, D = 2, 6, 2, 8  # GQA: 3 query heads per KV head


def qkv(sq=21, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sk = sq + offset
    return torch.randn(B, H, sq, D, generator=g), torch.randn(B, HKV, sk, D, generator=g), torch.randn(B, HKV, sk, D, generator=g)


# ----------------------------------------------------------------------------------------------
# Brute force: one row at a time, Python loops, float64


def ranked(scores: list[float]) -> list[int]:
    """Keys best first; equal scores newest first (Quest's tokens of one page)."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], -j))


def brute_force(q, k, v, approx, *, kf, scaling, budget="per-row", sink=0, group="head"):
    """approx(bi, hi, i, t) -> the approximate scores (list) of keys 0..t for query row i at position t."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for i in range(sq):
            t = i + sk - sq
            kt = max(1, math.floor(kf * (t + 1))) if budget == "per-row" else min(t + 1, max(1, math.floor(kf * sk)))
            scores = [approx(bi, hi, i, t) for hi in range(h)]
            for hi in range(h):
                heads = range(hi // g * g, hi // g * g + g)
                if group == "head":
                    ranking = ranked(scores[hi])
                elif group == "kv":
                    ranking = ranked([sum(scores[o][j] for o in heads) for j in range(t + 1)])
                else:  # union: each head's list in turn, a key already taken skipped
                    lists = [ranked(scores[o]) for o in heads]
                    ranking = []
                    for turn in range(t + 1):
                        for lst in lists:
                            if lst[turn] not in ranking:
                                ranking.append(lst[turn])
                sinks = list(range(min(sink, t + 1)))
                kept = (sinks + [j for j in ranking if j not in sinks])[:kt]
                kvh = hi // g
                s = (k[bi, kvh, kept] @ q[bi, hi, i]) * scaling
                out[bi, hi, i] = torch.softmax(s, -1) @ v[bi, kvh, kept]
    return out.float()


def sparq_brute(q, k, r, shared):
    g = H // HKV
    q, k = q.tolist(), k.tolist()  # plain floats: the obvious arithmetic, and fast enough

    def approx(bi, hi, i, t):
        if shared:
            group = range(hi // g * g, hi // g * g + g)
            mag = [sum(abs(q[bi][o][i][c]) for o in group) for c in range(D)]
        else:
            mag = [abs(q[bi][hi][i][c]) for c in range(D)]
        dims = sorted(range(D), key=lambda c: -mag[c])[:r]
        return [sum(q[bi][hi][i][c] * k[bi][hi // g][j][c] for c in dims) for j in range(t + 1)]

    return approx


def quest_brute(q, k, page):
    g = H // HKV
    q, k = q.tolist(), k.tolist()

    def approx(bi, hi, i, t):
        out = []
        for j in range(t + 1):
            start = j // page * page
            keys = k[bi][hi // g][start : min(start + page, t + 1)]  # the row's own page: up to t
            lo, top = [min(col) for col in zip(*keys)], [max(col) for col in zip(*keys)]
            out.append(sum(max(x * a, x * b) for x, a, b in zip(q[bi][hi][i], lo, top)))
        return out

    return approx


def channels_brute(q, k, channels, r):
    g = H // HKV
    q, k = q.tolist(), k.tolist()

    def approx(bi, hi, i, t):
        chosen = channels[hi // g, :r].tolist()
        return [sum(q[bi][hi][i][c] * k[bi][hi // g][j][c] for c in chosen) for j in range(t + 1)]

    return approx


def exact_brute(q, k):
    g = H // HKV
    q, k = q.tolist(), k.tolist()
    return lambda bi, hi, i, t: [sum(a * b for a, b in zip(q[bi][hi][i], k[bi][hi // g][j])) for j in range(t + 1)]


CASES = [("per-row", 0, 0), ("per-row", 2, 4), ("window", 0, 4), ("window", 3, 0)]  # budget, sink, cached keys


def check(selector, approx_of, q, k, v, *, kf, budget, sink, group):
    spec = LokiSpec(kf=kf, budget=budget, sink=sink, group=group)
    got = ref.sparse_attention(q, k, v, selector=selector, spec=spec, scaling=0.4, block_rows=5)
    want = brute_force(q, k, v, approx_of, kf=kf, scaling=0.4, budget=budget, sink=sink, group=group)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Each selector against brute force


@pytest.mark.parametrize("group", ["head", "kv", "union"])
@pytest.mark.parametrize("budget,sink,offset", CASES)
def test_sparq_matches_brute_force(group, budget, sink, offset):
    q, k, v = qkv(offset=offset, seed=1)
    shared = group != "head"
    check(peers.sparq_selector(3, shared=shared), sparq_brute(q, k, 3, shared), q, k, v, kf=0.3, budget=budget, sink=sink, group=group)


@pytest.mark.parametrize("group", ["head", "kv", "union"])
@pytest.mark.parametrize("budget,sink,offset", CASES)
def test_quest_matches_brute_force(group, budget, sink, offset):
    q, k, v = qkv(offset=offset, seed=2)
    check(peers.quest_selector(4), quest_brute(q, k, 4), q, k, v, kf=0.3, budget=budget, sink=sink, group=group)


def test_quest_keeps_whole_pages_newest_first():
    """Kept tokens fill the best pages; only the page where the budget runs out is cut, keeping its newest."""
    q, k, v = qkv(sq=40, seed=3)
    page = 5
    positions = torch.arange(40)
    sel = peers.quest_selector(page)
    scores = sel.score(q, sel.prepare(k), positions)
    keep = ref.select(scores, positions, ref.budget_per_row(positions, 0.4, "per-row", 40))  # [B, H, 40, 40]
    for t in (17, 29, 39):
        for bi, hi in ((0, 0), (1, 4)):
            row = keep[bi, hi, t, : t + 1]
            pages = [row[p : min(p + page, t + 1)] for p in range(0, t + 1, page)]
            partial = [pg for pg in pages if 0 < int(pg.sum()) < len(pg)]
            assert len(partial) <= 1, t
            for pg in partial:  # the cut page keeps a suffix: its newest tokens
                n = int(pg.sum())
                assert pg[-n:].all() and not pg[:-n].any()


@pytest.mark.parametrize("group", ["head", "union"])
@pytest.mark.parametrize("budget,sink,offset", CASES)
def test_double_sparsity_matches_brute_force(group, budget, sink, offset):
    q, k, v = qkv(offset=offset, seed=4)
    g = torch.Generator().manual_seed(9)
    channels = torch.stack([torch.randperm(D, generator=g) for _ in range(HKV)])  # [Hkv, D]
    check(peers.double_sparsity_selector(channels, 3), channels_brute(q, k, channels, 3), q, k, v, kf=0.3, budget=budget, sink=sink, group=group)


def test_double_sparsity_is_loki_in_the_channel_basis():
    """The eval path runs Double Sparsity as Loki's selector in a permutation basis: same scores."""
    q, k, _ = qkv(seed=5)
    g = torch.Generator().manual_seed(11)
    order = torch.stack([torch.randperm(D, generator=g) for _ in range(HKV)])
    basis = torch.eye(D)[:, order].permute(1, 0, 2)  # [Hkv, D, D], column j = axis order[h, j]
    direct, loki_way = peers.double_sparsity_selector(order, 3), ref.loki_selector(basis, 3)
    torch.testing.assert_close(loki_way.score(q, loki_way.prepare(k)), direct.score(q, direct.prepare(k)))


@pytest.mark.parametrize("budget,sink,offset", CASES)
def test_union_groups_match_brute_force(budget, sink, offset):
    q, k, v = qkv(offset=offset, seed=6)
    check(ref.exact_topk_selector(), exact_brute(q, k), q, k, v, kf=0.25, budget=budget, sink=sink, group="union")


def test_union_keeps_one_set_per_kv_head():
    q, k, v = qkv(sq=30, seed=7)
    positions = torch.arange(30)
    scores = ref.shared_scores(ref.exact_scores(q, k), "union", HKV, ref.causal_mask(positions, 30))
    keep = ref.select(scores, positions, ref.budget_per_row(positions, 0.3, "per-row", 30))
    per_kv = keep.reshape(B, HKV, H // HKV, 30, 30)
    assert (per_kv == per_kv[:, :, :1]).all()
    # once a row keeps at least 3 keys (t >= 9 at kf 0.3), each head's own best key is in its group's set
    best = ref.exact_scores(q, k).masked_fill(~ref.causal_mask(positions, 30), -math.inf).argmax(-1)  # [B, H, 30]
    assert keep.gather(-1, best[..., None])[..., 0][:, :, 9:].all()


def test_decoding_refuses_union_groups():
    q, k, _ = qkv(seed=9)
    with pytest.raises(UserError, match="union"):
        ref.decode_scores(q[:, :, 0], k, d=4, group="union")


def selectors():
    channels = torch.stack([torch.randperm(D) for _ in range(HKV)])
    return [peers.sparq_selector(2), peers.sparq_selector(2, shared=True), peers.quest_selector(4), peers.double_sparsity_selector(channels, 2)]


@pytest.mark.parametrize("group", ["head", "kv", "union"])
@pytest.mark.parametrize("selector", selectors(), ids=lambda s: s.name)
def test_keeping_every_token_is_full_attention(selector, group):
    q, k, v = qkv(offset=3, seed=8)
    full = ref.sparse_attention(q, k, v, selector=ref.full_selector(), spec=LokiSpec(kf=1.0), scaling=0.4)
    got = ref.sparse_attention(q, k, v, selector=selector, spec=LokiSpec(kf=1.0, group=group), scaling=0.4, block_rows=6)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Offline channels, bytes, the sweep, the model


@pytest.fixture(scope="module")
def tiny_with_calibration():
    """A tiny GQA decoder calibrated on its own keys and queries (Double Sparsity needs E[q q^T])."""
    from lokitool.calib.collect import collect_statistics
    from lokitool.calib.run import build_calibration

    loaded = tiny_llama(num_heads=6, num_kv_heads=2, head_dim=16, num_layers=2)
    tokens = random_tokens(4, 48, seed=1)
    stats = collect_statistics(loaded.model, loaded.facts, tokens, batch_size=2, with_queries=True)
    return loaded, build_calibration(stats, loaded.facts, {"dataset": "random", "num_tokens": tokens.numel()})


def test_outlier_channels_rank_by_the_cauchy_schwarz_bound(tiny_with_calibration):
    _, cal = tiny_with_calibration
    got = peers.outlier_channels(cal)  # [L, Hkv, D]
    q2 = cal.query_moment["post"].double().diagonal(dim1=-2, dim2=-1)
    mean = cal.pca["post"].mean.double()
    k2 = cal.pca["post"].covariance().diagonal(dim1=-2, dim2=-1) + mean**2  # E[k_i^2] = Var + mean^2
    bound = (q2 * k2).sqrt()
    for layer in range(got.shape[0]):
        for h in range(got.shape[1]):
            want = sorted(range(bound.shape[-1]), key=lambda c: -float(bound[layer, h, c]))
            assert got[layer, h].tolist()[:4] == want[:4]
    basis = peers.channel_basis(cal)
    assert torch.equal(basis[0, 0][:, 0], torch.eye(bound.shape[-1], dtype=basis.dtype)[got[0, 0, 0]])


def test_bytes_per_step_and_the_kf_they_buy():
    kf = {m: peers.kf_for_bytes(m, 0.375, df=0.25, page=16) for m in ("loki", "sparq", "double-sparsity", "quest", "h2o", "exact-topk", "full")}
    assert kf == {"loki": 0.25, "sparq": 0.25, "double-sparsity": 0.25, "quest": 0.3125, "h2o": 0.375, "exact-topk": 0.25, "full": None}
    assert peers.kf_for_bytes("exact-topk", 0.75, df=0.25, page=16) == 0.25  # above 0.5 it can pay for its scan
    assert peers.step_bytes("quest", 0.3125, scan=peers.scan_fraction("quest", df=None, page=16)) == 0.375
    assert peers.step_bytes("exact-topk", 0.25, scan=1.0) == 0.75
    with pytest.raises(UserError, match="nothing to attend"):
        peers.kf_for_bytes("quest", 0.05, df=None, page=16)


def test_method_bytes_count_gqa_rows(tiny_with_calibration):
    loaded, _ = tiny_with_calibration
    facts = loaded.facts
    g = facts.num_heads // facts.num_kv_heads
    d = [facts.head_dim // 4] * facts.num_layers
    for group, rows in (("head", g), ("kv", 1), ("union", 1)):
        spec = LokiSpec(kf=0.25, df=0.25, group=group)
        assert MethodSpec("loki", spec).step_bytes(facts, d) == pytest.approx(0.125 + rows * 0.25)
        assert MethodSpec("sparq", spec).step_bytes(facts, d) == pytest.approx(0.125 * rows + rows * 0.25)
        assert MethodSpec("quest", LokiSpec(kf=0.25, group=group), page=16).step_bytes(facts) == pytest.approx(1 / 16 + rows * 0.25)
        assert MethodSpec("h2o", LokiSpec(kf=0.25, group=group)).step_bytes(facts) == pytest.approx(g * 0.25)


def test_eval_config_derives_each_methods_kf_from_bytes(tmp_path):
    config = EvalConfig(
        calibration=tmp_path / "cal.safetensors", methods=("full", "exact-topk", "loki", "sparq", "quest", "double-sparsity", "h2o"),
        bytes=(0.375, 0.25), df=(0.25,), basis=("post",), group="union",
    )
    got = [(s.method, s.loki.kf if s.loki else None, s.page) for s in config.specs()]
    assert got == [
        ("full", None, None),
        ("exact-topk", 0.25, None), ("loki", 0.25, None), ("sparq", 0.25, None), ("quest", 0.3125, 16),
        ("double-sparsity", 0.25, None), ("h2o", 0.375, None),
        ("exact-topk", 0.125, None), ("loki", 0.125, None), ("sparq", 0.125, None), ("quest", 0.1875, 16),
        ("double-sparsity", 0.125, None), ("h2o", 0.25, None),
    ]
    assert all(s.loki.group == "union" for s in config.specs() if s.loki)
    with pytest.raises(UserError, match="--bytes"):
        EvalConfig(methods=("sparq",), bytes=(1.5,))


@pytest.mark.parametrize("method", ["sparq", "quest", "double-sparsity"])
def test_peers_at_full_budget_reproduce_model_logits(tiny_with_calibration, method):
    loaded, cal = tiny_with_calibration
    tokens = random_tokens(1, 29, seed=5)
    spec = MethodSpec(method, LokiSpec(kf=1.0, df=0.25 if method != "quest" else None, group="union"), page=8 if method == "quest" else None)
    with torch.no_grad():
        want = loaded.model(input_ids=tokens).logits
        with patched(loaded.model, loaded.facts, spec, cal) as rec:
            got = loaded.model(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert rec.kept_fraction() == pytest.approx(1.0)
    assert all(j == pytest.approx(1.0) for j in rec.jaccard_per_layer())


@pytest.mark.parametrize("method", ["sparq", "quest"])
def test_task_sparse_prefill_runs_the_peer_selectors(method):
    """eval --tasks --sparse-prefill puts the context under SparQ / Quest themselves (brute force),
    through the selector eval --ppl uses, not under exact top-k."""
    from lokitool.sparse import decode

    q, k, v = qkv(seed=5)
    spec = MethodSpec(method, LokiSpec(kf=0.3, df=0.375), page=4)  # d = 3 of D = 8
    got = decode._prefill(spec, D)(q, k, v, 0.4)
    approx = sparq_brute(q, k, 3, False) if method == "sparq" else quest_brute(q, k, 4)
    torch.testing.assert_close(got, brute_force(q, k, v, approx, kf=0.3, scaling=0.4), rtol=1e-5, atol=1e-5)
