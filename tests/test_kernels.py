"""The Loki decode kernels against the pure-PyTorch oracle in lokitool.loki.

Without a GPU (or with TRITON_INTERPRET=1 already set) the kernels run on Triton's CPU
interpreter, which this module switches on before triton is imported; on a GPU they compile.
Shapes are small and awkward: non-power-of-two lengths, GQA ratios, batch > 1, ragged lengths,
d and k at their edges. Inputs are float16/bfloat16; comparisons are made in float32.
"""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lokitool.kernels import (  # noqa: E402
    LokiKeys,
    check_inputs,
    clear_plans,
    decode_budgets,
    joined,
    kept_mask,
    loki_decode,
    loki_scores,
    select_topk,
    sparse_decode_attention,
    split_keys,
)

from lokitool.sparse import reference as loki  # noqa: E402
from lokitool.sparse.reference import LokiSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    """No autotuning on a GPU: one compile per shape; these tests check results, not speed."""
    monkeypatch.setenv("LOKITOOL_AUTOTUNE", "0")


# Output tolerances per input dtype (the kernels round softmax weights to the input dtype for P.V).
TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


# ----------------------------------------------------------------------------------------------
# Helpers


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """Fail listing the first mismatches (index, actual, expected), not just a boolean."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        where = bad.nonzero()[:8].tolist()
        lines = [f"  {tuple(i)}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}" for i in where]
        err = (actual - expected).abs().max().item()
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} mismatched (max abs err {err:.3g}, atol {atol}, rtol {rtol}):\n" + "\n".join(lines))


def make_cache(b, h, hkv, s, dim, dtype, seed=0):
    """q_rot, k_rot, v with PCA-like decaying per-dim scales (the first dims carry the most)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.3, dim)
    q = (torch.randn(b, h, dim, generator=g) * scale).to(dtype)
    k = (torch.randn(b, hkv, s, dim, generator=g) * scale).to(dtype)
    v = torch.randn(b, hkv, s, dim, generator=g).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def reference_scores(q, k, d, group):
    """Float64 scores [B, R, S] of the first d dims (the oracle's, summed per KV group for "kv")."""
    b, h, _ = q.shape
    hkv = k.shape[1]
    s = torch.einsum("bhd,bhsd->bhs", q[..., :d].double().cpu(), loki.expand_kv(k[..., :d].double().cpu(), h))
    return s.reshape(b, hkv, h // hkv, -1).sum(2) if group == "kv" else s


def stable_topk_mask(scores, lengths, budgets):
    """Exact top-k per row with ties broken towards lower token index (the kernels' rule)."""
    b, r, s = scores.shape
    valid = torch.arange(s)[None, :] < lengths.cpu()[:, None]
    order = torch.sort(scores.cpu().masked_fill(~valid[:, None], float("-inf")), dim=-1, descending=True, stable=True).indices
    rank_ok = torch.arange(s)[None, None, :] < budgets.cpu()[:, None, None]
    keep = torch.zeros(b, r, s, dtype=torch.bool)
    keep.scatter_(-1, order, rank_ok.expand(b, r, s))
    return keep & valid[:, None]


def check_recall(kept, ref_keep, scores64, budgets, what):
    """Recall of the oracle's kept set must be 1 up to near-ties: every disagreement must sit within
    rounding of the row's k-th largest float64 score."""
    kept, ref_keep = kept.cpu(), ref_keep.cpu()
    assert torch.equal(kept.sum(-1), budgets.cpu()[:, None].expand(kept.shape[:2])), f"{what}: rows keep exactly k"
    recall = (kept & ref_keep).sum() / ref_keep.sum()
    masked = scores64.masked_fill(~(ref_keep | kept), float("nan"))
    kth = torch.where(ref_keep, scores64, torch.tensor(float("inf"), dtype=scores64.dtype)).amin(-1, keepdim=True)
    differ = kept != ref_keep
    gap = (masked - kth).abs()[differ]
    scale = scores64.abs().amax(-1, keepdim=True).expand_as(scores64)[differ]
    assert bool((gap <= 1e-5 * scale + 1e-6).all()), f"{what}: recall {recall:.4f}, disagreements not near-ties: gaps {gap[:8].tolist()}"
    assert recall >= 0.99, f"{what}: recall {recall:.4f}"


# ----------------------------------------------------------------------------------------------
# Stage 1: scores


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


# ----------------------------------------------------------------------------------------------
# Stage 2: selection


def _scores_of(kind, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(shape, generator=g) * 3
    if kind == "one-binade":  # every key shares sign and exponent: forces the narrowing passes
        return 1.0 + torch.rand(shape, generator=g) * 0.9
    if kind == "few-values":  # heavy ties
        return torch.randint(-3, 4, shape, generator=g).float() * 0.25
    if kind == "all-equal":
        return torch.full(shape, -0.7)
    if kind == "signed-zeros":  # -0.0 and +0.0 compare equal
        return torch.where(torch.rand(shape, generator=g) < 0.5, torch.tensor(0.0), torch.tensor(-0.0))
    if kind == "infinities":  # sinks forced in (+inf), masked keys (-inf): no float midpoints
        x = torch.randn(shape, generator=g)
        x[..., :3] = float("inf")
        x[..., 5:9] = float("-inf")
        return x
    if kind == "extreme":  # float32's whole range, denormals included
        x = torch.randn(shape, generator=g).sign() * torch.exp2(torch.randint(-148, 127, shape, generator=g).float())
        return x * torch.rand(shape, generator=g).add(1.0)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "one-binade", "few-values", "all-equal", "signed-zeros", "infinities", "extreme"])
