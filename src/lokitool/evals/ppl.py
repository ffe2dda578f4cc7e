"""`lokitool eval --ppl`: perplexity of full attention, Loki and baselines on the same held-out windows."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..calib.calibration import Calibration
from ..calib.models import LoadedModel
from ..errors import UserError
from ..fileio import atomic_path, disk_error, ensure_writable_dir, unique_path, write_json_atomic
from ..results import git_hash, versions
from ..sparse.attention import LOW_RANK, METHODS, MethodSpec, patched, resolve_backend
from ..sparse.bases import check_basis
from ..sparse.reference import LokiSpec


@dataclass(frozen=True)
class EvalConfig:
    model: str = "default"
    calibration: Path | None = None
    dataset: str = "default"
    methods: tuple[str, ...] = ("full", "loki", "exact-topk", "h2o", "random-basis")
    kf: tuple[float, ...] = (0.25,)
    df: tuple[float, ...] = (0.25,)
    variance: tuple[float, ...] = ()
    basis: tuple[str, ...] = ("post",)
    budget: tuple[str, ...] = ("per-row",)
    sink: tuple[int, ...] = (0,)
    group: str = "head"
    seq_len: int = 1024
    num_tokens: int = 8192
    batch_size: int = 1
    output_path: Path = Path("runs/eval")
    device: str = "auto"
    dtype: str = "auto"
    bos: bool = True
    backend: str = "auto"  # torch | triton | auto (triton on CUDA with a 16-bit model)
    encoding: str = "utf-8"  # of local text files

    def __post_init__(self) -> None:
        if not self.methods:
            raise UserError(f"--methods is empty; choose from {', '.join(METHODS)}")
        for m in self.methods:
            if m not in METHODS:
                raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if any(m != "full" for m in self.methods) and not self.kf:
            raise UserError("give at least one --kf")
        if any(m in LOW_RANK for m in self.methods) and not (self.df or self.variance):
            raise UserError("low-rank methods need --df or --variance")
        if "loki" in self.methods and self.calibration is None:
            raise UserError("method loki needs --calibration FILE (make one with `lokitool calibrate`)")
        if self.variance and self.calibration is None and any(m in LOW_RANK for m in self.methods):
            raise UserError("--variance needs --calibration FILE (ranks come from its eigenvalues)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.num_tokens < self.seq_len:
            raise UserError(f"--num-tokens {self.num_tokens} is smaller than --seq-len {self.seq_len}; raise --num-tokens")
        for sink in self.sink:
            if sink >= self.seq_len:
                raise UserError(f"--sink {sink} keeps every token of a {self.seq_len}-token window; use a --sink below --seq-len")
        from ..calib.data import check_encoding

        check_encoding(self.encoding)
        self.specs()  # every point's LokiSpec validates its own settings

    def check_calibration(self, calibration: Calibration | None) -> None:
        """Every point's needs of the calibration file (query statistics for qa bases), checked
        before the model loads."""
        for spec in self.specs():
            if spec.method == "loki":
                check_basis(spec.loki.basis, calibration)

    def specs(self) -> list[MethodSpec]:
        """Every point of the sweep, `full` first (once)."""
        out: list[MethodSpec] = []
        if "full" in self.methods:
            out.append(MethodSpec("full"))
        dims = [dict(df=v) for v in self.df] + [dict(df=None, variance=v) for v in self.variance]
        for budget in self.budget:
            for sink in self.sink:
                for kf in self.kf:
                    common = dict(kf=kf, budget=budget, sink=sink, group=self.group)
                    for method in self.methods:
                        if method == "full":
                            continue
                        if method not in LOW_RANK:
                            out.append(MethodSpec(method, LokiSpec(df=None, **common)))
                            continue
                        for basis in self.basis if method == "loki" else ("random",):
                            for dim in dims:
                                out.append(MethodSpec(method, LokiSpec(basis=basis, **dim, **common)))
        return out


@dataclass(frozen=True)
class Result:
    method: str
    kf: float | None
    df: float | None
    variance: float | None
    basis: str | None
    budget: str | None
    sink: int | None
    group: str | None
    perplexity: float
    nll: float
    tokens: int
    kept_fraction: float | None
    jaccard: float | None
    jaccard_per_layer: list[float | None] | None
    seconds: float
    backend: str | None = None  # what ran the sparse attention (None for full: the model's own, or older files)
    d: int | None = None  # dims scored, resolved from df (d = round(df x D), at least 1); None with --variance or no low rank


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
    d = spec.loki.dims(loaded.facts.head_dim) if spec.method in LOW_RANK and spec.loki.df is not None else None
    if spec.method == "full":
        nll, count = window_nll(loaded.model, tokens, batch_size)  # the model's own attention
        kept, jaccard, per_layer = 1.0, None, None
        backend = None
    else:
        with patched(loaded.model, loaded.facts, spec, calibration, backend) as recorder:
            nll, count = window_nll(loaded.model, tokens, batch_size)
        backend = recorder.backend
        kept, jaccard = recorder.kept_fraction(), recorder.mean_jaccard()
        per_layer = recorder.jaccard_per_layer() if jaccard is not None else None
    return Result(
        **spec.fields(),
        perplexity=math.exp(nll / count),
        nll=nll / count,
        tokens=count,
        kept_fraction=kept,
        jaccard=jaccard,
        jaccard_per_layer=per_layer,
        seconds=time.perf_counter() - start,
        backend=backend,
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

    out_dir = ensure_writable_dir(config.output_path)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    document = {
        "config": {**cfg, "dataset": dataset},
        "model": loaded.facts.to_dict(),
        "calibration": {"file": str(config.calibration), **calibration.info} if calibration else None,
        "versions": versions(),
        "git_hash": git_hash(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "results": [asdict(r) for r in results],
    }
    dated = unique_path(out_dir, "results", ".json")  # created exclusively: concurrent runs never share a name
    try:
        write_json_atomic(dated, document)
        write_json_atomic(out_dir / "results.json", document)
        if len({r.kf for r in results if r.kf is not None}) > 1:
            plot_sweep(results, out_dir / "sweep.png", title=f"{loaded.facts.model_id} on {dataset}")
    except BaseException as err:  # a full disk, Ctrl-C, SIGTERM: give back the reserved name
        if dated.exists() and dated.stat().st_size == 0:
            dated.unlink()
        if isinstance(err, OSError):
            raise disk_error(out_dir, err) from err
        raise
    return dated


def _label(r: Result) -> str:
    parts = [r.method]
    if r.basis and r.method == "loki":
        parts.append(f"{r.basis}")
    if r.df is not None and r.method in LOW_RANK:
        parts.append(f"df={r.df:g}" + (f" (d={r.d})" if r.d is not None else ""))
    if r.variance is not None:
        parts.append(f"v={r.variance:g}")
    if r.budget and r.budget != "per-row":
        parts.append(r.budget)
    if r.sink:
        parts.append(f"sink={r.sink}")
    return " ".join(parts)


def plot_sweep(results: Iterable[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = list(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        if r.kf is not None:
            lines.setdefault(_label(r), []).append((r.kf, r.perplexity))
    for label, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    for r in results:
        if r.method == "full":
            ax.axhline(r.perplexity, color="black", linestyle="--", label=f"full ({r.perplexity:.2f})")
    ax.set_xlabel("kf (fraction of causal keys kept)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

