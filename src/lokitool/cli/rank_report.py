"""`lokitool rank-report`: flags in, `report.writer.run`, tables out. The numbers and files live in lokitool.report."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from .app import app, console, out


@app.command("rank-report")
def rank_report(
    calibrations: List[Path] = typer.Argument(..., help="Calibration files from `lokitool calibrate`, all of one model."),
    output_dir: Path = typer.Option(..., "--output-dir", help="Folder for report.md, report.json and the PNG figures (created if missing)."),
    variance: str = typer.Option("0.8,0.9,0.95", help="Explained-variance thresholds: comma-separated fractions in (0, 1]."),
    dims: str = typer.Option("0.25,0.5", help="Dimension budgets d for the score variance captured: comma-separated fractions of the head dimension in (0, 1]."),
) -> None:
    """Rank at explained-variance thresholds per layer and KV head, pre/post RoPE; score variance kept by truncated scores per basis; with several files, how well their subspaces agree."""
    from ..report.tables import terminal_tables
    from ..report.writer import run

    with console.status("rank report") as status:
        result, written = run(calibrations, output_dir, variance, dims, progress=status.update)
    for table in terminal_tables(result):
        out.print(table)
    figures = sum(path.suffix == ".png" for path in written)
    out.print(f"wrote {output_dir / 'report.md'}, {output_dir / 'report.json'} and {figures} figures")
