"""The selection-aware subspace: the d directions whose truncated scores pick the keys attention needs.

PCA and the query-aware fit (query_aware.py) minimise the truncation error of the scores averaged over
all keys and queries alike; top-k selection only cares about the order of the keys that carry the
attention. For a sampled query row q over its n visible keys K, exact scores s = q.K, truncated scores
s~ = (U^T q).(U^T K), truncation error e = s - s~ and exact attention a, the fit minimises

    R(U) = ALPHA x mean over sampled rows of  sum_j a_j (e_j - ebar)^2 / sigma^2     (ebar = sum_j a_j e_j)
         + (1 - ALPHA) x E(U) / tr(CS),

sigma = the spread (standard deviation) of the row's exact scores. The first term weighs each key by
the attention it carries (a per-row shift of the scores does not change the ranking, hence the
centring by ebar); the second is the query-aware error E(U) = tr((I - P) C (I - P) S) from the
calibration's full statistics (C, S: every calibration token), which keeps the order of the other keys
and holds the fit to what a small sample cannot tell. R is smooth; Riemannian steps on the Stiefel
manifold (Adam-scaled tangent steps, QR retraction) from the better (by R) of the PCA and query-aware starts.

The sample (`SelectionSample`: keys, values and queries after RoPE from the first SAMPLE_WINDOWS
calibration windows, fewer where their L x Hkv x windows x seq_len x 2D floats would pass SAMPLE_BYTES) is split by window into
fit and held-out halves. On the held-out half each candidate (PCA, query-aware, the fit) is measured as
Loki uses it, at each budget kf in KF_SET (k = max(1, floor(kf x n)), per-row budgets, as eval runs),
averaged over rows and budgets:

- output error: ||o~ - o||^2 / ||o||^2, o = sum_j a_j v_j the exact attention output, o~ the output of
  exact attention over the top-k of s~ (what Loki computes);
- mass: the exact attention that falls on the top-k of s~;
- recall: the share of the exact top-k (by s) that the top-k of s~ keeps.

The returned subspace is the candidate that captures the most held-out mass, so it is never worse than
either start there. The output error is recorded beside it: chosen by it instead, sa-post had higher
perplexity on both models tried (reports/eval/selection-aware/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .collect import capture
from .models import ModelFacts, attention_modules
from .query_aware import one_cpu_thread, orthonormalize, trace_product, truncation_error

KF_SET = (0.125, 0.25)  # budgets the held-out measures average over (the eval settings of issue 18)
ALPHA = 0.5  # weight of the sample's attention-weighted residual (against the query-aware error) in R
STEPS = 40
LEARNING_RATE = 0.003
SAMPLE_WINDOWS = 32  # calibration windows the sample is taken from: half fit, half held out
SAMPLE_BYTES = 2 << 30  # at most this much memory for the sampled keys and values (fewer windows for large models)
MIN_SAMPLE_WINDOWS = 4
SAMPLE_ROWS = 64  # query positions per window (each with every query head of the KV group)
CANDIDATES = ("pca", "qa", "sa")  # the order in which ties are broken (the simpler basis wins)
MEASURES = ("mass", "recall", "output_error")  # held-out, per candidate; the choice maximises the first


@dataclass(frozen=True)
class HeadSample:
    """One (layer, KV head)'s sample after RoPE: W windows of T keys and values and R query rows each."""

    keys: torch.Tensor  # [W, T, D] float32
    values: torch.Tensor  # [W, T, Dv] float32
    queries: torch.Tensor  # [W, R, D] float32 (the query heads of the KV group, pooled)
    positions: torch.Tensor  # [W, R] int64, each row's position in its window
    scaling: float  # the model's logit scale for this layer
    window: int | None = None  # sliding window (keys seen per query, itself included), None = causal

    def split(self) -> tuple[HeadSample, HeadSample]:
        """(fit, held-out): the first half of the windows and the rest."""
        half = max(1, self.keys.shape[0] // 2)
        part = lambda s: HeadSample(self.keys[s], self.values[s], self.queries[s], self.positions[s], self.scaling, self.window)
        return part(slice(0, half)), part(slice(half, None))


@dataclass(frozen=True)
class SelectionSample:
    """Samples of every layer: keys and values [L, Hkv, W, T, D], queries [L, Hkv, W, R, D], positions [W, R]."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    positions: torch.Tensor
    scaling: tuple[float, ...]  # per layer
    windows: tuple[int | None, ...]  # per layer

    def head(self, layer: int, kv_head: int) -> HeadSample:
        return HeadSample(self.keys[layer, kv_head], self.values[layer, kv_head], self.queries[layer, kv_head],
                          self.positions, self.scaling[layer], self.windows[layer])


# ----------------------------------------------------------------------------------------------
# The objective and the held-out measures


@dataclass(frozen=True)
class _Rows:
    """What the objective and the measures need of a sample that does not depend on U."""

    keys: torch.Tensor  # [W, T, D]
    values: torch.Tensor  # [W, T, Dv]
    queries: torch.Tensor  # [W, R, D]
    visible: torch.Tensor  # [W, R, T] bool
    scores: torch.Tensor  # [W, R, T] exact scores q.k (unscaled)
    attention: torch.Tensor  # [W, R, T] exact softmax over the visible keys
    spread: torch.Tensor  # [W, R, 1] std of the exact scores over the visible keys
    budgets: torch.Tensor  # [F, W, R] int64, k per row for each kf
    output: torch.Tensor  # [W, R, Dv] exact attention output


def _rows(sample: HeadSample, kfs: tuple[float, ...]) -> _Rows:
    k, q, v = sample.keys.float(), sample.queries.float(), sample.values.float()
    t = k.shape[1]
    j = torch.arange(t)
    pos = sample.positions[..., None]  # [W, R, 1]
    visible = j <= pos
    if sample.window is not None:
        visible &= j > pos - sample.window
    raw = q @ k.transpose(-1, -2)  # [W, R, T]
    attention = torch.softmax((raw * sample.scaling).masked_fill(~visible, float("-inf")), dim=-1)
    n = visible.sum(-1)  # [W, R]
    uniform = visible / n[..., None]
    mean = (raw * uniform).sum(-1, keepdim=True)
    var = (((raw - mean) ** 2) * uniform).sum(-1, keepdim=True)
    budgets = torch.stack([torch.floor(kf * n.double()).long().clamp_min(1) for kf in kfs])
    return _Rows(k, v, q, visible, raw, attention, var.sqrt().clamp_min(1e-6), budgets, attention @ v)


def _truncated_scores(u: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """s~ = (q U).(k U) for every row and key: [W, R, T]."""
    return (rows.queries @ u) @ (rows.keys @ u).transpose(-1, -2)


def residual(u: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """The sample term of R: attention-weighted, centred, spread-normalised squared truncation error,
    mean over rows: scalar."""
    e = rows.scores - _truncated_scores(u, rows)  # [W, R, T]
    e = e - (rows.attention * e).sum(-1, keepdim=True)
    return ((rows.attention * e * e).sum(-1) / rows.spread[..., 0] ** 2).mean()


@dataclass(frozen=True)
class Population:
    """One head's full-calibration statistics: key covariance C and query second moment S, [D, D]."""

    covariance: torch.Tensor
    query_moment: torch.Tensor

    def error(self, u: torch.Tensor) -> torch.Tensor:
        """E(U) / tr(CS): the query-aware error as a share of the score variance: scalar."""
        total = trace_product(self.covariance, self.query_moment)
        return truncation_error(u, self.covariance, self.query_moment, total) / total


def objective(u: torch.Tensor, rows: _Rows, population: Population, alpha: float = ALPHA) -> torch.Tensor:
    """R(U) (module doc): scalar."""
    return alpha * residual(u, rows) + (1 - alpha) * population.error(u)


def _ranks(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Each key's place (0 = largest) among the visible keys of its row, ties broken by key index: [W, R, T]."""
    order = scores.masked_fill(~visible, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))


def _measures(u: torch.Tensor, rows: _Rows) -> dict[str, float]:
    """The held-out measures of U (see the module doc), each averaged over rows and budgets (float64)."""
    truncated = _ranks(_truncated_scores(u, rows), rows.visible)
    exact = _ranks(rows.scores, rows.visible)
    attention = rows.attention.double()
    norm = (rows.output.double() ** 2).sum(-1).clamp_min(1e-30)
    out = {name: [] for name in MEASURES}
    for k in rows.budgets:
        kept = truncated < k[..., None]  # [W, R, T]
        share = (attention * kept).sum(-1)
        approx = ((attention * kept) / share[..., None]) @ rows.values.double()
        out["mass"].append(share.mean())
        out["recall"].append(((kept & (exact < k[..., None])).sum(-1) / k).double().mean())
        out["output_error"].append((((approx - rows.output.double()) ** 2).sum(-1) / norm).mean())
    return {name: float(torch.stack(v).mean()) for name, v in out.items()}


def heldout_measures(u: torch.Tensor, sample: HeadSample, kfs: tuple[float, ...] = KF_SET) -> dict[str, float]:
    """Output error, mass and recall of U [D, d] (orthonormal) on `sample`, averaged over rows and kfs."""
    return _measures(u.float(), _rows(sample, kfs))


# ----------------------------------------------------------------------------------------------
# The fit


@dataclass(frozen=True)
class HeadFit:
    basis: torch.Tensor  # [D, d] orthonormal: the chosen subspace
    choice: str  # which of CANDIDATES it is
    heldout: dict[str, dict[str, float]]  # measure -> candidate -> held-out value


def fit_head(
    sample: HeadSample, starts: dict[str, torch.Tensor], population: Population, kfs: tuple[float, ...] = KF_SET,
    steps: int = STEPS, learning_rate: float = LEARNING_RATE, alpha: float = ALPHA,
) -> HeadFit:
    """Fit one (layer, KV head) from `starts` {"pca": U, "qa": U} ([D, d] each) and choose, on the
    held-out half of the sample, the candidate (pca, qa or the fit) that captures the most mass."""
    fit_part, held_part = sample.split()
    candidates = {**starts, "sa": _fit(fit_part, starts, population, kfs, steps, learning_rate, alpha)}
    held_rows = _rows(held_part, kfs)  # built after the fit's rows are freed: one [W, R, T] set at a time
    per_candidate = {name: _measures(u.float(), held_rows) for name, u in candidates.items()}
    heldout = {m: {name: per_candidate[name][m] for name in candidates} for m in MEASURES}
    mass = heldout["mass"]
    best = max((n for n in CANDIDATES if n in mass), key=lambda n: (mass[n], -CANDIDATES.index(n)))
    return HeadFit(basis=candidates[best].float(), choice=best, heldout=heldout)


def _fit(
    part: HeadSample, starts: dict[str, torch.Tensor], population: Population, kfs: tuple[float, ...], steps: int,
    learning_rate: float, alpha: float,
) -> torch.Tensor:
    """The fitted U [D, d]: descent of R on `part` from the start with the lower R."""
    rows = _rows(part, kfs)
    loss = lambda u: objective(u, rows, population, alpha)
    on_fit = {name: float(loss(u.float())) for name, u in starts.items()}
    start = min(on_fit, key=on_fit.get)
    return descend(starts[start].float(), loss, steps, learning_rate)


def descend(u: torch.Tensor, loss, steps: int, learning_rate: float) -> torch.Tensor:
    """Riemannian descent of `loss` (U -> scalar) on the Stiefel manifold from U [D, d]: Adam-scaled
    steps along the tangent projection of the gradient, QR retraction. Returns the iterate with the
    lowest loss (checked every few steps), the start included."""
    best_u, best = u, float(loss(u))
    m = torch.zeros_like(u)
    v = torch.zeros_like(u)
    beta1, beta2 = 0.9, 0.999
    with one_cpu_thread():
        for step in range(1, steps + 1):
            x = u.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(x), x)
            grad = grad - u @ ((u.T @ grad + grad.T @ u) / 2)  # tangent part at U
            m = beta1 * m + (1 - beta1) * grad
            v = beta2 * v + (1 - beta2) * grad * grad
            direction = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + 1e-8)
            u = orthonormalize(u - learning_rate * direction)
            if step % 10 == 0 or step == steps:
                value = float(loss(u))
                if value < best:
                    best_u, best = u, value
    return best_u


