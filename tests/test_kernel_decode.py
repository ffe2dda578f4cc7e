"""kernels/loki_decode.py: the whole decode step against the oracle, its layouts, pinned configs and plans, bad input."""

from __future__ import annotations

import pytest
import torch
from kernel_support import (
    DEVICE,
    ON_GPU,
    TOL,
    LokiKeys,
    LokiSpec,
    _one_config_per_kernel,  # noqa: F401  (autouse; importing kernel_support switches on the interpreter first)
    assert_close,
    check_inputs,
    check_recall,
    clear_plans,
    joined,
    kept_mask,
    loki,
    loki_decode,
    loki_scores,
    make_cache,
    reference_scores,
    select_topk,
    split_keys,
    stable_topk_mask,
)


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


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU; the interpreter records no launches to capture")
def test_a_cache_brought_again_replays_a_call_graph_that_reads_it_as_it_is(monkeypatch):
    """From the second call that brings the same cache tensors, loki_decode replays a CUDA graph of its
    launches (kernels/loki_decode.py _CallGraph): the same bits as the launch-by-launch replay
    (LOKITOOL_CALL_GRAPHS=0); the graph reads the cache and the lengths as they are at each call (their
    addresses are fixed, not their contents); an output stays the caller's after later calls; and a caller
    capturing a graph of its own captures the launches (the captured step gives the same output)."""
    import importlib

    mod = importlib.import_module("lokitool.kernels.loki_decode")
    b, h, hkv, s, dim = 2, 4, 2, 300, 64
    spec = LokiSpec(kf=0.25, df=0.25, group="kv")
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=11)
    k = split_keys(k, spec.dims(dim))
    lengths = torch.tensor([300, 120], dtype=torch.int32, device=DEVICE)
    call = lambda q: loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5)  # noqa: E731
    clear_plans()
    outs = [call(q) for _ in range(3)]  # the plan; the cache's first sight; the graph captured and replayed
    (plan,) = mod._PLANS.values()
    assert [g is not None for g in plan.calls.values()] == [True]
    assert all(torch.equal(o, outs[0]) for o in outs)
    q2 = torch.randn_like(q)
    kept = outs[2].clone()
    graphed = call(q2)
    assert torch.equal(outs[2], kept) and not torch.equal(graphed, kept)
    monkeypatch.setenv("LOKITOOL_CALL_GRAPHS", "0")
    assert torch.equal(graphed, call(q2))
    v.mul_(-1.5)  # new contents at the same addresses
    lengths[1] = 77
    plain = call(q2)
    monkeypatch.delenv("LOKITOOL_CALL_GRAPHS")
    assert not torch.equal(plain, graphed) and torch.equal(call(q2), plain)

    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        captured = call(q2)
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, plain)
    clear_plans()


def test_call_graph_switch_is_validated(monkeypatch):
    import importlib

    mod = importlib.import_module("lokitool.kernels.loki_decode")
    assert mod.call_graphs()
    monkeypatch.setenv("LOKITOOL_CALL_GRAPHS", "0")
    assert not mod.call_graphs()
    monkeypatch.setenv("LOKITOOL_CALL_GRAPHS", "yes")
    with pytest.raises(ValueError, match="LOKITOOL_CALL_GRAPHS"):
        mod.call_graphs()


def test_output_in_the_cache_dtype_is_the_float32_output_rounded_once():
    """out_dtype=float16 (the static loop's: no cast after the call) gives the float32 output rounded
    to float16, bit for bit, through a plan of its own; replays of both plans agree again."""
    import importlib

    plans = importlib.import_module("lokitool.kernels.loki_decode")._PLANS
    b, h, hkv, s, dim = 2, 4, 2, 70, 32
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=4)
    lengths = torch.tensor([70, 41], dtype=torch.int32, device=DEVICE)
    spec = LokiSpec(kf=0.3, df=0.25, group="kv")
    clear_plans()
    wide = loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5)
    half = loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5, out_dtype=torch.float16)
    assert wide.dtype == torch.float32 and half.dtype == torch.float16 and len(plans) == 2
    assert torch.equal(half, wide.half())
    assert torch.equal(loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5, out_dtype=torch.float16), half)
    with pytest.raises(ValueError, match="out_dtype"):
        loki_decode(q, k, v, lengths, spec=spec, scaling=dim**-0.5, out_dtype=torch.int32)
    clear_plans()


@pytest.mark.skipif(ON_GPU, reason="on a GPU the test above replays compiled kernels")
@pytest.mark.parametrize(
    "layout,select_mode,group,launches",
    # score (+ budgets), selection (row: 2 launches; split: 4 radix passes and a write), attention (merged by its
    # last piece per row; by the merge kernel where a row serves several query heads: group kv)
    [("plain", "row", "head", 4), ("split", "row", "head", 4), ("split", "split", "head", 7), ("split", "split", "kv", 8),
     ("split", "row", "kv", 5)],
)
def test_replay_swaps_in_the_calls_tensors(layout, select_mode, group, launches, monkeypatch):
    """The interpreter compiles nothing to record, so record interpreted launches instead: a replay
    that put any of the call's tensors (or the plan's scratch) in the wrong slot would differ."""
    import importlib

    from lokitool.kernels import _common

    def record_interpreted(jit_fn, compiled, grid, args):
        if _common._recording is not None:
            _common._recording.addresses = False  # the interpreter needs the tensors themselves
            grid = grid(args) if callable(grid) else grid
            runner = lambda *a, stream=None, grid=grid: jit_fn[grid](*a)  # noqa: E731
            _common._recording.launches.append((runner, [args[name] for name in jit_fn.arg_names]))

    monkeypatch.setattr(_common, "_record", record_interpreted)
    monkeypatch.setenv("LOKITOOL_SELECT", select_mode)
    plans = importlib.import_module("lokitool.kernels.loki_decode")._PLANS
    b, h, hkv, s, dim = 2, 4, 2, 70, 32
    spec = LokiSpec(kf=0.3, df=0.25, group=group)
    keys = (lambda k: split_keys(k, spec.dims(dim))) if layout == "split" else (lambda k: k)
    (q1, k1, v1), (q2, k2, v2) = make_cache(b, h, hkv, s, dim, torch.float16, seed=1), make_cache(b, h, hkv, s, dim, torch.float16, seed=2)
    run = lambda q, k, v, lengths: loki_decode(q, keys(k), v, lengths, spec=spec, scaling=dim**-0.5)  # noqa: E731
    clear_plans()
    run(q1, k1, v1, torch.tensor([70, 33], dtype=torch.int32))
    (plan,) = plans.values()
    assert plan.replay is not None and len(plan.replay) == launches
    replayed = run(q2, k2, v2, torch.tensor([41, 70], dtype=torch.int32))
    clear_plans()
    fresh = run(q2, k2, v2, torch.tensor([41, 70], dtype=torch.int32))
    assert torch.equal(replayed, fresh)
    clear_plans()



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


@pytest.mark.parametrize("group", ["head", "kv"])
@pytest.mark.parametrize("b,h,hkv,s,dim,d,kf,lens", [DECODE_CASES[i] for i in (0, 1, 4)])
def test_loki_decode_split_selection(b, h, hkv, s, dim, d, kf, lens, group, monkeypatch):
    """The split selection (a row over several programs, as at batch 1 on a GPU) end to end."""
    monkeypatch.setenv("LOKITOOL_SELECT", "split")
    clear_plans()
    check_decode(b, h, hkv, s, dim, d, kf, lens, torch.float16, group, layout="split")
    clear_plans()


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