@pytest.mark.parametrize("block_cap", [128, 16384], ids=["tile128", "registers"])
@pytest.mark.parametrize("kf", [1e-4, 0.3, 1.0], ids=["k=1", "kf=.3", "k=length"])
def test_select_is_exact_topk(kind, block_cap, kf):
    s = 300
    lengths = torch.tensor([300, 1, 200, 129], dtype=torch.int32)
    scores = _scores_of(kind, (4, 2, s), seed=len(kind))
    budgets = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    idx = select_topk(scores.to(DEVICE), lengths.to(DEVICE), budgets.to(DEVICE), kmax=LokiSpec(kf=kf).max_budget(s), block_cap=block_cap)
    got = kept_mask(idx, budgets.to(DEVICE), s).cpu()
    want = stable_topk_mask(scores, lengths, budgets)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:8].tolist()
        pytest.fail(f"{(got != want).sum()} disagreements, first (b, r, s): {bad}; kept {got.sum(-1).tolist()} vs k {budgets.tolist()}")
    listed = idx.cpu().long()
    for b, k in enumerate(budgets.tolist()):  # ascending token order, exactly k
        assert bool((listed[b, :, 1:k] > listed[b, :, : k - 1]).all())


@pytest.mark.parametrize("kf", [1e-4, 0.1, 0.25, 0.29, 1 / 3, 0.7, 1.0])
def test_budgets_are_the_oracles(kf):
    """decode_budgets (float64 in a kernel, kf passed as its bit pattern) gives decode_budget's
    values exactly, on lengths where a float32 kf or an exact rational product would differ."""
    lengths = torch.tensor([1, 2, 3, 7, 10, 29, 100, 300, 1000, 4095, 4096, 65537, 1 << 20, 2**31 - 1], dtype=torch.int32)
    want = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    got = decode_budgets(lengths.to(DEVICE), kf).cpu()
    assert got.dtype == torch.int32 and torch.equal(got, want), (got - want).nonzero().flatten().tolist()


def test_second_call_launches_the_pinned_configs_with_the_same_result():
    """After the first call each autotuned kernel launches through its pinned config: same bits."""
    from lokitool.kernels import attention, score, select

    b, h, hkv, s, dim, kf = 2, 4, 2, 70, 32, 0.3
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=5)
    lengths = torch.tensor([70, 33], dtype=torch.int32, device=DEVICE)
    spec = LokiSpec(kf=kf, df=0.25)
    first = loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5)
    for pinned in (score._SCORE, select._SELECT, attention._ATTENTION):
        assert pinned.configs, pinned.kernel
    second = loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5)
    assert torch.equal(first, second)


@pytest.mark.parametrize("layout", ["plain", "split"])
def test_plans_are_replayed_only_for_calls_that_match(layout):
    """A second call with new data and the same shapes replays the first call's plan (on a GPU: its
    recorded launches) and gives what a fresh plan gives; other strides get a plan of their own."""
    import importlib

    plans = importlib.import_module("lokitool.kernels.loki_decode")._PLANS
    b, h, hkv, s, dim, kf = 2, 4, 2, 70, 32, 0.3
    spec = LokiSpec(kf=kf, df=0.25, group="kv")
    keys = (lambda k: split_keys(k, spec.dims(dim))) if layout == "split" else (lambda k: k)
    (q1, k1, v1), (q2, k2, v2) = make_cache(b, h, hkv, s, dim, torch.float16, seed=1), make_cache(b, h, hkv, s, dim, torch.float16, seed=2)
    lengths = torch.tensor([70, 33], dtype=torch.int32, device=DEVICE)
    run = lambda q, k, v: loki_decode(q, keys(k), v, lengths, spec=spec, scaling=dim**-0.5)  # noqa: E731
    clear_plans()
    run(q1, k1, v1)
    replayed = run(q2, k2, v2)
    assert len(plans) == 1
    clear_plans()
    assert torch.equal(replayed, run(q2, k2, v2))
    v_strided = v2.transpose(1, 2).contiguous().transpose(1, 2)  # same values and shape, other strides
    assert torch.equal(replayed, run(q2, k2, v_strided)) and len(plans) == 2
    clear_plans()