# ----------------------------------------------------------------------------------------------
# The sample


def sample_windows(facts: ModelFacts, seq_len: int, available: int) -> int:
    """Windows to sample: SAMPLE_WINDOWS, fewer where their keys and values (float32, every layer and KV
    head) would pass SAMPLE_BYTES, never below MIN_SAMPLE_WINDOWS nor above the `available` ones."""
    per_window = facts.num_layers * facts.num_kv_heads * seq_len * 2 * facts.head_dim * 4
    return min(available, max(MIN_SAMPLE_WINDOWS, min(SAMPLE_WINDOWS, SAMPLE_BYTES // per_window)))


@torch.no_grad()  # not inference_mode: the fit differentiates through these tensors
def collect_sample(
    model: nn.Module, facts: ModelFacts, tokens: torch.Tensor, rows: int = SAMPLE_ROWS, seed: int = 0,
) -> SelectionSample:
    """Keys, values and queries after RoPE of token windows [W, T] (one forward each), `rows` positions
    per window drawn uniformly without replacement (position 0 excluded: it sees one key)."""
    t = tokens.shape[1]
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(t - 1, generator=g)[: min(rows, t - 1)] + 1 for _ in range(len(tokens))])
    group = facts.num_heads // facts.num_kv_heads
    taken: dict[str, dict[int, list[torch.Tensor]]] = {"key": {}, "value": {}, "query": {}}
    current = {"w": 0}

    def sink(vector: str, kind: str, layer: int, x: torch.Tensor) -> None:
        if kind != "post":
            return
        x = x[0].float().cpu()  # [Hkv, N, D]
        if vector == "query":
            # pooled query rows: index g * T + s for query head g of the group, position s
            pos = positions[current["w"]]
            x = x[:, (torch.arange(group)[:, None] * t + pos[None, :]).reshape(-1)]
        taken[vector].setdefault(layer, []).append(x)

    device = next(model.parameters()).device
    with capture(model, facts, sink, with_queries=True, with_values=True):
        for w in range(len(tokens)):
            current["w"] = w
            model.base_model(input_ids=tokens[w : w + 1].to(device), use_cache=False)
    layers = range(facts.num_layers)
    modules = attention_modules(model)
    scaling = tuple(float(getattr(modules[i], "scaling", facts.head_dim**-0.5)) for i in layers)
    stacked = {name: torch.stack([torch.stack(got[i], dim=1) for i in layers]) for name, got in taken.items()}
    return SelectionSample(
        keys=stacked["key"],  # [L, Hkv, W, T, D]
        values=stacked["value"],  # [L, Hkv, W, T, Dv]
        queries=stacked["query"],  # [L, Hkv, W, G*R, D]
        positions=positions.repeat(1, group),  # [W, G*R], matching the query rows
        scaling=scaling,
        windows=tuple(facts.layer_window(i) for i in layers),
    )


def fit_all(
    sample: SelectionSample, starts: dict[str, torch.Tensor], covariance: torch.Tensor, query_moment: torch.Tensor,
    progress=None, **settings,
) -> tuple[torch.Tensor, dict]:
    """fit_head for every (layer, KV head). starts: name -> [L, Hkv, D, d]; covariance, query_moment:
    the calibration's C and S, [L, Hkv, D, D]. Returns the chosen
    subspaces as rows [L, Hkv, d, D] and a JSON-ready report: per layer and head the choice and the
    held-out measures of each candidate (`heldout_<measure>`: candidate -> [L][Hkv]) and the fit's
    seconds. `progress(done, total)` is called after each head."""
    import time

    num_layers, num_kv = sample.keys.shape[:2]
    start = time.perf_counter()
    rows, choices = [], []
    heldout = {m: {name: [[] for _ in range(num_layers)] for name in CANDIDATES} for m in MEASURES}
    for layer in range(num_layers):
        layer_rows, layer_choice = [], []
        for h in range(num_kv):
            population = Population(covariance[layer, h].float(), query_moment[layer, h].float())
            fit = fit_head(sample.head(layer, h), {n: u[layer, h] for n, u in starts.items()}, population, **settings)
            layer_rows.append(fit.basis.T)
            layer_choice.append(fit.choice)
            for m in MEASURES:
                for name in CANDIDATES:
                    heldout[m][name][layer].append(round(fit.heldout[m][name], 6))
            if progress is not None:
                progress(layer * num_kv + h + 1, num_layers * num_kv)
        rows.append(torch.stack(layer_rows))
        choices.append(layer_choice)
    windows = int(sample.keys.shape[2])
    report = {
        "choice": choices,
        "chosen_by": "heldout_mass",
        **{f"heldout_{m}": heldout[m] for m in MEASURES},
        "kf": list(settings.get("kfs", KF_SET)),
        "alpha": settings.get("alpha", ALPHA),
        "sample": {"windows": windows, "rows_per_window": int(sample.queries.shape[3]),
                   "held_out_windows": windows - max(1, windows // 2)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    return torch.stack(rows), report


def summary(report: dict) -> list[str]:
    """Console lines: the fit's time, overall counts and mean held-out measures, then the layers where
    the fit was not chosen."""
    choices = [c for layer in report["choice"] for c in layer]
    counts = ", ".join(f"{n} {choices.count(n)}" for n in CANDIDATES)
    lines = [f"fit {report['seconds']:.0f} s; heads choosing {counts} (most held-out mass)"]
    for m in MEASURES:
        mean = {n: sum(sum(v) for v in report[f"heldout_{m}"][n]) / len(choices) for n in CANDIDATES}
        lines.append(f"held-out {m.replace('_', ' ')} (kf {', '.join(map(str, report['kf']))}): "
                     + ", ".join(f"{n} {mean[n]:.4f}" for n in CANDIDATES))
    fallback = [f"{i} ({'/'.join(layer)})" for i, layer in enumerate(report["choice"]) if "sa" not in layer]
    if fallback:
        lines.append(f"layers where the fit did not help on held-out windows (kept the start): {', '.join(fallback)}")
    return lines
