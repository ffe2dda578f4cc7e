"""Markdown table of `lokitool eval --ppl` results: python benchmarks/eval_table.py DIR [DIR ...]
(each DIR holding a results.json), one row per result, with the full-attention perplexity of
the same windows as the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main(dirs: list[str]) -> None:
    print("| run | method | basis | kf | df | budget | sink | perplexity | vs full | kept | Jaccard vs exact top-k |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
    full = None
    for d in dirs:
        doc = json.loads((Path(d) / "results.json").read_text())
        for r in doc["results"]:
            if r["method"] == "full":
                full = r["perplexity"]
            print(
                f"| {Path(d).name} | {r['method']} | {r['basis'] or '-'} | {fmt(r['kf'], 'g')} | {fmt(r['df'], 'g')} | "
                f"{r['budget'] or '-'} | {fmt(r['sink'], 'd')} | {r['perplexity']:.2f} | "
                f"{fmt(r['perplexity'] / full if full else None, '.2f')} | {fmt(r['kept_fraction'], '.3f')} | {fmt(r['jaccard'], '.3f')} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
