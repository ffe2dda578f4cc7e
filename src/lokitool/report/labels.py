"""Words shared by every output of the report (report.json, report.md, figures, terminal tables)."""

from __future__ import annotations

KIND_LABEL = {"pre": "pre-RoPE", "post": "post-RoPE"}
BASIS_LABEL = {"pca": "PCA (Loki)", "random": "random", "query_aware": "query-aware"}
NO_QUERIES_NOTE = (
    "no query statistics in this file (calibrated with --no-queries): score variance not reported; "
    "recalibrate without --no-queries to get it"
)


def pct(v: float) -> str:
    """0.9 -> '90%'."""
    return f"{v * 100:g}%"
