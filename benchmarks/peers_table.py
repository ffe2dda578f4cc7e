"""Markdown tables and plot of the selector comparison at equal bytes per decode step (issue 15):
python benchmarks/peers_table.py [--plot PNG] [--tasks TASKS_JSON ...] FILE [FILE ...]
(FILE: results JSON of `eval --ppl --bytes`; TASKS_JSON: results of `eval --tasks --bytes`, repeatable).

Perplexity table: one row per result, sorted by bytes then perplexity; the full-attention perplexity
of the same windows is the reference. Task table: one row per (method, bytes), the mean score over
its records (tasks x lengths x depths) and per task. `--plot` draws perplexity (and, with --tasks,
the mean task score beside it) against bytes read per step, one line per method."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def load(files: list[str]) -> list[dict]:
    return [r for f in files for r in json.loads(Path(f).read_text())["results"]]


def label(r: dict) -> str:
    if r["method"] == "loki":
        return f"loki {r['basis']}"
    return r["method"]


def task_points(rows: list[dict]) -> dict[tuple[str, float], dict]:
    """(method label, bytes) -> {"kf", "score" (mean over records), "per_task" {task: mean}, "n"}."""
    out: dict[tuple[str, float], dict] = {}
    for r in rows:
        p = out.setdefault((label(r), round(r["bytes"], 6)), {"kf": r["kf"], "scores": [], "per_task": {}})
        p["scores"].append(r["score"])
        p["per_task"].setdefault(r["task"], []).append(r["score"])
    for p in out.values():
        p["n"] = len(p["scores"])
        p["score"] = sum(p["scores"]) / p["n"]
        p["per_task"] = {t: sum(v) / len(v) for t, v in p["per_task"].items()}
    return out


def plot(rows: list[dict], task_rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if task_rows else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.6), squeeze=False)
    methods = sorted({label(r) for r in rows + task_rows if r["method"] != "full"})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}

    def draw(ax, points: dict[str, list[tuple[float, float]]], full: float | None, ylabel: str, log: bool) -> None:
        if full is not None:
            ax.axhline(full, color="black", linestyle="--", label=f"full ({full:.2f})")
        for m in methods:
            if m in points:
                xs, ys = zip(*sorted(points[m]))
                ax.plot(xs, ys, marker="o", color=colors[m], label=m)
        ax.set_xlabel("bytes read per decode step (full attention = 1)")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)

    ppl: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["method"] != "full":
            ppl.setdefault(label(r), []).append((r["bytes"], r["perplexity"]))
    full = next((r["perplexity"] for r in rows if r["method"] == "full"), None)
    draw(axes[0][0], ppl, full, "perplexity (log)", True)
    axes[0][0].set_title("perplexity, held-out speeches", fontsize=9)
    if task_rows:
        scores: dict[str, list[tuple[float, float]]] = {}
        full_score = None
        for (m, b), p in task_points(task_rows).items():
            if m == "full":
                full_score = p["score"]
            else:
                scores.setdefault(m, []).append((b, p["score"]))
        draw(axes[0][1], scores, full_score, "mean task score (string_match_all)", False)
        axes[0][1].set_ylim(-0.05, 1.05)
        tasks = sorted({r["task"] for r in task_rows})
        lengths = sorted({r["length"] for r in task_rows})
        axes[0][1].set_title(f"tasks {', '.join(tasks)} at {', '.join(map(str, lengths))} tokens", fontsize=9)
    fig.suptitle("SmolLM2-135M, per-row budgets, kept sets per KV head (union); H2O selects per query head", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def ppl_table(rows: list[dict]) -> None:
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


def task_table(rows: list[dict]) -> None:
    points = task_points(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    print("| method | bytes | kf | " + " | ".join(tasks) + " | mean score | records |")
    print("|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|")
    for (m, b), p in sorted(points.items(), key=lambda kv: (-kv[0][1], -kv[1]["score"], kv[0][0])):
        cells = " | ".join(f"{p['per_task'].get(t, float('nan')):.2f}" for t in tasks)
        print(f"| {m} | {b:.4g} | {fmt(p['kf'], 'g')} | {cells} | {p['score']:.2f} | {p['n']} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    png, tasks_files = None, []
    while args[:1] in (["--plot"], ["--tasks"]):
        if args[0] == "--plot":
            png = args[1]
        else:
            tasks_files.append(args[1])
        args = args[2:]
    rows = load(args)
    task_rows = load(tasks_files)
    ppl_table(rows)
    if task_rows:
        print()
        task_table(task_rows)
    if png:
        plot(rows, task_rows, png)
