"""`lokitool eval --tasks` / `--lm-eval`: flags -> TaskConfig -> evals.longctx / evals.lmeval -> table + results."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.table import Table

from ..errors import UserError
from ..evals.config import EvalConfig, TaskConfig
from .app import console, out
from .loading import load_model_and_calibration
from .options import float_list, int_list, sink_list, word_list


def eval_tasks(*, ppl: bool, tasks: str, lm_eval: str, lengths: str, depths: str, samples: int, seed: int,
               sparse_prefill: bool, haystack: Optional[Path], limit: Optional[int], model: str,
               calibration: Optional[Path], methods: str, kf: str, bytes_: str, page: int, df: str, variance: str,
               basis: str, budget: str,
               sink: str, group: str, batch_size: int, output_path: Path, device: str, dtype: str, backend: str) -> None:
    from ..fileio import ensure_writable_dir

    if ppl:
        raise UserError("run --ppl apart from --tasks / --lm-eval (each writes its own results)")
    sinks = sink_list(sink)
    config = EvalConfig(
        model=model, calibration=calibration, methods=word_list(methods), kf=float_list(kf, "--kf"),
        bytes=float_list(bytes_, "--bytes"), page=page,
        df=float_list(df, "--df") if not variance else (), variance=float_list(variance, "--variance"),
        basis=word_list(basis), budget=word_list(budget), sink=sinks, group=group, batch_size=batch_size,
        output_path=output_path, device=device, dtype=dtype, backend=backend,
    )
    specs = config.specs()
    task_config = None
    if tasks:
        task_config = TaskConfig(
            eval=config, tasks=word_list(tasks), lengths=int_list(lengths, "--lengths", "1024,2048"),
            depths=float_list(depths, "--depths"), samples=samples, seed=seed, sparse_prefill=sparse_prefill,
            haystack=haystack,
        )
    if lm_eval:
        from ..evals import lmeval

        lmeval.check_available()
    ensure_writable_dir(output_path)
    needs_cal = any(s.method in ("loki", "double-sparsity") for s in specs)
    loaded, cal = load_model_and_calibration(model, calibration, not needs_cal, device, dtype)
    if task_config is not None:
        _run_tasks(task_config, loaded, cal, len(specs))
    if lm_eval:
        _run_lm_eval(config, word_list(lm_eval), limit, loaded, cal)


def _run_tasks(config: TaskConfig, loaded, cal, num_specs: int) -> None:
    from ..evals import longctx

    console.print(f"{len(config.tasks)} tasks x {len(config.lengths)} lengths x {num_specs} methods "
                  f"({'sparse' if config.sparse_prefill else 'full'} prefill, sparse decode)")

    def report(r) -> None:
        console.print(f"  {r.task:<10} {r.length:>6} depth {longctx.depth_label(r.depth):<4} {r.label:<28} score {r.score:.2f}"
                      f"  kept {r.kept_fraction if r.kept_fraction is None else round(r.kept_fraction, 3)}  {r.answers[0][:40]!r}")

    results = longctx.run(config, loaded, cal, on_result=report)
    path = longctx.write_results(config, loaded, cal, results)
    labels = list(dict.fromkeys(r.label for r in results))
    table = Table(title=f"{loaded.facts.model_id}: synthetic tasks, score (string_match_all)")
    for col in ("task", "tokens", "depth", *labels):
        table.add_column(col, justify="left" if col == "task" else "right")
    by = {(r.task, r.length, r.depth, r.label): r.score for r in results}
    for task, length, depth in dict.fromkeys((r.task, r.length, r.depth) for r in results):
        table.add_row(task, str(length), longctx.depth_label(depth), *(f"{by.get((task, length, depth, m), float('nan')):.2f}" for m in labels))
    means = [sum(r.score for r in results if r.label == m) / sum(r.label == m for r in results) for m in labels]
    table.add_row("mean", "", "", *(f"{v:.2f}" for v in means))
    out.print(table)
    out.print(f"wrote {path} (and tasks.json, tasks.md, heatmap_*.png)")


def _run_lm_eval(config: EvalConfig, task_names: tuple[str, ...], limit: Optional[int], loaded, cal) -> None:
    from ..evals import lmeval

    rows = lmeval.run(config, task_names, loaded, cal, limit=limit)
    path = lmeval.write_results(config, loaded, cal, rows)
    table = Table(title=f"{loaded.facts.model_id}: lm-evaluation-harness")
    for col in ("method", "task", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for r in rows:
        table.add_row(r["label"], r["task"], r["metric"], f"{r['value']:.4f}")
    out.print(table)
    out.print(f"wrote {path} (and lm_eval.json)")
