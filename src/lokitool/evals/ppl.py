"""`lokitool eval --ppl`: perplexity of full attention, Loki and baselines on the same held-out windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import results as results_file
from ..calib.calibration import Calibration
from ..calib.models import LoadedModel
from ..fileio import atomic_path
from ..sparse.attention import DIM_SCANNERS, MethodRecord, MethodSpec, layer_dims, patched, resolve_backend
from .config import EvalConfig


@dataclass(frozen=True)
class Result(MethodRecord):
    perplexity: float
    nll: float
    tokens: int
    kept_fraction: float | None
    jaccard: float | None
    jaccard_per_layer: list[float | None] | None
    seconds: float
    backend: str | None = None  # what ran the sparse attention (None for full: the model's own, or older files)
    torch_layers: list[int] | None = None  # with backend triton: layers the kernels cannot express, run on torch
    d: int | None = None  # dims scored, resolved from df (d = round(df x D), at least 1); None with --variance or no low rank
    page: int | None = None  # Quest's page size
    r: int | None = None  # dims of each key read to score (d for loki, r for sparq / double-sparsity; mean over layers)
    bytes: float | None = None  # bytes read per decode step relative to full attention (sparse/peers.py)


@torch.inference_mode()
def window_nll(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over windows [N, L] and the number of predicted tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total, count


def evaluate_spec(
    loaded: LoadedModel, tokens: torch.Tensor, spec: MethodSpec, calibration: Calibration | None, batch_size: int, backend: str = "torch"
) -> Result:
    """One point. backend: `torch` or `triton` (resolved: see attention.resolve_backend)."""
    import time

    start = time.perf_counter()
    torch_layers = None
    d = spec.loki.dims(loaded.facts.head_dim) if spec.method in DIM_SCANNERS and spec.loki.df is not None else None
    if spec.method == "full":
        nll, count = window_nll(loaded.model, tokens, batch_size)  # the model's own attention
        kept, jaccard, per_layer = 1.0, None, None
        backend = None
    else:
        with patched(loaded.model, loaded.facts, spec, calibration, backend) as recorder:
            nll, count = window_nll(loaded.model, tokens, batch_size)
        backend = recorder.backend
        torch_layers = sorted(recorder.torch_layers) if backend == "triton" else None
        kept, jaccard = recorder.kept_fraction(), recorder.mean_jaccard()
        per_layer = recorder.jaccard_per_layer() if jaccard is not None else None
    dims = layer_dims(spec, calibration, loaded.facts) if spec.method in DIM_SCANNERS else None
    return Result(
        **spec.fields(),
        r=round(sum(dims) / len(dims)) if dims else None,
        bytes=round(spec.step_bytes(loaded.facts, dims), 6),
        perplexity=math.exp(nll / count),
        nll=nll / count,
        tokens=count,
        kept_fraction=kept,
        jaccard=jaccard,
        jaccard_per_layer=per_layer,
        seconds=time.perf_counter() - start,
        backend=backend,
        torch_layers=torch_layers,
        d=d,
    )


def run(
    config: EvalConfig,
    loaded: LoadedModel,
    tokens: torch.Tensor,
    calibration: Calibration | None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    param = next(loaded.model.parameters())
    backend = resolve_backend(config.backend, param.device, param.dtype)
    results = []
    for spec in config.specs():
        result = evaluate_spec(loaded, tokens, spec, calibration, config.batch_size, backend)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def write_results(config: EvalConfig, loaded: LoadedModel, calibration: Calibration | None, dataset: str, results: list[Result]) -> Path:
    """results_<date>.json (kept) and results.json (the newest), atomically; a sweep plot when several points."""

    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    document = {
        "config": {**cfg, "dataset": dataset},
        "model": loaded.facts.to_dict(),
        "calibration": {"file": str(config.calibration), **calibration.info} if calibration else None,
        "results": [asdict(r) for r in results],
    }
    dated = results_file.write_results(config.output_path, "results", document)
    if config.bytes:
        plot_bytes(results, config.output_path / "bytes.png", title=f"{loaded.facts.model_id} on {dataset}")
    elif len({r.kf for r in results if r.kf is not None}) > 1:
        plot_sweep(results, config.output_path / "sweep.png", title=f"{loaded.facts.model_id} on {dataset}")
    return dated


def _label(r: Result) -> str:
    parts = [r.method]
    if r.basis and r.method == "loki":
        parts.append(f"{r.basis}")
    if r.df is not None and r.method in DIM_SCANNERS:
        parts.append(f"df={r.df:g}" + (f" (d={r.d})" if r.d is not None else ""))
    if r.variance is not None:
        parts.append(f"v={r.variance:g}")
    if r.budget and r.budget != "per-row":
        parts.append(r.budget)
    if r.sink:
        parts.append(f"sink={r.sink}")
    if r.group and r.group != "head":
        parts.append(f"group={r.group}")
    return " ".join(parts)


def plot_sweep(results: Iterable[Result], path: Path, title: str) -> None:
    """Perplexity against kf, one line per method."""
    _plot_perplexity(results, path, title, x=lambda r: r.kf, xlabel="kf (fraction of causal keys kept)")


def plot_bytes(results: Iterable[Result], path: Path, title: str) -> None:
    """Perplexity against the bytes each method reads per decode step, one line per method."""
    _plot_perplexity(results, path, title, x=lambda r: r.bytes, xlabel="bytes read per decode step (full attention = 1)")


def _plot_perplexity(results: Iterable[Result], path: Path, title: str, *, x: Callable[[Result], float | None], xlabel: str) -> None:
    """One line per method label through (x(r), perplexity); full attention as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.method == "full":
            ax.axhline(r.perplexity, color="black", linestyle="--", label=f"full ({r.perplexity:.2f})")
        elif x(r) is not None:
            lines.setdefault(_label(r), []).append((x(r), r.perplexity))
    for label, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
