"""kernels/loki_step.py: the whole decode step in one kernel against the oracle and against exact top-k of
its own scores, phase by phase (CPU interpreter and GPU) and in one launch (GPU)."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_support import (
    DEVICE,
    ON_GPU,
    TOL,
    LokiSpec,
    _one_config_per_kernel,  # noqa: F401  (autouse; importing kernel_support switches on the interpreter first)
    assert_close,
    clear_plans,
    kept_mask,
    loki,
    loki_decode,
    make_cache,
    reference_scores,
    split_keys,
    stable_topk_mask,
)

step = importlib.import_module("lokitool.kernels.loki_step")


def _run(q, k, v, lengths, spec, *, layout="split", chunk=None, one_launch=False):
    b, h, dim = q.shape
    hkv, s = k.shape[1], k.shape[2]
    rows, qps = (h, 1) if spec.group == "head" else (hkv, h // hkv)
    plan = step.StepPlan(b, rows, qps, s, dim, DEVICE, chunk=chunk, one_launch=one_launch)
    d = spec.dims(dim)
    keys = split_keys(k, d) if layout == "split" else k
    out = step.step_decode(q, keys, v, lengths, kf=spec.kf, d=d, scaling=dim**-0.5, group=spec.group, plan=plan)
    return out, plan


def _assert_selection_exact(plan, lengths, kf):
    """The kept lists the kernel wrote are exactly the stable top-k of the scores it computed (its scratch)."""
    budgets = loki.decode_budget(lengths.long().cpu(), kf).to(torch.int32)
    s = plan.s
    got = kept_mask(plan.idx.cpu(), budgets, s)
    want = stable_topk_mask(plan.scores.cpu(), lengths.cpu(), budgets)
    bad = (got != want).any(-1).nonzero().tolist()
    assert not bad, f"rows whose kept set is not the stable top-k of their scores: {bad[:8]}"


def _assert_scratch_zero(plan):
    assert int(plan.hist.abs().sum()) == 0 and int(plan.sync.abs().sum()) == 0, "histograms and counters left nonzero"


@pytest.mark.parametrize(
    "group,layout,dtype,kf,chunk",
    [
        ("kv", "split", torch.float16, 0.25, 64),
        ("kv", "plain", torch.bfloat16, 0.25, 32),
        ("head", "split", torch.float16, 0.3, 64),
        ("kv", "split", torch.float16, 1.0, 128),  # every token kept
        ("head", "split", torch.bfloat16, 0.001, 32),  # one token a row
    ],
)
def test_step_matches_the_oracle_and_selects_exactly(group, layout, dtype, kf, chunk):
    """Ragged lengths (one row shorter than a chunk), GQA, rows over several chunks: the output is the
    oracle's; the kept lists are exactly the stable top-k of the kernel's scores, which are the oracle's
    scores; the scratch is zero again after the call, and a second call gives the same bits."""
    b, h, hkv, s, dim = 3, 4, 2, 300, 64
    q, k, v = make_cache(b, h, hkv, s, dim, dtype, seed=7)
    lengths = torch.tensor([300, 129, 20], dtype=torch.int32, device=DEVICE)
    spec = LokiSpec(kf=kf, df=0.25, group=group)
    out, plan = _run(q, k, v, lengths, spec, layout=layout, chunk=chunk)
    assert plan.nch >= 3 and not plan.one_launch
    want = loki.decode_attention(q, k, v, lengths, spec=spec, scaling=dim**-0.5)
    assert_close(out, want, **TOL[dtype], what=f"step vs oracle ({group}, {layout})")
    _assert_selection_exact(plan, lengths, kf)
    scores64 = reference_scores(q, k, spec.dims(dim), group)
    valid = torch.arange(s)[None, None, :] < lengths.cpu()[:, None, None]
    err = (plan.scores.cpu().double() - scores64).abs()[valid.expand_as(scores64)].max().item()
    assert err <= 1e-3 * scores64.abs().max().item(), f"scores off by {err}"
    _assert_scratch_zero(plan)
    again = step.step_decode(q, split_keys(k, spec.dims(dim)) if layout == "split" else k, v, lengths, kf=kf, d=spec.dims(dim),
                             scaling=dim**-0.5, group=group, plan=plan)
    assert torch.equal(again, out)


def test_step_keeps_ties_in_token_order():
    """Integer-valued queries and keys tie many scores exactly at the threshold: the kernel keeps every
    token above it and the earliest tied ones, as the stable top-k does; the output is attention over that
    set (the oracle's torch.topk would break such ties arbitrarily)."""
    b, h, hkv, s, dim, kf = 2, 4, 2, 257, 32, 0.25
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (b, h, dim), generator=g).half().to(DEVICE)
    k = torch.randint(-1, 2, (b, hkv, s, dim), generator=g).half().to(DEVICE)
    v = torch.randn(b, hkv, s, dim, generator=g).half().to(DEVICE)
    lengths = torch.tensor([257, 200], dtype=torch.int32, device=DEVICE)
    spec = LokiSpec(kf=kf, df=0.25, group="kv")
    out, plan = _run(q, k, v, lengths, spec, chunk=32)
    _assert_selection_exact(plan, lengths, kf)
    scores = reference_scores(q, k, spec.dims(dim), "kv")
    budgets = loki.decode_budget(lengths.long().cpu(), kf)
    keep = stable_topk_mask(scores, lengths.cpu(), budgets)
    ties = (scores == scores.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)).sum(-1)
    assert int(ties.max()) > 2, "the data should tie at the threshold"
    top = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., : int(budgets.max())]
    want = loki.decode_gather_attention(q.cpu(), k.cpu(), v.cpu(), top, budgets, scaling=dim**-0.5, group="kv")
    assert_close(out, want, **TOL[torch.float16], what="step vs attention over the stable top-k")
    _assert_scratch_zero(plan)


