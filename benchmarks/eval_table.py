"""Markdown table of `lokitool eval --ppl` results: python benchmarks/eval_table.py FILE [FILE ...]
(results JSON files), one row per result, with the full-attention perplexity of the same windows
as the reference. `--plot PNG` also draws perplexity against kf for the per-row, sink-0, df=0.25
points selected per query head of all files together (a later file's point replaces an earlier one of the same label)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def plot(files: list[str], png: str) -> None:
    from lokitool.evals.ppl import Result, plot_sweep

    points = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["results"]:
            shared = r.get("group") == "kv"
            if r["method"] == "full" or (r["budget"] == "per-row" and not r["sink"] and r["df"] in (None, 0.25) and not shared):
                points[(r["method"], r["basis"], r["kf"])] = Result(**r)
    plot_sweep(points.values(), Path(png), title="SmolLM2-135M, held-out speeches, per-row budgets, df = 0.25")


def main(files: list[str]) -> None:
    print("| run | method | basis | kf | df | budget | sink | perplexity | vs full | kept | Jaccard vs exact top-k |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    full = None
    for f in files:
        doc = json.loads(Path(f).read_text())
        for r in doc["results"]:
            if r["method"] == "full":
                full = r["perplexity"]
            print(
                f"| {Path(f).stem} | {r['method']} | {r['basis'] or '-'} | {fmt(r['kf'], 'g')} | {fmt(r['df'], 'g')} | "
                f"{r['budget'] or '-'} | {fmt(r['sink'], 'd')} | {r['perplexity']:.2f} | "
                f"{fmt(r['perplexity'] / full if full else None, '.2f')} | {fmt(r['kept_fraction'], '.3f')} | {fmt(r['jaccard'], '.3f')} |"
            )


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--plot"]:
        plot(args[2:], args[1])
    else:
        main(args)
