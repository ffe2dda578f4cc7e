"""`lokitool bench`: registers itself on the Typer app (cli.main imports this module)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import app, console, out
from .options import int_list, word_list


@app.command("bench")
def bench(
    model: Optional[str] = typer.Option(None, "--model", help="Model preset (bench/presets.py), for its attention shape: llama2-7b, llama2-13b (default), llama3-8b, mistral-7b, qwen2.5-7b, smollm2-135m, ..."),
    num_heads: Optional[int] = typer.Option(None, help="Query heads (overrides the preset)."),
    num_kv_heads: Optional[int] = typer.Option(None, help="KV heads (overrides the preset; default: --num-heads, i.e. MHA)."),
    head_dim: Optional[int] = typer.Option(None, help="Head dimension D (overrides the preset)."),
    batch_size: Optional[str] = typer.Option(None, help="Comma-separated batch sizes [default: 1,16; with --e2e: 1]."),
    seq_len: Optional[str] = typer.Option(None, help="Comma-separated context lengths (cached tokens) [default: 4096,16384,65536; with --e2e, prompt lengths: 512]."),
    kf: float = typer.Option(0.25, help="Fraction of cached tokens kept: k = max(1, floor(kf x length))."),
    df: float = typer.Option(0.25, help="Fraction of key dims scored: d = round(df x D)."),
    dtype: Optional[str] = typer.Option(None, help="float16 or bfloat16 [default: float16; with --e2e: auto]."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated: sdpa, loki-torch, loki-triton [with --e2e: full-graph, loki-graph (the static loop), full, full-prealloc, loki (the eager loop)]."),
    group: str = typer.Option("head", help="Selection granularity: head (per query head) or kv (shared per KV head)."),
    layout: str = typer.Option("split", help="loki-triton's key layout: split (d scored dims in their own plane) or plain."),
    output_path: Path = typer.Option(Path("runs/bench"), help="Folder for bench.csv (rows appended), bench.json and bench.png."),
    device: str = typer.Option("auto", help="auto or cuda (GPU timing); cpu times the PyTorch methods at small shapes."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write bench.png (latency against context length)."),
    e2e: bool = typer.Option(False, "--e2e", help="End-to-end greedy decoding of a whole model instead (see `bench-e2e --help` for more options)."),
) -> None:
    """Time one decode step of Loki against SDPA: median latency, stages, GB/s vs the card's copy bandwidth.
    With --e2e: decode tokens/s of a whole model with a Loki KV cache against full attention."""
    if e2e:
        from .bench_e2e import bench_e2e_command

        bench_e2e_command(
            model=model or "default", batch_size=batch_size or "1", prompt_len=seq_len or "512", new_tokens=32, kf=kf, df=df,
            methods=methods or "full-graph,loki-graph", calibration=None, basis="post", group=group, warmup=4,
            profile_tokens=8, prefill_chunk=2048, fill="random", eager_tokens=2, compile_parts=False, output_path=output_path,
            device=device, dtype=dtype or "auto",
        )
        return
    from ..bench import kernels as lib
    from ..bench.presets import attention_shape
    from ..sparse.reference import LokiSpec

    batch_size = batch_size or "1,16"
    seq_len = seq_len or "4096,16384,65536"
    dtype = dtype or "float16"
    methods = methods or "sdpa,loki-torch,loki-triton"

    heads, kv_heads, dim = attention_shape(model, num_heads, num_kv_heads, head_dim)
    config = lib.BenchConfig(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
        batch_sizes=int_list(batch_size, "--batch-size"), seq_lens=int_list(seq_len, "--seq-len"),
        spec=LokiSpec(kf=kf, df=df, group=group), dtype=dtype, methods=word_list(methods), layout=layout, output_path=output_path,
        device=device, preset=model, plot=plot,
    )
    result = lib.run(config, progress=lambda msg: console.print(f"  {msg}", highlight=False))

    env = result.env
    bw = f", copy {env.copy_gbps:,.0f} GB/s" if env.copy_gbps else ""
    table = Table(title=f"{env.gpu}{bw}: H={heads} Hkv={kv_heads} D={dim} {dtype} kf={kf} df={df} (d={config.d}) group={group} layout={layout}")
    for col in ("B", "S", "method", "select", "median ms", "p10-p90", "plain ms", "GB/s", "of copy", "vs sdpa", "plain vs sdpa",
                "score", "select", "attn", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    # per-query-head selection on GQA reads each kept row once per query head: the byte ceiling
    # (full attention's bytes / Loki's) then says how much speedup there is to find at all
    show_ceiling = group == "head" and heads != kv_heads
    for r in result.rows:
        spread = f"{r['p10_ms']}-{r['p90_ms']}" if r["p10_ms"] else ""
        speedup = r["speedup_vs_sdpa"]
        if show_ceiling and r["byte_ceiling"] and r["method"] != "sdpa":
            speedup = f"{speedup or '-'} (ceiling {float(r['byte_ceiling']):.2f})"
        table.add_row(r["batch"], r["seq_len"], r["method"], r["select"], r["median_ms"], spread, r["plain_ms"], r["gbps"], r["frac_copy_bw"],
                      speedup, r["plain_speedup_vs_sdpa"], r["score_ms"], r["select_ms"], r["attn_ms"], r["note"])
    out.print(table)
    rows_per = f"{heads} rows (one per query head)" if group == "head" else f"{kv_heads} rows (one per KV head, shared by its {heads // kv_heads} query heads)"
    timing = ("median = CUDA-graph replays, plain = calls without an enclosing graph (loki-triton's from the third call: "
              "its own call graph for the same cache, LOKITOOL_CALL_GRAPHS=0 launches kernel by kernel)") if env.copy_gbps \
        else "median = plain = calls on the CPU"
    out.print(f"selection: group {group}, {rows_per} per sequence; select = how loki-triton ran (row: a top-k program per row, "
              f"split / pivot: a row over many programs, step: score, top-k and attention in one kernel; its score / select / attn "
              f"columns time the three-kernel stages); {timing}")
    written = [str(result.csv_path), str(result.json_path)] + ([str(result.png_path)] if result.png_path else [])
    out.print(f"torch {env.torch}, triton {env.triton}; wrote {', '.join(written)}")