def test_loki_decode_takes_the_step_where_told(monkeypatch):
    """LOKITOOL_FUSED_STEP=1 sends loki_decode through the step (the same bits as calling it), 0 through the
    three stages (the same result within rounding); unset, the CPU takes the stages; other values are refused."""
    mod = importlib.import_module("lokitool.kernels.loki_decode")
    b, h, hkv, s, dim = 2, 4, 2, 150, 32
    q, k, v = make_cache(b, h, hkv, s, dim, torch.float16, seed=2)
    lengths = torch.tensor([150, 61], dtype=torch.int32, device=DEVICE)
    spec = LokiSpec(kf=0.25, df=0.25, group="kv")
    keys = split_keys(k, spec.dims(dim))
    call = lambda: loki_decode(q, keys, v, lengths, spec=spec, scaling=dim**-0.5)  # noqa: E731
    results = {}
    for setting in ("1", "0", None):
        clear_plans()
        if setting is None:
            monkeypatch.delenv("LOKITOOL_FUSED_STEP", raising=False)
        else:
            monkeypatch.setenv("LOKITOOL_FUSED_STEP", setting)
        results[setting] = call()
        (plan,) = mod._PLANS.values()
        assert (plan.step is not None) == (setting == "1" or (setting is None and ON_GPU and step.takes_step(b * hkv, s, DEVICE)))
    direct, _ = _run(q, k, v, lengths, spec, one_launch=None)
    assert torch.equal(results["1"], direct)
    assert_close(results["1"], results["0"], **TOL[torch.float16], what="step vs three stages")
    monkeypatch.setenv("LOKITOOL_FUSED_STEP", "yes")
    with pytest.raises(ValueError, match="LOKITOOL_FUSED_STEP"):
        step.takes_step(b * hkv, s, DEVICE)
    clear_plans()


@pytest.mark.skipif(not ON_GPU, reason="programs meet at barriers: GPU only")
@pytest.mark.parametrize("shape", [(32, 8, 32768, "kv"), (32, 8, 131072, "kv"), (40, 40, 16384, "head")], ids=["kv-32k", "kv-128k", "head-16k"])
def test_step_in_one_launch_at_batch_1_in_a_cuda_graph(shape, monkeypatch):
    """Batch-1 shapes (llama3-8b group kv, llama2-13b) in one launch, captured in a CUDA graph and replayed
    over new queries and lengths: each replay selects exactly the stable top-k of its scores, matches the
    three-stage loki_decode, and leaves the scratch zero."""
    h, hkv, s, group = shape
    dim, kf = 128, 0.25
    spec = LokiSpec(kf=kf, df=0.25, group=group)
    q, k, v = make_cache(1, h, hkv, s, dim, torch.float16, seed=s)
    keys = split_keys(k, spec.dims(dim))
    lengths = torch.full((1,), s, dtype=torch.int32, device=DEVICE)
    rows, qps = (h, 1) if group == "head" else (hkv, h // hkv)
    plan = step.StepPlan(1, rows, qps, s, dim, DEVICE)
    assert plan.one_launch
    q_in = q.clone()
    run = lambda: step.step_decode(q_in, keys, v, lengths, kf=kf, d=spec.dims(dim), scaling=dim**-0.5, group=group, plan=plan)  # noqa: E731
    run()  # compiles, checks residency
    assert plan.one_launch, "the compiled kernel does not fit two programs a multiprocessor"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    monkeypatch.setenv("LOKITOOL_FUSED_STEP", "0")
    g = torch.Generator().manual_seed(1)
    for n in (s, int(s * 0.6) + 3, s // 3):
        q_in.copy_(torch.randn(q.shape, generator=g).to(DEVICE, torch.float16) * 2)
        lengths.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        _assert_selection_exact(plan, lengths, kf)
        _assert_scratch_zero(plan)
        clear_plans()
        want = loki_decode(q_in, keys, v, lengths, spec=spec, scaling=dim**-0.5)
        assert_close(out, want, **TOL[torch.float16], what=f"one launch vs three stages at n={n}")


@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() < (9, 0), reason="the one launch runs on Hopper and later")
def test_batch_1_gqa_takes_the_step_up_to_chunks_of_2048(monkeypatch):
    """loki_decode's path (decode_path) on a card of 132 multiprocessors or so: 8 rows (llama3-8b group kv,
    batch 1) of 16k-64k tokens take the step (chunks of 1024-2048 tokens), 128k (chunks of 4096) and 40 rows
    (llama2-13b) the three stages, as measured (loki_step.takes_step)."""
    from lokitool.kernels import decode_path

    monkeypatch.delenv("LOKITOOL_FUSED_STEP", raising=False)
    monkeypatch.delenv("LOKITOOL_SPLIT_PER_SM", raising=False)
    if not 100 <= torch.cuda.get_device_properties(DEVICE).multi_processor_count <= 160:
        pytest.skip("chunk sizes follow the multiprocessor count")
    assert [decode_path(8, s, DEVICE) for s in (16384, 32768, 65536)] == ["step"] * 3
    assert decode_path(8, 131072, DEVICE) == "split" and decode_path(40, 32768, DEVICE) == "row"
    monkeypatch.setenv("LOKITOOL_SPLIT_ONE_LAUNCH", "0")  # the one launch's gates hold for the step too
    assert decode_path(8, 32768, DEVICE) != "step" and not step.StepPlan(1, 8, 4, 32768, 128, DEVICE).one_launch
