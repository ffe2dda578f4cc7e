"""`lokitool bench`: registers itself on the Typer app (cli.main imports this module)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .cli import app, console, out


@app.command("bench")
def bench(
    model: Optional[str] = typer.Option(None, "--model", help="Attention-shape preset: llama2-7b, llama2-13b (default), llama3-8b, mistral-7b, smollm2-135m, ..."),
    num_heads: Optional[int] = typer.Option(None, help="Query heads (overrides the preset)."),
    num_kv_heads: Optional[int] = typer.Option(None, help="KV heads (overrides the preset; default: --num-heads, i.e. MHA)."),
    head_dim: Optional[int] = typer.Option(None, help="Head dimension D (overrides the preset)."),
    batch_size: str = typer.Option("1,16", help="Comma-separated batch sizes."),
    seq_len: str = typer.Option("4096,16384,65536", help="Comma-separated context lengths (cached tokens)."),
    kf: float = typer.Option(0.25, help="Fraction of cached tokens kept: k = max(1, floor(kf x length))."),
    df: float = typer.Option(0.25, help="Fraction of key dims scored: d = round(df x D)."),
    dtype: str = typer.Option("float16", help="float16 or bfloat16."),
    methods: str = typer.Option("sdpa,loki-torch,loki-triton", help="Comma-separated: sdpa, loki-torch, loki-triton."),
    group: str = typer.Option("head", help="Selection granularity: head (per query head) or kv (shared per KV head)."),
    layout: str = typer.Option("split", help="loki-triton's key layout: split (d scored dims in their own plane) or plain."),
    output_path: Path = typer.Option(Path("runs/bench"), help="Folder for bench.csv (rows appended), bench.json and bench.png."),
    device: str = typer.Option("auto", help="auto or cuda (GPU timing); cpu times the PyTorch methods at small shapes."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write bench.png (latency against context length)."),
) -> None:
    """Time one decode step of Loki against SDPA: median latency, stages, GB/s vs the card's copy bandwidth."""
    from . import bench as lib

    heads, kv_heads, dim = lib.resolve_shape(model, num_heads, num_kv_heads, head_dim)
    config = lib.BenchConfig(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
        batch_sizes=lib.parse_int_list(batch_size, "--batch-size"), seq_lens=lib.parse_int_list(seq_len, "--seq-len"),
        kf=kf, df=df, dtype=dtype, methods=lib.parse_methods(methods), group=group, layout=layout, output_path=output_path,
        device=device, preset=model, plot=plot,
    )
    result = lib.run(config, progress=lambda msg: console.print(f"  {msg}", highlight=False))

    env = result.env
    bw = f", copy {env.copy_gbps:,.0f} GB/s" if env.copy_gbps else ""
    table = Table(title=f"{env.gpu}{bw}: H={heads} Hkv={kv_heads} D={dim} {dtype} kf={kf} df={df} (d={config.d}) group={group} layout={layout}")
    for col in ("B", "S", "method", "median ms", "p10-p90", "GB/s", "of copy", "vs sdpa", "score", "select", "attn", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for r in result.rows:
        spread = f"{r['p10_ms']}-{r['p90_ms']}" if r["p10_ms"] else ""
        table.add_row(r["batch"], r["seq_len"], r["method"], r["median_ms"], spread, r["gbps"], r["frac_copy_bw"],
                      r["speedup_vs_sdpa"], r["score_ms"], r["select_ms"], r["attn_ms"], r["note"])
    out.print(table)
    written = [str(result.csv_path), str(result.json_path)] + ([str(result.png_path)] if result.png_path else [])
    out.print(f"torch {env.torch}, triton {env.triton}; wrote {', '.join(written)}")
