"""`lokitool calibrate`: flags -> CalibrateConfig -> calib.run -> rank table and the calibration file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..calib.config import CalibrateConfig
from .app import app, console, out, progress_bar
from .options import Device, Dtype, float_list, listed


@app.command()
def calibrate(
    model: str = typer.Option(CalibrateConfig.model, help="`default` (embedded SmolLM2-135M), hub id[@revision], model folder or .gguf file."),
    dataset: str = typer.Option(CalibrateConfig.dataset, help="`default` (older State of the Union speeches), .txt/.jsonl file, folder, sotu:SPLIT, or hub name:config:split."),
    num_tokens: int = typer.Option(CalibrateConfig.num_tokens, help="Tokens to calibrate on, in all."),
    seq_len: int = typer.Option(CalibrateConfig.seq_len, help="Window length in tokens."),
    output: Path = typer.Option(CalibrateConfig.output, help="Calibration file to write (atomically)."),
    batch_size: int = typer.Option(CalibrateConfig.batch_size, help="Windows per forward pass."),
    device: Device = CalibrateConfig.device,
    dtype: Dtype = CalibrateConfig.dtype,
    bos: bool = typer.Option(CalibrateConfig.bos, "--bos/--no-bos", help="Start every window with the BOS token."),
    queries: bool = typer.Option(CalibrateConfig.queries, "--queries/--no-queries", help="Also stream query second moments (for query-aware bases)."),
    device_map: Optional[str] = typer.Option(CalibrateConfig.device_map, help="`auto` or `balanced`: spread a model too large for one GPU over the visible GPUs (accelerate)."),
    encoding: str = typer.Option(CalibrateConfig.encoding, help="Encoding of local .txt/.jsonl text (e.g. latin-1)."),
    sa_df: str = typer.Option(listed(CalibrateConfig.sa_df) or "none", help="Budgets d/D (comma-separated, e.g. 0.25) to fit the selection-aware basis sa-post for; `none` (default) fits none."),
) -> None:
    """Collect keys through forward hooks and fit PCA per layer and KV head, before and after RoPE."""
    import contextlib
    import time

    from ..calib import run as calib
    from ..calib.distributed import process_group
    from ..calib.pca import rank_at_variance

    config = CalibrateConfig(
        model=model, dataset=dataset, num_tokens=num_tokens, seq_len=seq_len, output=output,
        batch_size=batch_size, device=device, dtype=dtype, bos=bos, queries=queries, device_map=device_map,
        encoding=encoding, sa_df=() if sa_df.strip().lower() == "none" else float_list(sa_df, "--sa-df"),
    )
    with process_group(device) as world:  # torchrun: one process per GPU; otherwise a no-op
        with console.status(f"loading {model} and {dataset} text") if world.is_main else contextlib.nullcontext():
            job = calib.prepare(config)
        if not world.is_main:
            calib.run(job, world=world)
            return
        with progress_bar() as bar:
            task = bar.add_task("calibrating", total=job.windows.num_tokens, rate="")
            start = time.perf_counter()

            def progress(done: int, total: int) -> None:
                rate = done / max(time.perf_counter() - start, 1e-9)
                bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} tok/s")

            fit_task = None

            def fit_progress(done: int, total: int) -> None:
                nonlocal fit_task
                if fit_task is None:
                    fit_task = bar.add_task("selection-aware fit (heads)", total=total, rate="")
                bar.update(fit_task, completed=done, total=total)

            result = calib.run(job, progress, world, fit_progress)

    cal = result.calibration
    table = Table(title=f"rank at 90% explained variance (of {cal.facts.head_dim}), mean over KV heads")
    table.add_column("layer", justify="right")
    table.add_column("pre-RoPE", justify="right")
    table.add_column("post-RoPE", justify="right")
    pre = rank_at_variance(cal.pca["pre"].eigenvalues, 0.9).double().mean(-1)
    post = rank_at_variance(cal.pca["post"].eigenvalues, 0.9).double().mean(-1)
    for i in range(cal.facts.num_layers):
        table.add_row(str(i), f"{pre[i]:.1f}", f"{post[i]:.1f}")
    table.add_row("mean", f"{pre.mean():.1f}", f"{post.mean():.1f}", style="bold")
    out.print(table)
    from ..calib.selection_aware import summary

    for d, report in cal.info.get("selection_aware", {}).items():
        for line in summary(report):
            out.print(f"sa-post d={d}: {line}")
    if config.sa_df and "selection_aware" not in cal.info:
        out.print("no selection-aware fit (sa-post): it needs query statistics and at least two windows")
    procs = f" on {world.size} processes" if world.distributed else ""
    out.print(
        f"{cal.info['num_tokens']:,} tokens{procs} in {result.seconds:.1f} s "
        f"({cal.info['num_tokens'] / result.seconds:,.0f} tok/s); wrote {output}"
    )
