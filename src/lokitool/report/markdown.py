"""report.md: the report as GitHub-readable tables and figure links, with the definitions in words."""

from __future__ import annotations

from typing import Sequence

from ..calib.calibration import KINDS
from .labels import BASIS_LABEL, KIND_LABEL, NO_QUERIES_NOTE, pct
from .layout import FigureFiles
from .numbers import SCORE_BASES, Entry, PairComparison, RankReport, dataset, file_labels, mean_rank


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """GitHub table: the first `text_columns` columns left-aligned, the rest (numbers) right-aligned."""
    rule = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _md_sources(report: RankReport, names: Sequence[str]) -> str:
    rows = []
    for name, entry in zip(names, report.entries):
        info = entry.calibration.info
        versions = info.get("versions", {})
        rows.append([
            f"`{entry.file}`" if name == entry.file else f"{name} (`{entry.file}`)",
            f"`{dataset(entry)}`",
            str(info.get("dtype", "?")),
            str(info.get("date", "?")),
            str(versions.get("lokitool", "?")),
            f"{info['num_tokens']:,}" if isinstance(info.get("num_tokens"), int) else "?",
            str(info.get("seq_len", "?")),
        ])
    return _md_table(["file", "dataset", "dtype", "calibrated", "lokitool", "tokens", "window"], rows, text_columns=5)


def _md_summary(report: RankReport, names: Sequence[str]) -> str:
    dim = report.facts.head_dim
    rows = []
    for name, entry in zip(names, report.entries):
        for kind in KINDS:
            cells = []
            for v in report.variance:
                r = entry.ranks[kind][v].double()
                cells.append(f"{r.mean():.1f} ({r.mean() / dim:.0%}), {int(r.min())}-{int(r.max())}")
            rows.append([name, KIND_LABEL[kind], *cells])
    header = ["file", "keys", *(f"rank at {pct(v)}" for v in report.variance)]
    return _md_table(header, rows, text_columns=2)


def _md_layers(report: RankReport, entry: Entry) -> str:
    t = report.threshold
    rows = []
    for i in range(report.facts.num_layers):
        means = [f"{float(mean_rank(entry, kind, v)[i]):.1f}" for kind in KINDS for v in report.variance]
        heads = [" / ".join(str(int(x)) for x in entry.ranks[kind][t][i]) for kind in KINDS]
        rows.append([str(i), *means, *heads])
    header = [
        "layer",
        *(f"{kind} {pct(v)}" for kind in KINDS for v in report.variance),
        *(f"{kind} {pct(t)} per head" for kind in KINDS),
    ]
    return _md_table(header, rows)


def _md_comparison_summary(report: RankReport, names: Sequence[str]) -> str:
    rows = []
    for pair in report.comparisons:
        for kind, c in pair.kinds.items():
            rows.append([
                names[pair.a],
                names[pair.b],
                KIND_LABEL[kind],
                f"{c.d.double().mean():.1f}",
                f"{c.agreement.mean():.3f} (min {c.agreement.min():.3f})",
                f"{c.captured.mean():.3f} (min {c.captured.min():.3f})",
                f"{c.own.mean():.3f}",
            ])
    header = ["A (basis)", "B (keys)", "keys", "mean d", "agreement", "captured variance", "own variance"]
    return _md_table(header, rows, text_columns=3)


def _md_comparison_layers(report: RankReport, pair: PairComparison) -> str:
    rows = []
    for i in range(report.facts.num_layers):
        cells = []
        for kind in KINDS:
            c = pair.kinds[kind]
            cells += [f"{c.d[i].double().mean():.1f}", f"{c.agreement[i].mean():.3f}", f"{c.captured[i].mean():.3f}",
                      f"{c.own[i].mean():.3f}"]
        rows.append([str(i), *cells])
    header = ["layer", *(f"{kind} {col}" for kind in KINDS for col in ("d", "agreement", "captured", "own"))]
    return _md_table(header, rows)


