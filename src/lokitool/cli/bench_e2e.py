"""`lokitool bench-e2e`: flags -> E2EConfig -> run_e2e -> table, e2e.json and rows appended to e2e.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UserError
from ..fileio import append_csv
from .app import app, console, out
from .options import Device, Dtype, int_list

CSV_COLUMNS = [
    "device", "model", "method", "batch", "prompt_len", "new_tokens", "kf", "df", "d", "group", "dtype", "per_token_ms", "p10_ms",
    "p90_ms", "tokens_per_s", "compiled", "fused_qkv", "fused_mlp", "eager_ms", "floor_ms", "x_floor", "floor_fraction", "speedup_vs_full_graph", "speedup_vs_full",
    "mean_context", "weights_gb", "floor_gb", "bandwidth_gbs", "attention_share", "cache_share", "other_share", "prefill_s",
    "cache_mb", "peak_mem_mb", "finite_logits", "torch", "transformers", "triton", "cuda", "lokitool", "git", "timestamp",
]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


@app.command("bench-e2e")
def bench_e2e_command(
    model: str = typer.Option("default", help="`default` (embedded SmolLM2-135M), a load spec, or a random-weight preset (bench/presets.py): llama2-7b, llama3-8b, tiny, ..."),
    batch_size: str = typer.Option("1", help="Sequences decoded together; comma-separated for a sweep."),
    prompt_len: str = typer.Option("512", help="Prompt tokens; comma-separated for a sweep."),
    new_tokens: int = typer.Option(32, help="Timed decode steps per method."),
    kf: float = typer.Option(0.25, help="Loki token budget fraction."),
    df: float = typer.Option(0.25, help="Loki dimension budget fraction."),
    methods: str = typer.Option("full-graph,loki-graph", help="Comma-separated: full-graph, loki-graph (the static loop, one CUDA graph per step), full, full-prealloc, loki (the eager loop)."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration file (default: a random orthonormal basis: same speed)."),
    basis: str = typer.Option("post", help="Basis kind when a calibration is given."),
    group: str = typer.Option("head", help="Loki selection per query head (head) or per KV head (kv)."),
    warmup: int = typer.Option(4, help="Untimed decode steps first (kernel compilation, autotuning)."),
    profile_tokens: int = typer.Option(8, help="Extra steps synchronized around attention and cache updates, for the time shares."),
    prefill_chunk: int = typer.Option(2048, help="Prefill the prompt in chunks of this many tokens (bounds activation memory)."),
    fill: str = typer.Option("random", help="Static loop only: `random` fills the cache with random keys and values (same decode speed, no prefill), `prefill` runs the model over the prompt."),
    eager_tokens: int = typer.Option(2, help="Static loop only: plain (non-graph) steps timed before the graph is captured."),
    compile_parts: bool = typer.Option(False, "--compile/--no-compile", help="Static loop only: run the model's RMS norms and MLPs through torch.compile (fewer kernels per step)."),
    output_path: Path = typer.Option(Path("runs/e2e"), help="Directory for e2e.json (this run) and e2e.csv (appended)."),
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """End-to-end decode speed: tokens/s, per-token latency against the memory floor, full attention vs Loki."""
    import gc

    import torch

    from .. import results
    from ..bench import e2e
    from ..fileio import ensure_writable_dir

    configs = [
        e2e.E2EConfig(
            model=model, batch=b, prompt_len=p, new_tokens=new_tokens, kf=kf, df=df,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()), device=device, dtype=dtype,
            calibration=str(calibration) if calibration else None, basis=basis, group=group, warmup=warmup,
            profile_tokens=profile_tokens, prefill_chunk=prefill_chunk, fill=fill, eager_tokens=eager_tokens, compile_parts=compile_parts,
        )
        for b in int_list(batch_size, "--batch-size") for p in int_list(prompt_len, "--prompt-len")
    ]
    ensure_writable_dir(output_path)
    with console.status(f"loading {model}"):
        loaded = e2e.load(model, device, dtype)
    rows = []
    for cfg in configs:
        try:
            got = e2e.run_e2e(cfg, loaded, progress=lambda msg: console.print(f"  {msg}"))
        except torch.OutOfMemoryError:  # a point that does not fit the GPU must not lose the others
            console.print(f"[yellow]out of memory[/yellow] at batch {cfg.batch}, prompt {cfg.prompt_len}; skipped")
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.extend(got)
        append_csv(output_path / "e2e.csv", CSV_COLUMNS, got)
        results.write_results(output_path, "e2e", {"configs": [e2e.config_dict(c) for c in configs], "results": rows}, keep_dated=False)

    if not rows:
        raise UserError("no point ran (all out of memory); lower --batch-size or --prompt-len")
    table = Table(title=f"end-to-end greedy decoding, {rows[0]['model']} ({rows[0]['dtype']}, {rows[0]['device']})")
    for col in ("method", "batch", "prompt", "ms/token", "p10-p90", "tokens/s", "plain ms", "floor ms", "x floor",
                "vs full-graph", "vs full", "cache MB", "peak MB"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"] + (" +compile" if r.get("compiled") else "") + (" +qkv" if r.get("fused_qkv") else "") + (" +mlp" if r.get("fused_mlp") else "") + (f" kf={r['kf']:g} df={r['df']:g} {r['group']}" if r["kf"] is not None else ""), str(r["batch"]),
            str(r["prompt_len"]), f"{r['per_token_ms']:.2f}", f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}", f"{r['tokens_per_s']:.1f}",
            _fmt(r.get("eager_ms"), ".1f"), f"{r['floor_ms']:.2f}", f"{r['x_floor']:.2f}", _fmt(r["speedup_vs_full_graph"], ".2f"),
            _fmt(r["speedup_vs_full"], ".2f"), f"{r['cache_mb']:.0f}", _fmt(r["peak_mem_mb"], ".0f"),
        )
    out.print(table)
    out.print(f"wrote {output_path / 'e2e.json'} and appended to e2e.csv")