@pytest.mark.skipif(ON_GPU, reason="on a GPU the test above replays compiled kernels")
@pytest.mark.parametrize("layout", ["plain", "split"])
def test_replay_swaps_in_the_calls_tensors(layout, monkeypatch):
    """The interpreter compiles nothing to record, so record interpreted launches instead: a replay
    that put any of the call's tensors (or the plan's scratch) in the wrong slot would differ."""
    import importlib

    from lokitool.kernels import _common

    def record_interpreted(jit_fn, compiled, grid, args):
        if _common._recording is not None:
            grid = grid(args) if callable(grid) else grid
            runner = lambda *a, stream=None, grid=grid: jit_fn[grid](*a)  # noqa: E731
            _common._recording.launches.append((runner, [args[name] for name in jit_fn.arg_names]))

    monkeypatch.setattr(_common, "_record", record_interpreted)
    plans = importlib.import_module("lokitool.kernels.loki_decode")._PLANS
    b, h, hkv, s, dim = 2, 4, 2, 70, 32
    spec = LokiSpec(kf=0.3, df=0.25, group="head")
    keys = (lambda k: split_keys(k, spec.dims(dim))) if layout == "split" else (lambda k: k)
    (q1, k1, v1), (q2, k2, v2) = make_cache(b, h, hkv, s, dim, torch.float16, seed=1), make_cache(b, h, hkv, s, dim, torch.float16, seed=2)
    run = lambda q, k, v, lengths: loki_decode(q, keys(k), v, lengths, spec=spec, scaling=dim**-0.5)  # noqa: E731
    clear_plans()
    run(q1, k1, v1, torch.tensor([70, 33], dtype=torch.int32))
    (plan,) = plans.values()
    assert plan.replay is not None and len(plan.replay) == 6
    replayed = run(q2, k2, v2, torch.tensor([41, 70], dtype=torch.int32))
    clear_plans()
    fresh = run(q2, k2, v2, torch.tensor([41, 70], dtype=torch.int32))
    assert torch.equal(replayed, fresh)
    clear_plans()


@pytest.mark.parametrize("kind", ["random", "few-values", "infinities", "extreme"])
def test_select_longer_rows(kind):
    """Rows of a few thousand keys held in registers (2048-key tile), ragged, against exact top-k."""
    s, kf = 1500, 0.3
    lengths = torch.tensor([1500, 700, 257], dtype=torch.int32)
    scores = _scores_of(kind, (3, 2, s), seed=7)
    budgets = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    idx = select_topk(scores.to(DEVICE), lengths.to(DEVICE), budgets.to(DEVICE), kmax=LokiSpec(kf=kf).max_budget(s))
    got = kept_mask(idx, budgets.to(DEVICE), s).cpu()
    want = stable_topk_mask(scores, lengths, budgets)
    assert torch.equal(got, want), f"{(got != want).sum()} disagreements"


# ----------------------------------------------------------------------------------------------
# Stage 3: sparse attention with split-K merge


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


# ----------------------------------------------------------------------------------------------
# The whole decode step against the oracle


DECODE_CASES = [
    # b, h, hkv, s, dim, d, kf, lengths
    (2, 4, 4, 300, 64, 16, 0.25, [300, 173]),  # MHA
    (3, 8, 2, 257, 128, 32, 0.25, [257, 1, 100]),  # GQA 4, a length-1 sequence
    (2, 9, 3, 130, 64, 1, 0.3, [130, 64]),  # GQA 3 (smollm2 heads), d = 1
    (2, 4, 2, 96, 64, 64, 1.0, [96, 50]),  # d = D, k = length
    (2, 4, 1, 200, 32, 8, 0.001, [200, 199]),  # MQA, k = 1
]


