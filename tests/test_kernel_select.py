"""kernels/select.py: exact top-k selection per row (ties, infinities, long rows) and the budgets kernel."""

from __future__ import annotations

import pytest
import torch
from kernel_support import (
    DEVICE,
    ON_GPU,
    LokiSpec,
    _one_config_per_kernel,  # noqa: F401  (autouse; importing kernel_support switches on the interpreter first)
    decode_budgets,
    kept_mask,
    loki,
    select_topk,
    stable_topk_mask,
)


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


def assert_exact_topk(idx: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, budgets: torch.Tensor) -> None:
    """The kernel's index lists keep exactly the stable top-k set of each row, in ascending token order."""
    got = kept_mask(idx, budgets.to(DEVICE), scores.shape[-1]).cpu()
    want = stable_topk_mask(scores, lengths, budgets)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:8].tolist()
        pytest.fail(f"{(got != want).sum()} disagreements, first (b, r, s): {bad}; kept {got.sum(-1).tolist()} vs k {budgets.tolist()}")
    listed = idx.cpu().long()
    for b, k in enumerate(budgets.tolist()):  # ascending token order, exactly k
        assert bool((listed[b, :, 1:k] > listed[b, :, : k - 1]).all())


@pytest.mark.parametrize("kind", ["random", "one-binade", "few-values", "all-equal", "signed-zeros", "infinities", "extreme"])
@pytest.mark.parametrize("block_cap", [128, 16384], ids=["tile128", "registers"])
@pytest.mark.parametrize("kf", [1e-4, 0.3, 1.0], ids=["k=1", "kf=.3", "k=length"])
def test_select_is_exact_topk(kind, block_cap, kf):
    s = 300
    lengths = torch.tensor([300, 1, 200, 129], dtype=torch.int32)
    scores = _scores_of(kind, (4, 2, s), seed=len(kind))
    budgets = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    idx = select_topk(scores.to(DEVICE), lengths.to(DEVICE), budgets.to(DEVICE), kmax=LokiSpec(kf=kf).max_budget(s), block_cap=block_cap)
    assert_exact_topk(idx, scores, lengths, budgets)


@pytest.mark.parametrize("kf", [1e-4, 0.1, 0.25, 0.29, 1 / 3, 0.7, 1.0])
def test_budgets_are_the_oracles(kf):
    """decode_budgets (float64 in a kernel, kf passed as its bit pattern) gives decode_budget's
    values exactly, on lengths where a float32 kf or an exact rational product would differ."""
    lengths = torch.tensor([1, 2, 3, 7, 10, 29, 100, 300, 1000, 4095, 4096, 65537, 1 << 20, 2**31 - 1], dtype=torch.int32)
    want = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    got = decode_budgets(lengths.to(DEVICE), kf).cpu()
    assert got.dtype == torch.int32 and torch.equal(got, want), (got - want).nonzero().flatten().tolist()



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




ONE_LAUNCH = [False, pytest.param(True, marks=pytest.mark.skipif(not ON_GPU, reason="programs meet at barriers: GPU only"))]


@pytest.mark.parametrize("kind", ["random", "one-binade", "few-values", "all-equal", "signed-zeros", "infinities", "extreme"])
@pytest.mark.parametrize("kf", [1e-4, 0.3, 1.0], ids=["k=1", "kf=.3", "k=length"])
@pytest.mark.parametrize("one_launch", ONE_LAUNCH, ids=["phases", "one-launch"])
def test_split_selection_is_exact_topk(kind, kf, one_launch):
    """Split mode (rows over chunks of 64 tokens: up to 5 programs a row, ragged lengths ending mid-chunk,
    on a chunk boundary and inside the first chunk) against exact top-k, launched phase by phase and (on
    the GPU) in one launch whose programs meet at per-row barriers."""
    from lokitool.kernels import select

    s = 300
    lengths = torch.tensor([300, 1, 256, 129], dtype=torch.int32)
    scores = _scores_of(kind, (4, 2, s), seed=len(kind) + 1)
    budgets = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    plan = select.SelectPlan(4, 2, s, DEVICE, mode="split", chunk=64, one_launch=one_launch)
    assert plan.one_launch == one_launch
    idx = torch.empty(4, 2, LokiSpec(kf=kf).max_budget(s), dtype=torch.int32, device=DEVICE)
    select._launch(scores=scores.to(DEVICE), lengths=lengths.to(DEVICE), budgets=budgets.to(DEVICE), idx=idx, plan=plan)
    assert_exact_topk(idx, scores, lengths, budgets)


