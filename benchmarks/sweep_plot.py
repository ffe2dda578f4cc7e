"""Summary and plot of a bench sweep (benchmarks/bench_sweep.sh): speedup of loki-triton over SDPA
against context length, CUDA-graph replays and plain launches, one line per model and batch size.

    python benchmarks/sweep_plot.py llama2-13b=DIR/llama2-13b/bench.csv llama3-8b-kv=DIR/... --out DIR

Reads bench.csv files (the columns of lokitool.bench.output), keeps the loki-triton rows and writes
sweep.csv and sweep.json (model, batch, context, selection group and mode, SDPA and Loki medians,
both speedups, byte ceiling, note) and sweep.png to --out. Skipped points (a note, no time) are
listed, not plotted. A missing csv (a model whose bench failed) is reported and left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from lokitool.fileio import write_text_atomic

COLUMNS = [
    "model", "batch", "seq_len", "group", "select", "sdpa_ms", "loki_ms", "speedup", "sdpa_plain_ms", "loki_plain_ms",
    "plain_speedup", "byte_ceiling", "select_ms", "note",
]


def _float(x: str) -> float | None:
    return float(x) if x not in ("", None) else None


def summarize(model: str, path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    sdpa = {(r["batch"], r["seq_len"]): r for r in rows if r["method"] == "sdpa"}
    out = []
    for r in rows:
        if r["method"] != "loki-triton":
            continue
        s = sdpa.get((r["batch"], r["seq_len"]), {})
        out.append({
            "model": model, "batch": int(r["batch"]), "seq_len": int(r["seq_len"]), "group": r["group"], "select": r.get("select", ""),
            "sdpa_ms": _float(s.get("median_ms", "")), "loki_ms": _float(r.get("median_ms", "")), "speedup": _float(r.get("speedup_vs_sdpa", "")),
            "sdpa_plain_ms": _float(s.get("plain_ms", "")), "loki_plain_ms": _float(r.get("plain_ms", "")),
            "plain_speedup": _float(r.get("plain_speedup_vs_sdpa", "")), "byte_ceiling": _float(r.get("byte_ceiling", "")),
            "select_ms": _float(r.get("select_ms", "")), "note": r.get("note", "") or s.get("note", ""),
        })
    return out


def plot(points: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    lines = sorted({(p["model"], p["batch"]) for p in points})
    for ax, key, name in ((axes[0], "speedup", "CUDA graph"), (axes[1], "plain_speedup", "plain launches")):
        for i, (model, batch) in enumerate(lines):
            pts = sorted((p["seq_len"], p[key]) for p in points if (p["model"], p["batch"]) == (model, batch) and p[key])
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{i}", label=f"{model} B={batch}")
            ceil = [p["byte_ceiling"] for p in points if (p["model"], p["batch"]) == (model, batch) and p["byte_ceiling"]]
            if ceil:
                ax.axhline(ceil[0], color=f"C{i}", linestyle=":", linewidth=0.8)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"vs SDPA, {name}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup over SDPA (dotted: byte ceiling)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csvs", nargs="+", help="MODEL=path/to/bench.csv")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    points, missing, gpu = [], [], ""
    for item in args.csvs:
        model, _, path = item.partition("=")
        if not Path(path).is_file():
            missing.append(model)
            continue
        points += summarize(model, Path(path))
        with open(path, newline="") as f:
            gpu = gpu or next(csv.DictReader(f), {}).get("gpu", "")
    if not points:
        sys.exit(f"no loki-triton rows in {', '.join(args.csvs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    buf = [",".join(COLUMNS)]
    for p in points:
        buf.append(",".join("" if p[c] is None else str(p[c]) for c in COLUMNS))
    write_text_atomic(args.out / "sweep.csv", "\n".join(buf) + "\n")
    write_text_atomic(args.out / "sweep.json", json.dumps({"gpu": gpu, "missing": missing, "points": points}, indent=1))
    plot(points, args.out / "sweep.png", f"{gpu}: loki-triton, fp16, kf = df = 0.25, two-plane keys")
    print(f"{'model':14} {'B':>3} {'S':>7} {'select':6} {'sdpa ms':>8} {'loki ms':>8} {'x graph':>7} {'x plain':>7} {'ceiling':>7}  note")
    for p in sorted(points, key=lambda p: (p["model"], p["batch"], p["seq_len"])):
        f = lambda x, d=4: "-" if x is None else f"{x:.{d}f}"
        print(f"{p['model']:14} {p['batch']:3d} {p['seq_len']:7d} {p['select']:6} {f(p['sdpa_ms']):>8} {f(p['loki_ms']):>8} "
              f"{f(p['speedup'], 2):>7} {f(p['plain_speedup'], 2):>7} {f(p['byte_ceiling'], 2):>7}  {p['note']}")
    if missing:
        print(f"missing (bench failed or not run): {', '.join(missing)}")
    print(f"wrote {args.out / 'sweep.csv'}, {args.out / 'sweep.json'}, {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()
