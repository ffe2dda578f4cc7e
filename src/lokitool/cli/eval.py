"""`lokitool eval --ppl`: flags -> EvalConfig -> evaluate -> table + results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import UserError
from ..evals.config import EvalConfig, TaskConfig
from .app import app, console, out
from .options import Device, Dtype, float_list, listed, sink_list, word_list


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = ("method", "kf", "df / v", "basis", "budget", "sink", "bytes", "perplexity", "vs full", "kept", "jaccard")
SQUEEZABLE = ("basis", "budget")  # may wrap; every other column keeps its values whole
DROP_WHEN_NARROW = ("jaccard", "budget", "sink", "bytes", "basis", "kept")  # in this order, while the table does not fit


def results_table(results, full: float | None, title: str, width: int | None = None) -> Table:
    """One row per point. Numbers and method names never wrap nor truncate: in a terminal too narrow
    for every column, the less important columns are left out (the results file has them all)."""
    rows = []
    for r in results:
        dim = r.df if r.df is not None else r.variance
        rows.append((
            r.method, _fmt(r.kf, "g"), _fmt(dim if r.method in ("loki", "random-basis", "sparq", "double-sparsity") else None, "g"),
            r.basis if r.method == "loki" else "-", r.budget if r.method != "full" else "-",
            str(r.sink) if r.method != "full" else "-", _fmt(r.bytes), f"{r.perplexity:.3f}",
            _fmt(r.perplexity / full if full else None, ".3f"), _fmt(r.kept_fraction), _fmt(r.jaccard),
        ))
    widths = {col: max([len(row[i]) for row in rows] + [len(col) if col not in SQUEEZABLE else 1]) for i, col in enumerate(COLUMNS)}
    shown = list(COLUMNS)
    for col in DROP_WHEN_NARROW:
        if width is None or sum(widths[c] + 3 for c in shown) + 1 <= width:
            break
        shown.remove(col)
    table = Table(title=title)
    for col in shown:
        if col in SQUEEZABLE:
            table.add_column(col, justify="left")
        else:
            table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True, min_width=widths[col])
    for row in rows:
        table.add_row(*(value for col, value in zip(COLUMNS, row) if col in shown))
    return table


@app.command("eval")
def eval_command(
    ppl: bool = typer.Option(False, "--ppl", help="Measure perplexity (the only evaluation so far)."),
    model: str = typer.Option(EvalConfig.model, help="`default`, hub id[@revision], model folder or .gguf file."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration file from `lokitool calibrate` (needed by loki)."),
    dataset: str = typer.Option(EvalConfig.dataset, help="`default` = held-out newer State of the Union speeches; or a file/folder/hub spec."),
    methods: str = typer.Option(listed(EvalConfig.methods), help="Comma-separated: full, loki, exact-topk, h2o, random-basis, sparq, quest, double-sparsity."),
    kf: str = typer.Option(listed(EvalConfig.kf), help="Token budget fraction(s), comma-separated: a sweep."),
    bytes_: str = typer.Option(listed(EvalConfig.bytes), "--bytes", help="Instead of --kf: bytes read per decode step (full = 1), comma-separated; each method's kf follows from it."),
    page: int = typer.Option(EvalConfig.page, help="Quest's page size in tokens."),
    df: str = typer.Option(listed(EvalConfig.df), help="Dimension budget fraction(s) for loki / random-basis."),
    variance: str = typer.Option(listed(EvalConfig.variance), help="Instead of --df: per-layer d from explained-variance threshold(s)."),
    basis: str = typer.Option(listed(EvalConfig.basis), help="Basis for loki, comma-separated for several: pre, post (PCA of keys), qa-pre, qa-post (query-aware), sa-post (selection-aware; calibrate --sa-df)."),
    budget: str = typer.Option(listed(EvalConfig.budget), help="per-row (k_t = kf x (t+1), decode-time Loki) and/or window (the paper's kf x L)."),
    sink: str = typer.Option(listed(EvalConfig.sink), help="Always keep the first N tokens, inside the budget; comma-separated for a sweep."),
    group: str = typer.Option(EvalConfig.group, help="Selection per query head (head), or shared per KV head: scores summed (kv) or lists in turns (union)."),
    seq_len: int = typer.Option(EvalConfig.seq_len, help="Window length."),
    num_tokens: int = typer.Option(EvalConfig.num_tokens, help="Held-out tokens in all (non-overlapping windows)."),
    batch_size: int = typer.Option(EvalConfig.batch_size, help="Windows per forward pass."),
    output_path: Path = typer.Option(EvalConfig.output_path, help="Directory for results JSON and the sweep plot."),
    device: Device = EvalConfig.device,
    dtype: Dtype = EvalConfig.dtype,
    bos: bool = typer.Option(EvalConfig.bos, "--bos/--no-bos", help="Start every window with BOS."),
    backend: str = typer.Option(EvalConfig.backend, help="Sparse attention by torch (the reference) or triton (the kernels; CUDA, 16-bit); auto: triton when it can."),
    encoding: str = typer.Option(EvalConfig.encoding, help="Encoding of local .txt/.jsonl text (e.g. latin-1)."),
    allow_other_model: bool = typer.Option(False, "--allow-other-model", help="Use a calibration made for other weights of the same attention shape (e.g. the base of a fine-tune)."),
    tasks: str = typer.Option("", "--tasks", help="Synthetic long-context tasks, comma-separated: niah, niah-word, niah-uuid, multikey, multivalue, vt, cwe, passkey."),
    lm_eval: str = typer.Option("", "--lm-eval", help="lm-evaluation-harness tasks, comma-separated (needs the lmeval extra)."),
    lengths: str = typer.Option(listed(TaskConfig.lengths), help="--tasks: prompt lengths in tokens, comma-separated."),
    depths: str = typer.Option(listed(TaskConfig.depths), help="--tasks: where the needle sits, fractions of the context in [0, 1]."),
    samples: int = typer.Option(TaskConfig.samples, help="--tasks: samples per task, length and depth."),
    seed: int = typer.Option(TaskConfig.seed, help="--tasks: seed of the first sample."),
    sparse_prefill: bool = typer.Option(False, "--sparse-prefill", help="--tasks: apply the method to the context too (default: full prefill, sparse decode)."),
    haystack: Optional[Path] = typer.Option(None, help="--tasks: a text file to hide needles in (default: held-out speeches)."),
    limit: Optional[int] = typer.Option(None, help="--lm-eval: at most this many documents per task."),
) -> None:
    """Perplexity with full attention, Loki and baselines, on held-out text."""
    from ..calib.calibration import Calibration
    from ..calib.data import check_dataset, load_windows, resolve_dataset_spec
    from ..calib.models import identify, load_model, resolve_device, resolve_dtype
    from ..evals import ppl as evaluate
    from ..fileio import ensure_writable_dir
    from ..sparse.attention import resolve_backend

    if tasks or lm_eval:
        from .eval_tasks import eval_tasks

        return eval_tasks(
            ppl=ppl, tasks=tasks, lm_eval=lm_eval, lengths=lengths, depths=depths, samples=samples, seed=seed,
            sparse_prefill=sparse_prefill, haystack=haystack, limit=limit, model=model, calibration=calibration,
            methods=methods, kf=kf, bytes_=bytes_, page=page, df=df, variance=variance, basis=basis, budget=budget, sink=sink, group=group,
            batch_size=batch_size, output_path=output_path, device=device, dtype=dtype, backend=backend,
        )
    if not ppl:
        raise UserError("say what to evaluate: --ppl, --tasks TASKS or --lm-eval TASKS")
    sinks = sink_list(sink)
    config = EvalConfig(
        model=model, calibration=calibration, dataset=dataset, methods=word_list(methods),
        kf=float_list(kf, "--kf"), bytes=float_list(bytes_, "--bytes"), page=page, df=float_list(df, "--df") if not variance else (), variance=float_list(variance, "--variance"),
        basis=word_list(basis), budget=word_list(budget), sink=sinks, group=group, seq_len=seq_len, num_tokens=num_tokens,
        batch_size=batch_size, output_path=output_path, device=device, dtype=dtype, bos=bos, backend=backend,
        encoding=encoding,
    )
    specs = config.specs()  # validates every point before anything slow
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    chosen = resolve_backend(backend, dev, dt)  # before the model loads
    ensure_writable_dir(output_path)
    cal = Calibration.load(calibration) if calibration else None
    config.check_calibration(cal)
    if cal is not None and not allow_other_model:
        cal.check_identity(*identify(model), str(calibration))
    check_dataset(resolve_dataset_spec(dataset, "eval"), encoding)
    with console.status(f"loading {model} and {dataset} text"):
        loaded = load_model(model, device, dtype)
        if cal is not None:
            cal.check_model(loaded.facts, str(calibration), allow_other_model)
        windows = load_windows(loaded, dataset, seq_len=seq_len, num_tokens=num_tokens, bos=bos, purpose="eval", encoding=encoding)
        if cal is not None and windows.dataset == cal.info.get("dataset"):
            console.print(f"[yellow]warning:[/yellow] evaluating on {windows.dataset}, the calibration's own text")
    console.print(f"{len(specs)} runs over {windows.tokens.shape[0]} windows of {windows.seq_len} tokens ({windows.dataset})")

    def report(r) -> None:
        console.print(f"  {evaluate._label(r):<32} ppl {r.perplexity:9.3f}  kept {_fmt(r.kept_fraction)}  ({r.seconds:.0f} s)")

    console.print(f"sparse attention by {chosen} ({dev}, {str(dt).removeprefix('torch.')})")
    if loaded.facts.attention_summary():
        console.print(f"attention: {loaded.facts.attention_summary()} (kept as the model has it; budgets count visible keys)")
    results = evaluate.run(config, loaded, windows.tokens, cal, on_result=report)
    fallback = sorted({i for r in results for i in (r.torch_layers or [])})
    if fallback:
        console.print(f"layers {', '.join(map(str, fallback))} ran on torch: the kernels take no window, padding, soft-cap or sinks")
    path = evaluate.write_results(config, loaded, cal, windows.dataset, results)

    full = next((r.perplexity for r in results if r.method == "full"), None)
    title = f"perplexity on {windows.dataset} ({results[0].tokens:,} predicted tokens)"
    out.print(results_table(results, full, title, out.width))
    out.print(f"wrote {path} (and results.json)")
