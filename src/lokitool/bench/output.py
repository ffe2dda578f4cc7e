"""`lokitool bench`'s files: one CSV row per (point, method), appended to bench.csv, and the
latency plot drawn from it (bench.png)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .. import fileio
from ..fileio import atomic_path

if TYPE_CHECKING:
    from .environment import Environment
    from .kernels import BenchConfig, MethodResult, Point

CSV_COLUMNS = [
    "gpu", "method", "batch", "heads", "kv_heads", "head_dim", "seq_len", "kf", "df", "d", "k", "group", "layout", "select", "dtype",
    "median_ms", "p10_ms", "p90_ms", "plain_ms", "gbps", "frac_copy_bw", "floor_ms", "speedup_vs_sdpa", "plain_speedup_vs_sdpa",
    "byte_ceiling", "score_ms", "select_ms", "attn_ms", "score_gbps", "attn_gbps", "peak_mem_mb", "max_err_vs_loki_torch",
    "copy_gbps", "note", "torch", "triton", "cuda", "lokitool", "git", "timestamp",
]


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _fmt_rate(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def make_row(method: str, p: Point, res: MethodResult, env: Environment, cfg: BenchConfig, sdpa: MethodResult | None,
             ref: torch.Tensor | None, stamp: str) -> dict[str, str]:
    """One bench.csv row. median_ms is the CUDA-graph median, plain_ms the median of plain launches;
    each speedup divides SDPA's figure of the same kind by this method's. byte_ceiling (Loki
    methods) is the most a method moving p.loki_bytes can gain over one moving the whole cache."""
    bw = env.copy_gbps
    loki = method != "sdpa"
    moved = p.loki_bytes if loki else p.kv_bytes
    gbps = moved / (res.median_ms * 1e-3) / 1e9 if res.median_ms else None
    floor_ms = moved / (bw * 1e9) * 1e3 if bw else None
    err = None
    if ref is not None and res.output is not None and method == "loki-triton":
        err = float((res.output - ref).abs().max())
    st = res.stages
    return {
        "gpu": env.gpu, "method": method, "batch": str(p.batch), "heads": str(p.heads), "kv_heads": str(p.kv_heads),
        "head_dim": str(p.head_dim), "seq_len": str(p.seq_len), "kf": str(cfg.spec.kf), "df": str(cfg.spec.df), "d": str(p.d),
        "k": str(p.k), "group": p.group, "layout": p.layout if method == "loki-triton" else "plain",
        "select": res.select, "dtype": cfg.dtype,
        "median_ms": _fmt(res.median_ms), "p10_ms": _fmt(res.p10_ms), "p90_ms": _fmt(res.p90_ms), "plain_ms": _fmt(res.plain_ms),
        "gbps": _fmt_rate(gbps), "frac_copy_bw": _fmt(gbps / bw if gbps and bw else None, 3), "floor_ms": _fmt(floor_ms),
        "speedup_vs_sdpa": _fmt(_ratio(sdpa.median_ms if sdpa else None, res.median_ms), 3),
        "plain_speedup_vs_sdpa": _fmt(_ratio(sdpa.plain_ms if sdpa else None, res.plain_ms), 3),
        "byte_ceiling": _fmt(p.byte_ceiling if loki else None, 3),
        "score_ms": _fmt(st.get("score")), "select_ms": _fmt(st.get("select")), "attn_ms": _fmt(st.get("attn")),
        "score_gbps": _fmt_rate(p.score_bytes / (st["score"] * 1e-3) / 1e9 if st.get("score") else None),
        "attn_gbps": _fmt_rate(p.attn_bytes / (st["attn"] * 1e-3) / 1e9 if st.get("attn") else None),
        "peak_mem_mb": _fmt(res.peak_mem_mb, 1), "max_err_vs_loki_torch": _fmt(err, 6),
        "copy_gbps": _fmt_rate(bw), "note": res.note,
        "torch": env.torch, "triton": env.triton, "cuda": env.cuda, "lokitool": env.lokitool, "git": env.git,
        "timestamp": stamp,
    }


def append_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """Append rows to a bench.csv with CSV_COLUMNS, rewriting it atomically."""
    fileio.append_csv(path, CSV_COLUMNS, rows)


def plot_latency(csv_path: Path, png_path: Path, order: Sequence[str] = ()) -> None:
    """Median (CUDA-graph) latency against context length, one panel per batch size, one line per
    method (listed in `order` first), for the GPU, shape and settings of the newest row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["median_ms"]]
    if not rows:
        return
    last = rows[-1]
    same = ("gpu", "heads", "kv_heads", "head_dim", "kf", "df", "group", "dtype")
    rows = [r for r in rows if all(r[c] == last[c] for c in same)]
    latest: dict[tuple, dict] = {}
    for r in rows:  # newest measurement of each point wins
        label = f"loki-triton ({r['layout']})" if r["method"] == "loki-triton" else r["method"]
        latest[(label, int(r["batch"]), int(r["seq_len"]))] = r
    batches = sorted({key[1] for key in latest})
    rank = lambda m: (list(order).index(m) if m in order else len(order), m)  # noqa: E731
    labels = sorted({key[0] for key in latest}, key=lambda label: (rank(label.split(" ")[0]), label))
    colors = {m: f"C{i}" for i, m in enumerate(labels)}  # one color per method in every panel
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method in labels:
            pts = sorted((s, float(r["median_ms"])) for (m, bb, s), r in latest.items() if m == method and bb == batch)
            if pts:
                ax.plot([s for s, _ in pts], [t for _, t in pts], marker="o", label=method, color=colors[method])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode attention, median ms")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{last['gpu']}: H={last['heads']} Hkv={last['kv_heads']} D={last['head_dim']} {last['dtype']} "
                 f"kf={last['kf']} df={last['df']} group={last['group']}", fontsize=9)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
