"""The selection-aware fit (calib/selection_aware.py): its objective against a brute-force count,
a planted direction that PCA misses and the fit finds, the never-worse choice on held-out windows,
and the basis stored by calibrate and read back as `sa-post`."""

from __future__ import annotations

import math

import pytest
import torch

from lokitool.calib import selection_aware as sa
from lokitool.calib.models import ModelFacts
from lokitool.calib.run import build_calibration
from lokitool.errors import UserError
from lokitool.sparse.bases import basis_for, check_basis


def random_sample(windows: int = 2, t: int = 24, rows: int = 7, dim: int = 6, seed: int = 0, window: int | None = None) -> sa.HeadSample:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.3, dim)
    return sa.HeadSample(
        keys=torch.randn(windows, t, dim, generator=g) * scale,
        values=torch.randn(windows, t, 5, generator=g),
        queries=torch.randn(windows, rows, dim, generator=g),
        positions=torch.stack([torch.randperm(t - 1, generator=g)[:rows] + 1 for _ in range(windows)]),
        scaling=0.7,
        window=window,
    )


def _visible_rows(sample: sa.HeadSample):
    """(q, keys, values) of every sampled row, in float64, its visible keys only."""
    for w in range(sample.keys.shape[0]):
        for r in range(sample.queries.shape[1]):
            p = int(sample.positions[w, r])
            lo = 0 if sample.window is None else max(0, p - sample.window + 1)
            yield sample.queries[w, r].double(), sample.keys[w, lo : p + 1].double(), sample.values[w, lo : p + 1].double()


def brute_force_measures(u: torch.Tensor, sample: sa.HeadSample, kfs: tuple[float, ...]) -> dict[str, float]:
    """One row at a time in float64 with Python's sort: the kept keys' share of exact attention, the
    share of the exact top-k kept, and the relative squared error of attention restricted to the kept keys."""
    totals = {"mass": 0.0, "recall": 0.0, "output_error": 0.0}
    count = 0
    u = u.double()
    for kf in kfs:
        for q, keys, values in _visible_rows(sample):
            exact = [float(q @ k) for k in keys]
            weights = [math.exp(sample.scaling * s) for s in exact]
            truncated = [float((q @ u) @ (u.T @ k)) for k in keys]
            budget = max(1, math.floor(kf * len(keys)))
            kept = sorted(range(len(keys)), key=lambda j: (-truncated[j], j))[:budget]
            best = sorted(range(len(keys)), key=lambda j: (-exact[j], j))[:budget]
            out = sum(weights[j] * values[j] for j in range(len(keys))) / sum(weights)
            approx = sum(weights[j] * values[j] for j in kept) / sum(weights[j] for j in kept)
            totals["mass"] += sum(weights[j] for j in kept) / sum(weights)
            totals["recall"] += len(set(kept) & set(best)) / budget
            totals["output_error"] += float(((approx - out) ** 2).sum() / (out**2).sum())
            count += 1
    return {name: total / count for name, total in totals.items()}


def brute_force_residual(u: torch.Tensor, sample: sa.HeadSample) -> float:
    """The sample term of R one row at a time: w = softmax, errors centred by their w-mean."""
    total, count = 0.0, 0
    u = u.double()
    for q, keys, _ in _visible_rows(sample):
        n = len(keys)
        exact = [float(q @ k) for k in keys]
        z = sum(math.exp(sample.scaling * s) for s in exact)
        w = [math.exp(sample.scaling * s) / z for s in exact]
        e = [exact[j] - float((q @ u) @ (u.T @ keys[j])) for j in range(n)]
        ebar = sum(wj * ej for wj, ej in zip(w, e))
        mean = sum(exact) / n
        var = sum((s - mean) ** 2 for s in exact) / n
        total += sum(wj * (ej - ebar) ** 2 for wj, ej in zip(w, e)) / var
        count += 1
    return total / count


def population_of(sample: sa.HeadSample) -> sa.Population:
    """C and S of the sample's own keys and queries (what calibrate streams over every token)."""
    keys, queries = sample.keys.reshape(-1, sample.keys.shape[-1]), sample.queries.reshape(-1, sample.queries.shape[-1])
    return sa.Population(torch.cov(keys.T, correction=0), queries.T @ queries / len(queries))