def check_decode(b, h, hkv, s, dim, d, kf, lens, dtype, group, layout):
    q, k, v = make_cache(b, h, hkv, s, dim, dtype, seed=s + d)
    keys = split_keys(k, d) if layout == "split" else k
    lengths = torch.tensor(lens, dtype=torch.int32)
    scaling = dim**-0.5
    spec = LokiSpec(kf=kf, df=d / dim, group=group)
    got = loki_decode(q, keys, v, lengths.to(DEVICE), spec=spec, scaling=scaling)
    assert got.shape == (b, h, dim) and got.dtype == torch.float32 and bool(got.isfinite().all())

    # the kept sets: recomputed from the kernel stages, compared with the oracle's
    budgets = loki.decode_budget(lengths.long(), kf)
    idx = select_topk(loki_scores(q, keys, lengths.to(DEVICE), d=d, group=group), lengths.to(DEVICE),
                      budgets.to(DEVICE), kmax=spec.max_budget(s))
    kept = kept_mask(idx, budgets.to(DEVICE), s).cpu()
    scores64 = reference_scores(q, k, d, group)
    if group == "kv":
        kept, scores64 = kept.repeat_interleave(h // hkv, 1), scores64.repeat_interleave(h // hkv, 1)
    ref_keep = loki.decode_select(q.cpu(), k.cpu(), lengths.long(), spec=spec)
    check_recall(kept, ref_keep, scores64, budgets, what="kept set")

    # exact attention over the kernel's own kept set, and the oracle end to end
    over_kept = loki.attend(q.cpu()[:, :, None], k.cpu(), v.cpu(), kept[:, :, None], scaling)[:, :, 0]
    assert_close(got, over_kept, **TOL[dtype], what="attention over the kept set")
    if torch.equal(kept, ref_keep):
        oracle = loki.decode_attention(q.cpu(), k.cpu(), v.cpu(), lengths.long(), spec=spec, scaling=scaling)
        assert_close(got, oracle, **TOL[dtype], what="loki_decode vs loki.decode_attention")


@pytest.mark.parametrize("group", ["head", "kv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,hkv,s,dim,d,kf,lens", DECODE_CASES)
def test_loki_decode_matches_oracle(b, h, hkv, s, dim, d, kf, lens, dtype, group):
    check_decode(b, h, hkv, s, dim, d, kf, lens, dtype, group, layout="plain")


@pytest.mark.parametrize("group", ["head", "kv"])
@pytest.mark.parametrize("b,h,hkv,s,dim,d,kf,lens", [DECODE_CASES[i] for i in (0, 1, 2, 3)])
def test_loki_decode_two_plane_layout(b, h, hkv, s, dim, d, kf, lens, group):
    """Keys split after dim d (LokiKeys: the Loki layout), d = D included (an empty high plane)."""
    check_decode(b, h, hkv, s, dim, d, kf, lens, torch.float16, group, layout="split")


def test_split_keys_round_trip():
    _, k, _ = make_cache(2, 2, 2, 10, 64, torch.float16)
    keys = split_keys(k, 24)
    assert isinstance(keys, LokiKeys) and keys.low.shape[-1] == 24 and keys.high.shape[-1] == 40
    assert keys.low.is_contiguous() and keys.shape == k.shape and torch.equal(joined(keys), k)


def test_tied_scores_keep_exactly_k_lowest_index_first():
    """Keys whose first d dims repeat give exactly tied scores; each row still keeps exactly k."""
    b, h, hkv, s, dim, d, kf = 2, 4, 2, 90, 32, 4, 0.3
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=3)
    k[:, :, :, :d] = k[:, :, :5, :d].repeat(1, 1, s // 5, 1)  # 5 distinct prefixes, 18 copies each
    lengths = torch.tensor([90, 61], dtype=torch.int32)
    budgets = loki.decode_budget(lengths.long(), kf)
    scores = loki_scores(q, k, lengths.to(DEVICE), d=d, group="head")
    idx = select_topk(scores, lengths.to(DEVICE), budgets.to(DEVICE), kmax=LokiSpec(kf=kf).max_budget(s))
    got = kept_mask(idx, budgets.to(DEVICE), s).cpu()
    assert torch.equal(got, stable_topk_mask(scores.cpu(), lengths, budgets))
    out = loki_decode(q, k, v, lengths.to(DEVICE), spec=LokiSpec(kf=kf, df=d / dim), scaling=dim**-0.5)
    want = loki.attend(q.cpu()[:, :, None], k.cpu(), v.cpu(), got[:, :, None], dim**-0.5)[:, :, 0]
    assert_close(out, want, **TOL[torch.float16], what="attention with ties")


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(d=0), "d=0"),
        (dict(d=65), "d=65"),
        (dict(lengths=torch.tensor([0, 5])), "lengths"),
        (dict(lengths=torch.tensor([5, 41])), "lengths"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(split=8), "larger than the scored plane"),
    ],
)
def test_bad_inputs_are_refused(change, message):
    change = dict(change)
    q, k, v = make_cache(2, 4, 2, 40, 64, change.pop("dtype", torch.float16))
    if "split" in change:
        k = split_keys(k, change.pop("split"))
    args = dict(d=16, lengths=torch.tensor([40, 3]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        check_inputs(q, k, v, args.pop("lengths"), **args)