@pytest.mark.parametrize("kind", ["random", "one-binade", "few-values", "all-equal", "signed-zeros", "infinities", "extreme"])
@pytest.mark.parametrize("kf,cap", [(1e-4, 512), (0.3, 512), (1.0, 512), (0.3, 16)], ids=["k=1", "kf=.3", "k=length", "kf=.3-overflows"])
def test_pivot_selection_is_exact_topk(kind, kf, cap):
    """Pivot mode (select_pivot.py; chunks of 64 tokens, ragged lengths as above, a 256-key sample) against
    exact top-k: with room for every candidate, and with 16 slots, where most rows overflow and take the
    whole-row fallback. One plan over all kinds, as loki_decode reuses it."""
    from lokitool.kernels import select

    s = 300
    lengths = torch.tensor([300, 1, 256, 129], dtype=torch.int32)
    scores = _scores_of(kind, (4, 2, s), seed=len(kind) + 2)
    budgets = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    plan = select.SelectPlan(4, 2, s, DEVICE, mode="pivot", chunk=64, cap=cap, sample=256)
    idx = torch.empty(4, 2, LokiSpec(kf=kf).max_budget(s), dtype=torch.int32, device=DEVICE)
    select._launch(scores=scores.to(DEVICE), lengths=lengths.to(DEVICE), budgets=budgets.to(DEVICE), idx=idx, plan=plan)
    assert_exact_topk(idx, scores, lengths, budgets)


def test_split_one_launch_is_chosen_where_programs_fit_and_refused_elsewhere(monkeypatch):
    """One launch only where every program of the grid can be resident (at most PER_SM per multiprocessor,
    registers capped to fit; the chunk grows to fit, up to select_radix.MAX_CHUNK keys); the interpreter
    (programs one at a time) and grids too large launch phase by phase, and a forced one launch there is
    refused in one line, as are a bad LOKITOOL_SPLIT_ONE_LAUNCH and LOKITOOL_SPLIT_PER_SM."""
    from lokitool.kernels import select, select_radix

    monkeypatch.delenv("LOKITOOL_SPLIT_ONE_LAUNCH", raising=False)
    assert select_radix.programs_per_sm() == select_radix.PER_SM == 2
    assert select_radix.one_launch_chunk(8, 32768, 132, per_sm=1) == 2048  # batch 1, group kv: 16 programs a row
    assert select_radix.one_launch_chunk(8, 32768, 132, per_sm=2) == 1024  # 256 programs, two a multiprocessor
    assert select_radix.one_launch_chunk(8, 65536, 132, per_sm=2) == 2048
    assert select_radix.one_launch_chunk(8, 131072, 132, per_sm=1) == 8192
    assert select_radix.one_launch_chunk(8, 131072, 132, per_sm=2) == 4096
    assert select_radix.one_launch_chunk(1, 300, 132) == 512  # a short row: one program
    assert select_radix.one_launch_chunk(40, 32768, 132, per_sm=1) is None  # 16384 keys a program: slower than phases
    assert select_radix.one_launch_chunk(40, 32768, 132, per_sm=2) == 8192
    assert select_radix.one_launch_chunk(40, 131072, 132) is None  # 32768 keys a program: phases
    assert select_radix.one_launch_chunk(640, 262144, 132) is None  # more rows than programs fit: phases (this searched for ever)
    assert select_radix.one_launch_registers(select_radix.split_warps(4096), per_sm=2) == 128  # 8 warps, two programs: 65536 registers
    assert select_radix.one_launch_registers(select_radix.split_warps(8192), per_sm=2) == 64
    assert select_radix.one_launch_registers(select_radix.split_warps(1024), per_sm=1) == 255  # Triton's ceiling
    monkeypatch.setenv("LOKITOOL_SPLIT_PER_SM", "4")
    assert select_radix.one_launch_chunk(40, 32768, 132) == 4096
    monkeypatch.setenv("LOKITOOL_SPLIT_PER_SM", "3")
    with pytest.raises(ValueError, match="LOKITOOL_SPLIT_PER_SM"):
        select_radix.one_launch_chunk(40, 32768, 132)
    monkeypatch.delenv("LOKITOOL_SPLIT_PER_SM")
    assert select_radix.phases(True) == [(0, 4)] and select_radix.phases(False) == [(p, p) for p in range(5)]
    if not ON_GPU:
        assert select.split_one_launch(8, 32768, DEVICE, None, None) == (False, None)
        with pytest.raises(ValueError, match="one launch here: the interpreter"):
            select.SelectPlan(1, 8, 32768, DEVICE, mode="split", one_launch=True)
        monkeypatch.setenv("LOKITOOL_SPLIT_ONE_LAUNCH", "1")
        with pytest.raises(ValueError, match="one launch here"):
            select.SelectPlan(1, 8, 32768, DEVICE, mode="split")
    else:
        assert select.split_one_launch(8, 32768, DEVICE, None, None)[0] == (2 * select.multiprocessors(DEVICE) >= 128)
        with pytest.raises(ValueError, match="need more programs"):
            select.SelectPlan(1, 400, 32768, DEVICE, mode="split", chunk=1024, one_launch=True)
    monkeypatch.setenv("LOKITOOL_SPLIT_ONE_LAUNCH", "0")
    assert select.split_one_launch(8, 32768, DEVICE, None, None) == (False, None)
    monkeypatch.setenv("LOKITOOL_SPLIT_ONE_LAUNCH", "yes")
    with pytest.raises(ValueError, match="LOKITOOL_SPLIT_ONE_LAUNCH='yes' must be 0 or 1"):
        select.SelectPlan(1, 8, 32768, DEVICE, mode="split")