@pytest.mark.parametrize("window", [None, 5])
def test_heldout_measures_match_a_brute_force_count(window):
    sample = random_sample(window=window)
    u = sa.orthonormalize(torch.randn(6, 2, generator=torch.Generator().manual_seed(1)))
    for kfs in [(0.25,), (0.125, 0.5)]:
        got = sa.heldout_measures(u, sample, kfs)
        want = brute_force_measures(u, sample, kfs)
        for name in sa.MEASURES:
            assert got[name] == pytest.approx(want[name], abs=1e-5), name
    # d = D: the truncated scores are the exact ones, the kept keys the heaviest
    full, part = sa.heldout_measures(torch.eye(6), sample, (0.25,)), sa.heldout_measures(u, sample, (0.25,))
    assert full["recall"] == pytest.approx(1.0) and full["mass"] > part["mass"] and full["output_error"] < part["output_error"]


@pytest.mark.parametrize("window,alpha", [(None, 0.5), (5, 0.2), (None, 1.0)])
def test_objective_matches_a_brute_force_sum(window, alpha):
    """R = alpha x the sample term (one row at a time) + (1 - alpha) x tr((I - P) C (I - P) S) / tr(CS),
    the latter with the projector formed explicitly."""
    sample = random_sample(window=window, seed=4)
    u = sa.orthonormalize(torch.randn(6, 3, generator=torch.Generator().manual_seed(2)))
    population = population_of(sample)
    rest = torch.eye(6, dtype=torch.float64) - u.double() @ u.double().T
    c, s = population.covariance.double(), population.query_moment.double()
    qa_error = float(torch.trace(rest @ c @ rest @ s) / torch.trace(c @ s))
    got = float(sa.objective(u, sa._rows(sample, (0.25,)), population, alpha))
    assert got == pytest.approx(alpha * brute_force_residual(u, sample) + (1 - alpha) * qa_error, rel=1e-4)
    assert float(sa.objective(torch.eye(6), sa._rows(sample, (0.25,)), population, alpha)) == pytest.approx(0.0, abs=1e-6)