def _md_score_summary(report: RankReport, names: Sequence[str]) -> str:
    rows = []
    for name, entry in zip(names, report.entries):
        for sv in entry.score_variance or ():
            rows.append([
                name,
                KIND_LABEL[sv.kind],
                str(sv.d),
                f"{sv.key_variance.mean():.3f}",
                *(f"{sv.captured[b].mean():.3f}" for b in SCORE_BASES),
            ])
    header = ["file", "keys", "d", "key variance (PCA)", *(f"score variance: {BASIS_LABEL[b]}" for b in SCORE_BASES)]
    return _md_table(header, rows, text_columns=2)


def _md_score_variance(report: RankReport, names: Sequence[str], figures: FigureFiles) -> list[str]:
    dim = report.facts.head_dim
    dims = ", ".join(map(str, report.dims))
    fractions = ",".join(f"{f:g}" for f in report.dim_fractions)
    parts = [
        "## Score variance captured by truncated scores",
        "Loki ranks keys by scores computed in the first d directions of a basis U. For each layer, KV head "
        "and kind, with C the key covariance and S = E[q qᵀ] over the query heads of the KV group, the "
        "**score variance captured** at d is 1 − tr((I − U_d U_dᵀ) C (I − U_d U_dᵀ) S) / tr(CS): the share "
        "of the per-query variance of scores across keys that the truncated scores keep (1: they vary "
        "exactly as the full scores). It can fall below 0 for a basis that mixes high-variance key "
        "directions into the directions queries look along.",
        "- **PCA (Loki)**: the top-d principal directions of the keys;",
        "- **random**: a Haar-random orthonormal basis (seed 0): what any basis must beat;",
        "- **query-aware**: the d directions that minimise the truncation error for that d "
        "(fitted per d, see `lokitool/sparse/bases.py`; stored in format-2 calibration files);",
        "- **key variance (PCA)**: PCA's explained variance at d, (λ1 + … + λd) / (λ1 + … + λD): what the "
        "ranks above measure. Score variance captured by PCA equals it when queries weigh all directions alike.",
        f"d = {dims} of D = {dim} (`--dims {fractions}`: d = round(f · D)).",
    ]
    if any(e.score_variance is not None for e in report.entries):
        parts[-1] += " Means over layers and KV heads:"
        parts.append(_md_score_summary(report, names))
    for name, entry, files in zip(names, report.entries, figures.per_entry):
        if entry.score_variance is None:
            parts.append(f"- {name} (`{entry.file}`): {NO_QUERIES_NOTE}.")
        else:
            parts.append(f"![score variance captured, {name}]({files['score_variance']})")
    parts.append(
        "In `report.json`, each calibration has `score_variance`: a list over layer, then kind, then d of "
        '`{"layer": 0, "kind": "post", "d": 16, "key_variance": [per head], "pca": [per head], '
        '"random": [per head], "query_aware": [per head]}`, and `score_variance_mean` (means over layers '
        "and heads per kind and d); both are `null`, with `score_variance_note`, for a file without query statistics."
    )
    return parts


SA_CANDIDATES = ("pca", "qa", "sa")  # calib/selection_aware.CANDIDATES, as the calibration header names them
SA_MEASURES = (("mass", "mass", "{:.4f}"), ("recall", "top-k recall", "{:.4f}"), ("output_error", "output error", "{:.4f}"))


def _md_selection_aware(report: RankReport, names: Sequence[str]) -> list[str]:
    """Per layer and KV head, for each calibration with a selection-aware fit: the choice and, for each
    candidate, the held-out attention mass on the top-k, the top-k recall and the attention output's
    error from the calibration header (a measure the file predates shows as -), next to the score
    variance that PCA and the query-aware basis capture at that d where the report computed it. [] if none."""
    parts = []
    for name, entry in zip(names, report.entries):
        fits = entry.calibration.info.get("selection_aware") or {}
        for d_key, record in sorted(fits.items(), key=lambda kv: int(kv[0])):
            d = int(d_key)
            sv = next((v for v in entry.score_variance or () if v.kind == "post" and v.d == d), None)
            rows = []
            for i, choice in enumerate(record["choice"]):
                for h, chosen in enumerate(choice):
                    cells = []
                    for key, _, fmt in SA_MEASURES:
                        values = record.get(f"heldout_{key}")
                        cells += [fmt.format(values[c][i][h]) if values else "-" for c in SA_CANDIDATES]
                    if sv is not None:
                        cells += [f"{float(sv.captured[b][i][h]):.3f}" for b in ("pca", "query_aware")]
                    rows.append([str(i), str(h), chosen, *cells])
            header = ["layer", "KV head", "chosen"]
            for _, label, _ in SA_MEASURES:
                header += [f"{label}: PCA", f"{label}: query-aware", f"{label}: fit"]
            if sv is not None:
                header += ["score variance: PCA", "score variance: query-aware"]
            kfs = ", ".join(f"{k:g}" for k in record.get("kf", ()))
            chosen_by = record.get("chosen_by", "heldout_mass").removeprefix("heldout_").replace("_", " ")
            parts += [
                f"### {name}: selection-aware basis (sa-post), d = {d}",
                f"On the calibration sample's held-out windows (per-row budgets, mean over kf {kfs}): the exact "
                "attention mass that falls on the top-k of the truncated scores, the share of the exact top-k "
                "it keeps (recall), and the relative squared error of the attention output over those keys "
                f"(lower is better); `sa-post` keeps, per head, the candidate with the best {chosen_by} "
                "(calib/selection_aware.py).",
                _md_table(header, rows, text_columns=3),
            ]
    return (["## Selection-aware fits"] + parts) if parts else []


