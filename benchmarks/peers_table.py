"""Markdown table and plot of the selector comparison at equal bytes per decode step (issue 15):
python benchmarks/peers_table.py [--plot PNG] FILE [FILE ...] (results JSON of `eval --ppl --bytes`).
One row per result, sorted by bytes then perplexity; the full-attention perplexity of the same
windows is the reference. `--plot` draws perplexity against bytes read per step, a line per method."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def load(files: list[str]) -> list[dict]:
    return [r for f in files for r in json.loads(Path(f).read_text())["results"]]


def plot(rows: list[dict], png: str) -> None:
    from lokitool.evals.ppl import Result, plot_bytes

    plot_bytes([Result(**r) for r in rows], Path(png), title="SmolLM2-135M, held-out speeches, per-row budgets, kept sets per KV head (union)")


def label(r: dict) -> str:
    if r["method"] == "loki":
        return f"loki {r['basis']}"
    return r["method"]


def main(rows: list[dict]) -> None:
    full = next((r["perplexity"] for r in rows if r["method"] == "full"), None)
    print("| method | bytes | kf | d or r / page | perplexity | vs full | kept | Jaccard vs exact top-k |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (-round(r["bytes"] or 0, 4), r["perplexity"])):
        size = r["r"] if r.get("r") is not None else (f"P = {r['page']}" if r.get("page") else None)
        print(
            f"| {label(r)} | {fmt(r['bytes'], '.4g')} | {fmt(r['kf'], 'g')} | {size if size is not None else '-'} | "
            f"{r['perplexity']:.2f} | {fmt(r['perplexity'] / full if full else None, '.2f')} | "
            f"{fmt(r['kept_fraction'])} | {fmt(r['jaccard'])} |"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    png = None
    if args[:1] == ["--plot"]:
        png, args = args[1], args[2:]
    rows = load(args)
    main(rows)
    if png:
        plot(rows, png)