def test_pivot_bracket_holds_the_threshold():
    """On smooth scores the sampled bracket holds the k-th key and the candidates fit, so the pivot mode's
    fast path (not its whole-row fallback) made the result: few candidates, threshold inside [lo, hi]."""
    from lokitool.kernels import select, select_pivot

    b, rows, s, kf = 2, 3, 2048, 0.25
    lengths = torch.tensor([2048, 1500], dtype=torch.int32, device=DEVICE)
    budgets = loki.decode_budget(lengths.long().cpu(), kf).to(torch.int32).to(DEVICE)
    scores = _scores_of("random", (b, rows, s), seed=11)
    plan = select.SelectPlan(b, rows, s, DEVICE, mode="pivot", chunk=256, sample=512)
    idx = torch.empty(b, rows, LokiSpec(kf=kf).max_budget(s), dtype=torch.int32, device=DEVICE)
    select._launch(scores=scores.to(DEVICE), lengths=lengths, budgets=budgets, idx=idx, plan=plan)
    assert_exact_topk(idx, scores, lengths.cpu(), budgets.cpu())
    state = plan.ws["state"].view(b * rows, select_pivot.STATE.value).cpu()
    lo, hi, count, thr = state[:, 0], state[:, 1], state[:, 2], state[:, 3]
    assert bool(((lo <= thr) & (thr <= hi)).all()), state[:, :4].tolist()
    assert bool((count <= plan.cap).all()) and bool((count < lengths.cpu().repeat_interleave(rows) // 4).all()), count.tolist()


def test_pivot_sample_size_keeps_candidates_within_their_slots():
    """The sample is the cheapest whose candidates stay OVERFLOW_SD deviations under the slots, by the
    model sample_size uses; the model's mean and deviation of the candidate count agree with a simulation of
    the sample and bracket (normal scores, 300 rows), and a plan takes the size for its budget share."""
    import math

    from lokitool.kernels import select, select_pivot

    assert [select_pivot.sample_size(65536, kf) for kf in (0.25, 0.5, None)] == [1024, 1024, 1024]
    assert [select_pivot.sample_size(131072, kf) for kf in (0.125, 0.25, 0.5, 0.75, None)] == [2048, 2048, 4096, 4096, 4096]
    assert select.SelectPlan(1, 2, 131072, DEVICE, mode="pivot", kf=0.25).sample == 2048
    assert select.SelectPlan(1, 2, 131072, DEVICE, mode="pivot").sample == 4096  # budget unknown: the widest
    n, m, p, rows = 16384, 1024, 0.25, 300  # a sample order statistic alone would deviate 1.2x more
    k = int(p * n)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, n, generator=g)
    ranked = x[:, torch.arange(m) * n // m].sort(dim=1).values
    margin = select_pivot.MARGIN * math.sqrt(m * p * (1 - p)) + 8
    hi = ranked[:, m - math.ceil(k / n * m - margin)]
    lo = ranked[:, m - math.floor(k / n * m + margin)]
    count = ((x >= lo[:, None]) & (x <= hi[:, None])).sum(dim=1).double()
    share = select_pivot.bracket_share(m, p)
    assert abs(count.mean().item() / (share * n) - 1) < 0.03, (count.mean().item(), share * n)
    assert abs(count.std().item() / (math.sqrt(share * (1 - share) / m) * n) - 1) < 0.15, count.std().item()


@pytest.mark.parametrize("one_launch", ONE_LAUNCH, ids=["phases", "one-launch"])
def test_split_selection_reuses_its_scratch(one_launch):
    """One SelectPlan over several calls (as loki_decode's plans run it): the radix histograms and the
    rows' counters must come back to zero after each call, whatever the previous call's rows were. NaN
    scores (a key above +inf, or below -inf when negative) give the same kept sets as the row kernel."""
    from lokitool.kernels import select

    b, rows, s, kf = 2, 3, 200, 0.3
    lengths = torch.tensor([200, 97], dtype=torch.int32, device=DEVICE)
    budgets = loki.decode_budget(lengths.long().cpu(), kf).to(torch.int32).to(DEVICE)
    plan = select.SelectPlan(b, rows, s, DEVICE, mode="split", chunk=32, one_launch=one_launch)
    for seed, kind in enumerate(["random", "few-values", "nan", "random"]):
        scores = _scores_of("random" if kind == "nan" else kind, (b, rows, s), seed=seed)
        if kind == "nan":
            scores[0, 0, 10:14] = float("nan")
            scores[1, 1, 20:23] = -float("nan")
        idx = torch.empty(b, rows, LokiSpec(kf=kf).max_budget(s), dtype=torch.int32, device=DEVICE)
        select._launch(scores=scores.to(DEVICE), lengths=lengths, budgets=budgets, idx=idx, plan=plan)
        got = kept_mask(idx, budgets, s).cpu()
        row_mode = select_topk(scores.to(DEVICE), lengths, budgets, kmax=idx.shape[-1], mode="row")
        assert torch.equal(got, kept_mask(row_mode, budgets, s).cpu()), kind
        if kind != "nan":
            assert torch.equal(got, stable_topk_mask(scores, lengths.cpu(), budgets.cpu())), kind
        assert int(plan.ws["hist"].abs().sum()) == 0 and int(plan.ws["sync"].abs().sum()) == 0, kind


@pytest.mark.skipif(not ON_GPU, reason="decode-scale rows: minutes on the interpreter")
@pytest.mark.parametrize("mode", ["row", "split"])
@pytest.mark.parametrize("group_sum", [1, 4], ids=["head", "kv-sum"])
@pytest.mark.parametrize("s", [16384, 32768], ids=["16k", "32k"])
def test_select_at_decode_scale(mode, group_sum, s):
    """Rows of 16384 and 32768 scores (the register tile's two sizes) as the decode step makes them
    (sums of `group_sum` query heads' scores for group kv), 16 x 8 rows, ragged, ties planted at each
    row's threshold, compiled kernels at their autotuned configs: exactly the stable top-k."""
    import os

    b, rows, kf = 16, 8, 0.25
    g = torch.Generator().manual_seed(group_sum)
    scores = sum(torch.randn(b, rows, s, generator=g) * 2 for _ in range(group_sum)).float()
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g).to(torch.int32)
    lengths[0] = s
    budgets = loki.decode_budget(lengths.long(), kf).to(torch.int32)
    for bi in range(b):  # a few exact copies of each row's k-th largest score
        n, k = int(lengths[bi]), int(budgets[bi])
        kth = scores[bi, :, :n].sort(dim=-1, descending=True).values[:, k - 1 : k]  # [rows, 1]
        pos = torch.randint(0, n, (rows, 4), generator=g)
        scores[bi].scatter_(-1, pos, kth.expand(rows, 4))
    os.environ["LOKITOOL_AUTOTUNE"] = "1"  # the configs the bench and loki_decode run
    try:
        idx = select_topk(scores.to(DEVICE), lengths.to(DEVICE), budgets.to(DEVICE), kmax=LokiSpec(kf=kf).max_budget(s), mode=mode)
    finally:
        os.environ["LOKITOOL_AUTOTUNE"] = "0"
    got = kept_mask(idx, budgets.to(DEVICE), s).cpu()
    want = stable_topk_mask(scores, lengths, budgets)
    bad_rows = (got != want).any(-1).nonzero().tolist()
    assert not bad_rows, f"{len(bad_rows)} rows differ from exact top-k, first (b, r): {bad_rows[:8]}"


@pytest.mark.skipif(not ON_GPU, reason="programs meet at barriers: GPU only")
@pytest.mark.parametrize("rows,s", [(8, 32768), (8, 131072), (40, 32768)], ids=["kv-32k", "kv-128k", "head-32k"])
def test_split_one_launch_at_batch_1_in_a_cuda_graph(rows, s):
    """The batch-1 shapes the one-launch selection is for (llama3-8b group kv: 8 rows; llama2-13b: 40),
    captured once in a CUDA graph and replayed over new scores and a new length, as loki_decode's call
    graphs and the static loop run it: exactly the stable top-k every replay, the scratch zero after each."""
    from lokitool.kernels import select, select_radix

    kf = 0.25
    plan = select.SelectPlan(1, rows, s, DEVICE, mode="split")
    assert plan.one_launch and rows * plan.nch <= select.multiprocessors(DEVICE) * select_radix.programs_per_sm()
    scores = torch.empty(1, rows, s, device=DEVICE)
    lengths = torch.full((1,), s, dtype=torch.int32, device=DEVICE)
    budgets = torch.empty(1, dtype=torch.int32, device=DEVICE)
    idx = torch.empty(1, rows, LokiSpec(kf=kf).max_budget(s), dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(rows)

    def fill(n: int, kind: str) -> None:
        scores.copy_(_scores_of(kind, (1, rows, s), seed=n).to(DEVICE))
        lengths.fill_(n)
        budgets.copy_(loki.decode_budget(lengths.long().cpu(), kf).to(torch.int32))

    fill(s, "random")
    select._launch(scores=scores, lengths=lengths, budgets=budgets, idx=idx, plan=plan)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select._launch(scores=scores, lengths=lengths, budgets=budgets, idx=idx, plan=plan)
    for kind in ("random", "few-values", "one-binade", "infinities"):
        n = int(torch.randint(s // 2, s + 1, (1,), generator=g))
        fill(n, kind)
        graph.replay()
        torch.cuda.synchronize()
        assert_exact_topk(idx, scores.cpu(), lengths.cpu(), budgets.cpu())
        assert int(plan.ws["hist"].abs().sum()) == 0 and int(plan.ws["sync"].abs().sum()) == 0, kind


def test_choose_mode_by_row_length_and_work(monkeypatch):
    """Rows that fit the register tile go to the row kernel; longer ones to pivot where there are many
    keys in all and the candidates fit, else to the radix passes; LOKITOOL_SELECT forces a mode, except
    row where it cannot hold the row; an unknown name is refused."""
    from lokitool.kernels import select

    monkeypatch.delenv("LOKITOOL_SELECT", raising=False)
    monkeypatch.delenv("LOKITOOL_ROW_CAP", raising=False)
    assert select.choose_mode(640, 16384, 132) == "row"
    assert select.choose_mode(8, 16384, 132) == "split"  # batch 1, group kv: few rows, one launch
    assert select.choose_mode(8, 8192, 132) == "row"
    assert select.choose_mode(40, 16384, 132) == "row"
    assert select.choose_mode(640, 32768, 132) == "row"  # the 32768-key tile where rows are many
    assert select.choose_mode(33, 20000, 132) == "row"
    assert select.choose_mode(32, 20000, 132) == "split"  # batch 1, group kv: few rows spread over programs
    assert select.choose_mode(640, 65536, 132) == "pivot"
    assert select.choose_mode(8, 131072, 132) == "split"  # batch 1, group kv: too few keys for the sample to pay
    assert select.choose_mode(640, 262144, 132) == "split"  # past select_pivot.MAX_TOKENS
    assert select.choose_mode(40, 131072, 132) == "pivot"  # one launch would hold 65536 keys a program
    assert select.choose_mode(40, 65536, 132) == "pivot"  # llama2-13b, batch 1: 16384 keys a program in one launch
    assert select.choose_mode(32, 131072, 132) == "pivot"  # per query head, batch 1: 16384 keys a program
    assert select.choose_mode(32, 65536, 132) == "split"  # 8192 keys a program: one launch
    monkeypatch.setenv("LOKITOOL_SPLIT_ONE_LAUNCH", "0")
    assert select.choose_mode(8, 16384, 132) == "row"
    monkeypatch.delenv("LOKITOOL_SPLIT_ONE_LAUNCH")
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")  # part of the card: no barriers across the grid
    assert not select.one_launch_default() and select.choose_mode(8, 16384, 132) == "row"
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100")
    assert select.one_launch_default() and select.choose_mode(8, 16384, 132) == "split"
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    assert select.choose_mode(8, 16384, 132, one_launch=False) == "row"  # a card where it is not the default
    monkeypatch.setattr(select, "interpreting", lambda: False)  # ask the card, as on a GPU
    for capability, default in (((8, 0), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert select.one_launch_default(torch.device("cuda")) is default, capability
    monkeypatch.setenv("LOKITOOL_SPLIT_ONE_LAUNCH", "1")
    assert select.one_launch_default(torch.device("cuda"))  # insisted on: any card
    monkeypatch.setenv("LOKITOOL_SELECT", "split")
    assert select.choose_mode(640, 4096, 132) == "split"
    monkeypatch.setenv("LOKITOOL_SELECT", "row")
    assert select.choose_mode(8, 32768, 132) == "row"
    assert select.choose_mode(640, 65536, 132) == "pivot"
    monkeypatch.setenv("LOKITOOL_SELECT", "fast")
    with pytest.raises(ValueError, match="LOKITOOL_SELECT"):
        select.choose_mode(1, 100, 132)
    monkeypatch.delenv("LOKITOOL_SELECT")
    monkeypatch.setenv("LOKITOOL_ROW_CAP", "16384")  # a benchmark's shorter tile
    assert select.row_cap() == 16384 and select.choose_mode(640, 32768, 132) == "pivot"
    monkeypatch.setenv("LOKITOOL_ROW_CAP", "65536")
    assert select.choose_mode(640, 65536, 132) == "row"
    for bad in ("3000", "131072", "64", "big"):
        monkeypatch.setenv("LOKITOOL_ROW_CAP", bad)
        with pytest.raises(ValueError, match="LOKITOOL_ROW_CAP"):
            select.choose_mode(640, 4096, 132)


def test_pivot_chunk_default_and_override(monkeypatch):
    """The pivot mode's chunk: 1024 tokens (measured faster than 2048 and 4096), a short row's own length
    (a power of two), LOKITOOL_PIVOT_CHUNK where set, refused in one line where not a power of two in range;
    likewise its warps and LOKITOOL_PIVOT_WARPS."""
    from lokitool.kernels import select

    monkeypatch.delenv("LOKITOOL_PIVOT_CHUNK", raising=False)
    assert [select.pivot_chunk(s) for s in (131072, 65536, 700, 5)] == [1024, 1024, 1024, 32]
    assert select.SelectPlan(2, 3, 5000, DEVICE, mode="pivot").nch == 5
    monkeypatch.setenv("LOKITOOL_PIVOT_CHUNK", "4096")
    assert select.pivot_chunk(131072) == 4096
    monkeypatch.setenv("LOKITOOL_PIVOT_CHUNK", "3000")
    with pytest.raises(ValueError, match="LOKITOOL_PIVOT_CHUNK"):
        select.pivot_chunk(131072)
    monkeypatch.delenv("LOKITOOL_PIVOT_WARPS", raising=False)  # its kernels' warps: the split mode's for the chunk
    assert [select.pivot_warps(c) for c in (1024, 2048, 8192)] == [4, 8, 16]
    monkeypatch.setenv("LOKITOOL_PIVOT_WARPS", "8")
    assert select.pivot_warps(1024) == 8
    monkeypatch.setenv("LOKITOOL_PIVOT_WARPS", "32")
    with pytest.raises(ValueError, match="LOKITOOL_PIVOT_WARPS"):
        select.pivot_warps(1024)
