"""The static-loop rows of a `bench-e2e` e2e.csv as a markdown table and a plot of ms/token against
context (full attention, Loki, the memory floor), one panel per model and batch size.

    python benchmarks/e2e_table.py runs/e2e_gpu/e2e.csv --out reports/e2e/static
writes OUT/table.md and OUT/e2e.png (compiled rows, `--compile`, get their own table section).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from lokitool.fileio import atomic_path, write_text_atomic

GRAPH = ("full-graph", "loki-graph")


def _f(x: str, spec: str) -> str:
    return "-" if x in ("", None) else format(float(x), spec)


def read_rows(path: Path) -> list[dict]:
    rows = [r for r in csv.DictReader(path.open()) if r["method"] in GRAPH]
    return sorted(rows, key=lambda r: (r["model"], -int(r["batch"]), int(r["prompt_len"]), r.get("compiled") == "True",
                                       GRAPH.index(r["method"]), r["group"]))


def table(rows: list[dict]) -> str:
    head = ("| model | B | prompt | method | ms/token (p10-p90) | tokens/s | plain ms | floor ms | x floor | vs full-graph |\n"
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        method = r["method"] if r["method"] == "full-graph" else f"loki-graph ({r['group']})"
        vs = _f(r["speedup_vs_full_graph"], ".2f")
        lines.append(
            f"| {r['model'].removeprefix('random-')} | {r['batch']} | {r['prompt_len']} | {method} | "
            f"{_f(r['per_token_ms'], '.2f')} ({_f(r['p10_ms'], '.2f')}-{_f(r['p90_ms'], '.2f')}) | {_f(r['tokens_per_s'], '.0f')} | "
            f"{_f(r['eager_ms'], '.1f')} | {_f(r['floor_ms'], '.2f')} | {_f(r['x_floor'], '.2f')} | "
            f"{('**' + vs + '**') if r['method'] == 'loki-graph' else vs} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compiled = not any(r.get("compiled") != "True" for r in rows)  # plot the plain rows, or the compiled ones if there are no others
    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if (r.get("compiled") == "True") == compiled:
            panels[(r["model"].removeprefix("random-"), r["batch"])].append(r)
    panels = {k: v for k, v in panels.items() if len({r["prompt_len"] for r in v}) > 1}
    if not panels:
        print(f"no model and batch with two or more prompt lengths: {path} not written")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, ((model, batch), prs) in zip(axes[0], sorted(panels.items(), key=lambda kv: (kv[0][0], int(kv[0][1])))):
        series = sorted({(r["method"], r["group"]) for r in prs}, key=lambda mg: (GRAPH.index(mg[0]), mg[1]))
        for method, group in series:
            pts = sorted((int(r["prompt_len"]), float(r["per_token_ms"])) for r in prs if (r["method"], r["group"]) == (method, group))
            label = method if method == "full-graph" else f"loki-graph (kf=df=0.25, per {group})"
            ax.plot([p for p, _ in pts], [m for _, m in pts], "o-" if method == "full-graph" else "s-", label=label)
        floor = sorted({(int(r["prompt_len"]), float(r["floor_ms"])) for r in prs if r["method"] == "full-graph"})
        ax.plot([p for p, _ in floor], [m for _, m in floor], "k--", label="memory floor (full)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("ms / token")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{model}, batch {batch}{' (--compile)' if compiled else ''}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = read_rows(args.csv)
    args.out.mkdir(parents=True, exist_ok=True)
    plain = [r for r in rows if r.get("compiled") != "True"]
    compiled = [r for r in rows if r.get("compiled") == "True"]
    sections = ([table(plain)] if plain else []) + (["With the norms and MLPs compiled (`--compile`):\n\n" + table(compiled)] if compiled else [])
    text = "\n".join(sections)
    write_text_atomic(args.out / "table.md", text)
    plot(rows, args.out / "e2e.png")
    print(text)


if __name__ == "__main__":
    main()
