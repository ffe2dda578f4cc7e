"""The output folder's file names: report.json, report.md and one PNG per figure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .numbers import RankReport

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass(frozen=True)
class FigureFiles:
    rank_per_layer: str
    per_entry: tuple[dict[str, str], ...]  # "heatmap" / "cumulative" / "spectrum" [/ "score_variance"] -> file name
    comparison: str | None

    def all(self) -> list[str]:
        names = [self.rank_per_layer, *(n for files in self.per_entry for n in files.values())]
        return names + ([self.comparison] if self.comparison else [])


def figure_files(report: RankReport) -> FigureFiles:
    per_entry = []
    for i, entry in enumerate(report.entries, 1):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(entry.file).stem)
        parts = ("heatmap", "cumulative", "spectrum") + (("score_variance",) if entry.score_variance is not None else ())
        per_entry.append({part: f"{i}-{stem}-{part}.png" for part in parts})
    comparison = "comparison.png" if report.comparisons else None
    return FigureFiles(rank_per_layer="rank_per_layer.png", per_entry=tuple(per_entry), comparison=comparison)