def report_markdown(report: RankReport, figures: FigureFiles) -> str:
    facts = report.facts
    names = file_labels(report)
    t = report.threshold
    parts = [
        f"# Rank report: {facts.model_id}",
        f"{facts.architecture}, {facts.num_layers} layers, {facts.num_heads} query heads, "
        f"{facts.num_kv_heads} KV heads, head dimension D = {facts.head_dim}"
        + (f", revision `{facts.revision}`" if facts.revision else "") + ".",
        "## Calibrations",
        _md_sources(report, names),
        "## How ranks are counted",
        "For each layer, KV head, and keys before (pre) or after (post) RoPE, the rank at a threshold v is "
        "the smallest d >= 1 with (λ1 + … + λd) / (λ1 + … + λD) >= v (within 1e-9 for float rounding), "
        "where λ are the eigenvalues, descending, of the covariance of that head's keys (centred on their "
        f"mean) and D = {facts.head_dim}. A rank of D means the keys need every direction.",
        "## Summary",
        "Rank over all layers and KV heads: mean (share of D), min-max.",
        _md_summary(report, names),
        f"![rank per layer]({figures.rank_per_layer})",
        *_md_score_variance(report, names, figures),
        *_md_selection_aware(report, names),
    ]
    for name, entry, files in zip(names, report.entries, figures.per_entry):
        parts += [
            f"## {name}: `{dataset(entry)}`",
            f"Mean rank over KV heads per layer at each threshold; per-head ranks at {pct(t)}.",
            _md_layers(report, entry),
            f"![rank heatmap]({files['heatmap']})",
            f"![cumulative explained variance]({files['cumulative']})",
            f"![eigenvalue spectrum]({files['spectrum']})",
        ]
    if report.comparisons:
        parts += [
            "## Comparisons",
            f"For each ordered pair (A, B), layer, KV head and kind, d is A's rank at {pct(t)} (the reference "
            "threshold: 0.9 when asked for, else the middle one), so A→B and B→A differ.",
            "- **agreement**: mean squared cosine of the principal angles between A's and B's top-d "
            "subspaces, ‖P_A P_Bᵀ‖²_F / d: 1 for the same subspace, 0 for orthogonal ones.",
            "- **captured variance**: the share of B's key variance inside A's top-d subspace, "
            "trace(U_Aᵀ C_B U_A) / trace(C_B), with C_B rebuilt from B's eigenvalues and components. "
            "This is what a Loki basis calibrated on A keeps of B's keys.",
            "- **own variance**: the same share for B's own top-d subspace, the most any d directions can "
            "capture; captured variance is at most this.",
            "Means over layers and KV heads (min over them in brackets):",
            _md_comparison_summary(report, names),
            f"![comparison]({figures.comparison})",
        ]
        for pair in report.comparisons:
            parts += [
                f"### {names[pair.a]} → {names[pair.b]}",
                "Means over KV heads per layer.",
                _md_comparison_layers(report, pair),
            ]
    parts.append("All numbers, per head, are in `report.json`.")
    return "\n\n".join(parts) + "\n"