def planted_sample(windows: int = 4, t: int = 128, rows: int = 48, seed: int = 0, scaling: float = 0.3) -> sa.HeadSample:
    """D = 8. Dims 1..7 carry unit-variance noise in keys and queries; dim 0 is nearly always 0
    but a few keys (3%) have k_0 = 6, and every query has q_0 = 2. Those rare keys take much of the
    attention, yet dim 0 has the least key variance (0.03 x 36 ~ 1.0 against 1.7 for the noise).
    Values: the rare keys carry +1 in value dim 0, the others noise around 0. At this scaling the
    attention is spread over several keys per row; where one rare key takes nearly all of it
    (scaling 1), the residual, centred by the attended keys' mean error, sees less of what misses dim 0
    and the fit turns only part of the way (reports/eval/selection-aware/README.md)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(windows, t, 8, generator=g) * 1.3
    rare = torch.rand(windows, t, generator=g) < 0.03
    keys[..., 0] = 6.0 * rare
    values = torch.randn(windows, t, 4, generator=g) * 0.3
    values[..., 0] += rare.float()
    queries = torch.randn(windows, rows, 8, generator=g) * 1.2
    queries[..., 0] = 2.0
    positions = torch.stack([torch.randperm(t - 16, generator=g)[:rows] + 16 for _ in range(windows)])
    return sa.HeadSample(keys=keys, values=values, queries=queries, positions=positions, scaling=scaling)


def test_planted_direction_pca_misses_and_the_fit_finds():
    sample = planted_sample()
    keys = sample.keys.reshape(-1, 8)
    cov = torch.cov(keys.T)
    pca = torch.linalg.eigh(cov)[1].flip(-1)[:, :1]  # the top principal direction: noise
    assert float(pca[0].abs()) < 0.3
    held = sample.split()[1]
    missed = sa.heldout_measures(pca, held)
    fit = sa.fit_head(sample, {"pca": pca}, population_of(sample), steps=150, learning_rate=0.02)  # one direction: larger steps
    planted = sa.heldout_measures(torch.eye(8)[:, :1], held)
    assert fit.choice == "sa"
    # The fit turns to the planted direction (PCA: under 0.3) and keeps about as much mass as it.
    assert float(fit.basis[0, 0].abs()) > 0.9
    assert fit.heldout["mass"]["sa"] > missed["mass"] + 0.4
    assert fit.heldout["mass"]["sa"] >= planted["mass"] - 0.03
    assert fit.heldout["output_error"]["sa"] < 0.6 * missed["output_error"]


def test_fit_lowers_the_residual_on_its_windows():
    sample = random_sample(windows=4, t=40, rows=12, dim=8, seed=5)
    start = sa.orthonormalize(torch.randn(8, 2, generator=torch.Generator().manual_seed(6)))
    rows, population = sa._rows(sample.split()[0], sa.KF_SET), population_of(sample)
    loss = lambda u: sa.objective(u, rows, population)
    fitted = sa.descend(start, loss, steps=40, learning_rate=0.02)
    assert float(loss(fitted)) < 0.9 * float(loss(start))
    torch.testing.assert_close(fitted.T @ fitted, torch.eye(2), atol=1e-5, rtol=0)


def test_fit_is_never_worse_than_its_starts_on_held_out_windows():
    for seed in range(3):
        sample = random_sample(windows=4, t=40, rows=12, dim=8, seed=seed)
        g = torch.Generator().manual_seed(10 + seed)
        starts = {"pca": sa.orthonormalize(torch.randn(8, 2, generator=g)), "qa": sa.orthonormalize(torch.randn(8, 2, generator=g))}
        fit = sa.fit_head(sample, starts, population_of(sample), steps=30)
        held = sample.split()[1]
        mass = fit.heldout["mass"]
        assert mass[fit.choice] == max(mass.values())
        assert sa.heldout_measures(fit.basis, held)["mass"] == pytest.approx(mass[fit.choice], abs=1e-9)
        for u in starts.values():
            assert mass[fit.choice] >= sa.heldout_measures(u, held)["mass"] - 1e-12


# ----------------------------------------------------------------------------------------------
# Stored by calibrate, read as sa-post


def toy_facts() -> ModelFacts:
    return ModelFacts(
        model_id="toy/sa", revision=None, architecture="llama", num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, rope=True, max_positions=256, bos_token_id=1,
    )


def toy_sample(facts: ModelFacts) -> sa.SelectionSample:
    heads = [[planted_sample(t=64, rows=16, seed=3 * layer + h) for h in range(2)] for layer in range(2)]
    stack = lambda name: torch.stack([torch.stack([getattr(s, name) for s in row]) for row in heads])
    return sa.SelectionSample(keys=stack("keys"), values=stack("values"), queries=stack("queries"), positions=heads[0][0].positions,
                              scaling=(1.0, 1.0), windows=(None, None))


def test_calibration_stores_the_fit_and_eval_reads_it(tmp_path):
    from lokitool.calib.calibration import Calibration
    from lokitool.calib.moments import Statistics

    facts = toy_facts()
    sample = toy_sample(facts)
    stats = Statistics.zeros(facts, "cpu", True)
    for layer in range(2):
        for kind in ("pre", "post"):
            stats.keys[kind].add(layer, sample.keys[layer].transpose(0, 1)[:, :, :].reshape(1, 2, -1, 8))
            stats.queries[kind].add(layer, sample.queries[layer].reshape(1, 2, -1, 8))
    cal = build_calibration(stats, facts, {"dataset": "toy"}, sample=sample, sa_df=(0.25,))
    path = cal.save(tmp_path / "sa.safetensors")
    back = Calibration.load(path)
    assert sorted(back.selection_aware["post"]) == [2]
    report = back.info["selection_aware"]["2"]
    assert [len(layer) for layer in report["choice"]] == [2, 2]
    torch.testing.assert_close(back.selection_aware["post"][2], cal.selection_aware["post"][2])
    basis = basis_for("sa-post", back, 2, (2, 2, 8))  # [L, Hkv, D, D]
    torch.testing.assert_close(basis.transpose(-1, -2) @ basis, torch.eye(8, dtype=torch.float64).expand(2, 2, 8, 8), atol=1e-6, rtol=0)
    rows = back.selection_aware["post"][2].double()
    torch.testing.assert_close(basis[..., :2] @ basis[..., :2].transpose(-1, -2), rows.transpose(-1, -2) @ rows, atol=1e-5, rtol=0)
    for layer in range(2):
        for h in range(2):
            chosen = report["choice"][layer][h]
            u = basis[layer, h, :, :2].float()
            held = sample.head(layer, h).split()[1]
            got = sa.heldout_measures(u, held)
            for m in sa.MEASURES:
                assert got[m] == pytest.approx(report[f"heldout_{m}"][chosen][layer][h], abs=1e-4)
            masses = [report["heldout_mass"][n][layer][h] for n in sa.CANDIDATES]
            assert report["heldout_mass"][chosen][layer][h] == max(masses)
    with pytest.raises(UserError, match="--sa-df 0.5"):
        basis_for("sa-post", back, 4, (2, 2, 8))
    plain = build_calibration(stats, facts, {"dataset": "toy"})
    with pytest.raises(UserError, match="selection-aware"):
        check_basis("sa-post", plain)


# ----------------------------------------------------------------------------------------------
# The sample: what the model's attention really computes


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
def test_sample_rows_carry_the_models_own_attention(heads, kv_heads):
    """Each sampled row's exact attention (rebuilt from the sampled query and keys) equals the
    attention weights the model's eager attention returns for that query head and position, and its
    exact output (with the sampled values) equals what the model feeds its o_proj there."""
    from conftest import random_tokens, tiny_llama

    loaded = tiny_llama(num_heads=heads, num_kv_heads=kv_heads, head_dim=8)
    tokens = random_tokens(2, 24, seed=3)
    sample = sa.collect_sample(loaded.model, loaded.facts, tokens, rows=5, seed=1)
    group = heads // kv_heads
    assert sample.queries.shape == (2, kv_heads, 2, group * 5, 8) and sample.positions.shape == (2, group * 5)
    assert sample.values.shape == (2, kv_heads, 2, 24, 8)
    # no autograd graph kept: a sample holding each window's forward graph ran a 270M model out of 24 GB at 32 windows
    assert all(t.grad_fn is None and not t.requires_grad for t in (sample.keys, sample.values, sample.queries))
    model = loaded.model
    outputs: dict[int, list[torch.Tensor]] = {}
    layers = [layer.self_attn for layer in model.model.layers]
    hooks = [attn.o_proj.register_forward_pre_hook(lambda _m, args, i=i: outputs.setdefault(i, []).append(args[0][0].detach()))
             for i, attn in enumerate(layers)]
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            weights = [model(input_ids=tokens[w : w + 1], output_attentions=True).attentions for w in range(2)]
    finally:
        model.set_attn_implementation("sdpa")
        for hook in hooks:
            hook.remove()
    for layer in range(2):
        for h in range(kv_heads):
            rows = sa._rows(sample.head(layer, h), (0.25,))
            for w in range(2):
                for j in range(group * 5):
                    head, pos = h * group + j // 5, int(sample.positions[w, j])
                    torch.testing.assert_close(rows.attention[w, j], weights[w][layer][0, head, pos], atol=1e-5, rtol=1e-4)
                    o_proj_input = outputs[layer][w][pos].reshape(heads, 8)[head]  # [S, H*Dv] -> this head's output
                    torch.testing.assert_close(rows.output[w, j], o_proj_input, atol=1e-5, rtol=1e-4)


def test_sample_windows_bounded_by_memory():
    """The sample keeps 32 windows for small models and fewer (never under 4, never more than there are)
    where keys and values of every layer and KV head would pass SAMPLE_BYTES: an 8B-class shape at 2048
    tokens a window takes 4 windows (8 x 32 layers x 8 heads x 2048 x 256 floats each would be 2 GiB)."""
    from lokitool.calib import selection_aware as sa
    from lokitool.calib.models import ModelFacts

    smol = ModelFacts("smol", None, "llama", 30, 9, 3, 64, True, 8192, 1)
    big = ModelFacts("big", None, "llama", 32, 32, 8, 128, True, 8192, 1)
    assert sa.sample_windows(smol, 1024, available=100) == 32
    assert sa.sample_windows(smol, 1024, available=10) == 10
    per_window = 32 * 8 * 2048 * 2 * 128 * 4
    assert sa.sample_windows(big, 2048, available=100) == max(4, sa.SAMPLE_BYTES // per_window) == 4
    assert sa.sample_windows(big, 512, available=100) == sa.SAMPLE_BYTES // (per_window // 4) == 16
