"""Terminal tables: rich renderables (and one-line notes) that the CLI prints after the report is written."""

from __future__ import annotations

from typing import Sequence

from ..calib.calibration import KINDS
from .labels import BASIS_LABEL, KIND_LABEL, NO_QUERIES_NOTE, pct
from .numbers import SCORE_BASES, RankReport, file_labels, mean_rank


def terminal_tables(report: RankReport) -> list:
    from rich.table import Table

    names = file_labels(report)
    dim = report.facts.head_dim
    t = report.threshold
    summary = Table(title=f"rank over layers and KV heads: mean (min-max), of D = {dim}")
    summary.add_column("file")
    summary.add_column("keys")
    for v in report.variance:
        summary.add_column(f"{pct(v)}", justify="right")
    for name, entry in zip(names, report.entries):
        for kind in KINDS:
            cells = []
            for v in report.variance:
                r = entry.ranks[kind][v].double()
                cells.append(f"{r.mean():.1f} ({int(r.min())}-{int(r.max())})")
            summary.add_row(name, KIND_LABEL[kind], *cells)

    per_layer = Table(title=f"rank at {pct(t)} per layer, mean over KV heads")
    per_layer.add_column("layer", justify="right")
    for name in names:
        for kind in KINDS:
            per_layer.add_column(f"{name} {kind}" if len(names) > 1 else KIND_LABEL[kind], justify="right")
    for i in range(report.facts.num_layers):
        cells = [f"{float(mean_rank(e, kind, t)[i]):.1f}" for e in report.entries for kind in KINDS]
        per_layer.add_row(str(i), *cells)
    tables = [per_layer, summary]

    if report.comparisons:
        pairs = Table(title=f"A's top-d subspaces against B's keys, d = A's rank at {pct(t)}; means over layers and heads")
        for col in ("A (basis)", "B (keys)", "keys"):
            pairs.add_column(col)
        for col in ("mean d", "agreement", "captured", "own"):
            pairs.add_column(col, justify="right")
        for pair in report.comparisons:
            for kind, c in pair.kinds.items():
                pairs.add_row(
                    names[pair.a], names[pair.b], KIND_LABEL[kind], f"{c.d.double().mean():.1f}",
                    f"{c.agreement.mean():.3f}", f"{c.captured.mean():.3f}", f"{c.own.mean():.3f}",
                )
        tables.append(pairs)
    return tables + _terminal_score_variance(report, names)


def _terminal_score_variance(report: RankReport, names: Sequence[str]) -> list:
    from rich.table import Table

    notes = [f"{name}: {NO_QUERIES_NOTE}" for name, e in zip(names, report.entries) if e.score_variance is None]
    if len(notes) == len(report.entries):
        return notes
    table = Table(title=f"score variance captured by truncated scores, of D = {report.facts.head_dim}; means over layers and heads")
    for col in ("file", "keys"):
        table.add_column(col)
    for col in ("d", "key variance", *(BASIS_LABEL[b] for b in SCORE_BASES)):
        table.add_column(col, justify="right")
    for name, entry in zip(names, report.entries):
        for sv in entry.score_variance or ():
            table.add_row(
                name, KIND_LABEL[sv.kind], str(sv.d), f"{sv.key_variance.mean():.3f}",
                *(f"{sv.captured[b].mean():.3f}" for b in SCORE_BASES),
            )
    return [table, *notes]
