"""The command: check the settings and the output folder, load, compute, then write every file atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..fileio import atomic_path, ensure_writable_dir, write_text_atomic
from . import figures
from .document import dumps, report_json
from .layout import REPORT_JSON, REPORT_MD, figure_files
from .markdown import report_markdown
from .numbers import Progress, RankReport, build_report, load_calibrations
from .settings import DEFAULT_DIMS, DEFAULT_VARIANCE, parse_dims, parse_variance


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_report(report: RankReport, output_dir: Path) -> list[Path]:
    """Write the figures, report.json and report.md (each atomically); return their paths."""
    output_dir = ensure_writable_dir(Path(output_dir))
    files = figure_files(report)
    plots = [(files.rank_per_layer, lambda: figures.plot_rank_per_layer(report))]
    for entry, names in zip(report.entries, files.per_entry):
        plots += [
            (names["heatmap"], lambda e=entry: figures.plot_heatmap(report, e)),
            (names["cumulative"], lambda e=entry: figures.plot_cumulative(report, e)),
            (names["spectrum"], lambda e=entry: figures.plot_spectrum(report, e)),
        ]
        if "score_variance" in names:
            plots.append((names["score_variance"], lambda e=entry: figures.plot_score_variance(report, e)))
    if files.comparison:
        plots.append((files.comparison, lambda: figures.plot_comparisons(report)))
    written = []
    for name, make in plots:
        _save_figure(make(), output_dir / name)
        written.append(output_dir / name)
    write_text_atomic(output_dir / REPORT_JSON, dumps(report_json(report)))
    write_text_atomic(output_dir / REPORT_MD, report_markdown(report, files))
    return written + [output_dir / REPORT_JSON, output_dir / REPORT_MD]


def run(
    paths: Sequence[str | Path],
    output_dir: Path,
    variance: str = DEFAULT_VARIANCE,
    dims: str = DEFAULT_DIMS,
    progress: Progress | None = None,
) -> tuple[RankReport, list[Path]]:
    """The whole command: check the settings and the output folder, load, compute, write."""
    thresholds = parse_variance(variance)
    fractions = parse_dims(dims)
    ensure_writable_dir(Path(output_dir))  # before any work
    report = build_report(load_calibrations(paths), thresholds, fractions, progress)
    return report, write_report(report, output_dir)
