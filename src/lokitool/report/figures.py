"""The figures: matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).

matplotlib is imported inside the functions, so reading or computing a report never loads it.
"""

from __future__ import annotations

import torch

from ..calib.calibration import KINDS
from ..calib.pca import explained_variance_ratio
from .labels import BASIS_LABEL, KIND_LABEL, pct
from .numbers import SCORE_BASES, Entry, RankReport, dataset, file_labels


def _title_suffix(report: RankReport) -> str:
    datasets = " vs ".join(dict.fromkeys(dataset(e) for e in report.entries))
    return f"{report.facts.model_id}\n{datasets}"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", dpi=110)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def plot_rank_per_layer(report: RankReport):
    """Mean rank over KV heads per layer, pre and post, one panel per threshold; for a single file a
    band shows the min-max over heads (with several files the bands would hide each other)."""
    facts = report.facts
    layers = range(facts.num_layers)
    names = file_labels(report)
    colors = _colors(len(report.entries))
    many = len(report.entries) > 1
    fig = _figure(4.6 * len(report.variance) + 1.0, 4.6)
    axes = fig.subplots(1, len(report.variance), sharey=True, squeeze=False)[0]
    for ax, v in zip(axes, report.variance):
        for name, entry, color in zip(names, report.entries, colors):
            for kind, style, marker in (("pre", "--", "o"), ("post", "-", "s")):
                r = entry.ranks[kind][v].double().numpy()  # [L, H]
                label = f"{name} ({dataset(entry)}), {KIND_LABEL[kind]}" if many else KIND_LABEL[kind]
                shade = color if many else ("tab:blue" if kind == "pre" else "tab:orange")
                ax.plot(layers, r.mean(-1), style, marker=marker, ms=3.5, color=shade, label=label)
                if not many:
                    ax.fill_between(layers, r.min(-1), r.max(-1), color=shade, alpha=0.12, lw=0)
        ax.axhline(facts.head_dim, color="0.3", lw=1.2, ls=":")
        ax.text(0, facts.head_dim, f" head dim D = {facts.head_dim}", va="bottom", ha="left", fontsize=9, color="0.3")
        ax.set_title(f"rank at {pct(v)} explained variance")
        ax.set_xlabel("layer")
        ax.set_ylim(0, facts.head_dim * 1.1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rank, mean over KV heads" + ("" if many else " (band: min-max)"))
    handles, names_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncols=min(len(handles), 4), fontsize=9)
    fig.suptitle(f"Key rank per layer, pre vs post RoPE - {_title_suffix(report)}", fontsize=11)
    return fig


def plot_heatmap(report: RankReport, entry: Entry):
    """Rank at the reference threshold, layer x KV head, pre and post."""
    facts = report.facts
    t = report.threshold
    fig = _figure(max(7.0, 0.36 * facts.num_layers + 2.2), 2 * (0.42 * facts.num_kv_heads + 1.0) + 0.9)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, kind in zip(axes, KINDS):
        ranks = entry.ranks[kind][t].T.numpy()  # [H, L]
        image = ax.imshow(ranks, aspect="auto", cmap="viridis", vmin=1, vmax=facts.head_dim, interpolation="nearest")
        for h in range(ranks.shape[0]):
            for i in range(ranks.shape[1]):
                value = int(ranks[h, i])
                light = value > 0.6 * facts.head_dim
                ax.text(i, h, str(value), ha="center", va="center", fontsize=7, color="black" if light else "white")
        ax.set_yticks(range(facts.num_kv_heads))
        ax.set_ylabel(f"{KIND_LABEL[kind]}\nKV head")
    axes[-1].set_xticks(range(facts.num_layers))
    axes[-1].set_xlabel("layer")
    fig.colorbar(image, ax=axes, label=f"rank (of D = {facts.head_dim})", shrink=0.9)
    fig.suptitle(
        f"Rank at {pct(t)} explained variance per layer and KV head - {facts.model_id}\n{dataset(entry)}",
        fontsize=10,
    )
    return fig


def sample_layers(num_layers: int, count: int = 5) -> list[int]:
    """Up to `count` layers spread evenly from first to last."""
    if num_layers <= count:
        return list(range(num_layers))
    return sorted({round(k * (num_layers - 1) / (count - 1)) for k in range(count)})


def plot_cumulative(report: RankReport, entry: Entry):
    """Cumulative explained-variance ratio against d for a few layers (thin lines: single heads)."""
    facts = report.facts
    chosen = sample_layers(facts.num_layers)
    colors = _colors(len(chosen))
    d = range(1, facts.head_dim + 1)
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, KINDS):
        ratio = explained_variance_ratio(entry.calibration.pca[kind].eigenvalues).numpy()  # [L, H, D]
        for layer, color in zip(chosen, colors):
            for h in range(facts.num_kv_heads):
                ax.plot(d, ratio[layer, h], color=color, lw=0.7, alpha=0.45)
            ax.plot(d, ratio[layer].mean(0), color=color, lw=2, label=f"layer {layer}")
        for v in report.variance:
            ax.axhline(v, color="0.4", lw=0.8, ls=":")
            ax.text(facts.head_dim, v, f"{pct(v)} ", ha="right", va="bottom", fontsize=8, color="0.3")
        ax.set_title(KIND_LABEL[kind])
        ax.set_xlabel("d (top principal directions kept)")
        ax.set_xlim(1, facts.head_dim)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative explained-variance ratio")
    axes[0].legend(fontsize=8, loc="lower right", title="thick: mean over KV heads", title_fontsize=8)
    fig.suptitle(f"Cumulative explained variance - {facts.model_id}\n{dataset(entry)}", fontsize=10)
    return fig


def plot_spectrum(report: RankReport, entry: Entry):
    """Eigenvalues (mean over KV heads) per layer, log scale, coloured by layer."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    facts = report.facts
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(facts.num_layers - 1, 1))
    j = range(1, facts.head_dim + 1)
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, KINDS):
        values = entry.calibration.pca[kind].eigenvalues.double().mean(1)  # [L, D]
        values = torch.where(values > 0, values, torch.nan).numpy()  # zeros have no place on a log axis
        for layer in range(facts.num_layers):
            ax.plot(j, values[layer], color=cmap(norm(layer)), lw=1.1)
        ax.set_yscale("log")
        ax.set_title(KIND_LABEL[kind])
        ax.set_xlabel("principal direction j (descending)")
        ax.set_xlim(1, facts.head_dim)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("eigenvalue (mean over KV heads)")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="layer")
    fig.suptitle(f"Key covariance eigenvalues per layer - {facts.model_id}\n{dataset(entry)}", fontsize=10)
    return fig


def plot_comparisons(report: RankReport):
    """Agreement and captured variance per layer (mean over KV heads) for every ordered pair."""
    facts = report.facts
    names = file_labels(report)
    layers = range(facts.num_layers)
    colors = _colors(len(report.comparisons))
    fig = _figure(12, 4.6)
    axes = fig.subplots(1, 2)
    for pair, color in zip(report.comparisons, colors):
        for kind, style in (("pre", "--"), ("post", "-")):
            c = pair.kinds[kind]
            label = f"A={names[pair.a]}, B={names[pair.b]}, {KIND_LABEL[kind]}"
            axes[0].plot(layers, c.agreement.mean(-1).numpy(), style, marker=".", color=color, label=label)
            axes[1].plot(layers, c.captured.mean(-1).numpy(), style, marker=".", color=color, label=label)
            axes[1].plot(layers, c.own.mean(-1).numpy(), style, color=color, lw=0.8, alpha=0.5)
    axes[0].set_title("subspace agreement (mean cos² of principal angles)")
    axes[1].set_title("share of B's key variance in A's top-d subspace\n(faint: B's own top-d, the ceiling)")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_ylim(top=min(ax.get_ylim()[1], 1.005))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean over KV heads, d = A's rank at {pct(report.threshold)}")
    handles, names_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(f"Do the key subspaces carry over? - {_title_suffix(report)}", fontsize=10)
    return fig


def plot_score_variance(report: RankReport, entry: Entry):
    """Score variance captured per layer (mean over KV heads) by each basis, one panel per (d, kind);
    dashed: PCA's key variance captured at the same d."""
    facts = report.facts
    layers = range(facts.num_layers)
    by = {(sv.d, sv.kind): sv for sv in entry.score_variance}
    colors = {"pca": "tab:blue", "random": "tab:gray", "query_aware": "tab:red"}
    markers = {"pca": "o", "random": "x", "query_aware": "s"}
    fig = _figure(12, 3.4 * len(report.dims) + 1.2)
    axes = fig.subplots(len(report.dims), len(KINDS), sharex=True, sharey=True, squeeze=False)
    for row, d in zip(axes, report.dims):
        for ax, kind in zip(row, KINDS):
            sv = by[(d, kind)]
            for b in SCORE_BASES:
                ax.plot(layers, sv.captured[b].mean(-1).numpy(), "-", marker=markers[b], ms=3.5, lw=1.4,
                        color=colors[b], label=f"score variance: {BASIS_LABEL[b]}")
            ax.plot(layers, sv.key_variance.mean(-1).numpy(), "--", color="black", lw=1.2,
                    label="key variance (PCA explained variance)")
            ax.axhline(0, color="0.5", lw=0.8)
            ax.set_title(f"{KIND_LABEL[kind]}, d = {d} of {facts.head_dim}", fontsize=10)
            ax.grid(alpha=0.3)
    low = min(float(sv.captured[b].mean(-1).min()) for sv in entry.score_variance for b in SCORE_BASES)
    axes[0, 0].set_ylim(min(-0.05, low - 0.05), 1.03)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("captured, mean over KV heads")
    handles, names_ = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle(
        f"Share of score variance kept by truncated scores, per basis - {facts.model_id}\n{dataset(entry)}",
        fontsize=10,
    )
    return fig
