"""`lokitool eval --tasks`: the synthetic long-context tasks (`tasks.py`) under full attention,
Loki and the baselines, with decode-time sparsity.

Protocol (per sample): the context is prefilled ONCE with FULL attention into a `LokiCache` that
stores the keys as they come; the methods that score in a basis (Loki, random basis, Double
Sparsity) get a copy of it with the keys rotated into their basis (what a prefill into their cache
would store: the cache rotates keys after RoPE, and full attention is basis-free). Then, for each
method, the question and the answer are decoded token by token under the method
(`sparse.decode.method_attention`), greedily, and the cache is cut back to the context for the
next method. With `sparse_prefill` the context is prefilled under the method too (the
reference functions that `attention.patched` uses for `eval --ppl`), once per method.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import results as results_file
from ..calib.calibration import Calibration
from ..calib.models import LoadedModel
from ..errors import UserError
from ..fileio import write_text_atomic
from ..sparse import generation as gen
from ..sparse.attention import DIM_SCANNERS, LOW_RANK, MethodRecord, MethodSpec, layer_bases, layer_dims
from ..sparse.cache import LokiCache
from ..sparse.decode import DecodeScorer, method_attention
from . import tasks as T
from .config import TaskConfig


@dataclass(frozen=True)
class TaskResult(MethodRecord):
    """One record per (method, task, length, depth): the mean score over its samples."""

    page: int | None  # Quest's page size
    label: str
    task: str
    length: int  # target tokens
    depth: float | None
    tokens: list[int]  # prompt tokens of each sample (context + question)
    score: float
    scores: list[float]
    answers: list[str]
    expected: list[list[str]]
    kept_fraction: float | None  # of the cached keys, over the decode steps
    sparse_prefill: bool
    seconds: float
    bytes: float | None = None  # read per decode step relative to full attention (MethodSpec.step_bytes)


def label(spec: MethodSpec) -> str:
    parts = [spec.method]
    s = spec.loki
    if spec.method == "loki":
        parts.append(s.basis)
    if spec.method == "quest":
        parts.append(f"P={spec.page}")
    if s is not None:
        parts.append(f"kf={s.kf:g}")
        if spec.method in DIM_SCANNERS:
            parts.append(f"df={s.df:g}")
        if s.sink:
            parts.append(f"sink={s.sink}")
    return " ".join(parts)


def haystack_text(path: Path | None, min_chars: int) -> str:
    """The haystack: a text file, or at least `min_chars` characters of held-out speeches."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot read the haystack {path}: {err.strerror}") from None
    return T.heldout_text(min_chars)


def _cache_key(spec: MethodSpec):
    """Methods that share a key share a prefilled cache (same basis)."""
    return (spec.basis, spec.loki.df) if spec.method in LOW_RANK else None


def cache_bases(spec: MethodSpec, loaded: LoadedModel, calibration: Calibration | None) -> torch.Tensor | None:
    """[L, Hkv, D, D] the basis of a low-rank method's cache (Double Sparsity: its channels), else None."""
    if spec.method not in LOW_RANK:
        return None
    facts = loaded.facts
    if calibration is not None:
        calibration.check_shape(facts)
    return layer_bases(spec, calibration, facts, [spec.loki.dims(facts.head_dim)] * facts.num_layers)


def _new_cache(spec: MethodSpec, loaded: LoadedModel, calibration: Calibration | None, capacity: int) -> LokiCache:
    bases = cache_bases(spec, loaded, calibration)
    if bases is not None:
        return LokiCache(bases, max_length=capacity)
    return LokiCache.unrotated(loaded.facts.num_layers, max_length=capacity)


def rotated_copy(cache: LokiCache, bases: torch.Tensor, capacity: int) -> LokiCache:
    """A new cache in `bases` holding the keys of an unrotated `cache` rotated, and its values."""
    out = LokiCache(bases, max_length=capacity)
    for src, dst in zip(cache.layers, out.layers):
        dst.update(src.keys, src.values)
    return out


def _decode_answer(model, cache: LokiCache, question: torch.Tensor, max_new_tokens: int, stop_token: int | None) -> torch.Tensor:
    """Feed the question ids [1, q] one token at a time, then decode greedily: the answer ids [<= n]."""
    for i in range(question.shape[1]):
        logits = gen.next_logits(model, question[:, i : i + 1], cache)
    first = logits.argmax(-1)
    if stop_token is not None and int(first[0]) == stop_token:
        return first
    rest = gen.decode_n_tokens(model, first, cache, max_new_tokens - 1, stop_token=stop_token)
    return torch.cat([first, rest[0]])


def _crop(cache: LokiCache, length: int) -> None:
    for layer in cache.layers:
        layer.crop(length)


@torch.inference_mode()
def answer_sample(loaded: LoadedModel, context: list[int], question: list[int], max_new_tokens: int,
                  specs: list[MethodSpec], calibration: Calibration | None, *, sparse_prefill: bool = False,
                  scorers: dict[int, DecodeScorer] | None = None) -> list[tuple[str, float | None]]:
    """(answer text, kept fraction) of every spec on one prompt, by the protocol of the module
    docstring. `scorers` maps a spec's index to a decode scorer replacing its own (tests)."""
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    ctx = torch.tensor([context], device=device)
    q = torch.tensor([question], device=device)
    capacity = ctx.shape[1] + q.shape[1] + max_new_tokens + 1
    stop = getattr(tok, "eos_token_id", None)
    scorers = scorers or {}
    groups: dict = {}
    for i, spec in enumerate(specs):
        groups.setdefault(i if sparse_prefill else _cache_key(spec), []).append(i)
    out: dict[int, tuple[str, float | None]] = {}
    shared = None
    if not sparse_prefill:
        shared = LokiCache.unrotated(loaded.facts.num_layers, max_length=capacity)
        with method_attention(model, shared, MethodSpec("full")):
            gen.prefill(model, ctx, shared)
    for key, members in groups.items():
        if sparse_prefill:
            cache = _new_cache(specs[members[0]], loaded, calibration, capacity)
        elif key is None:
            cache = shared
        else:
            cache = rotated_copy(shared, cache_bases(specs[members[0]], loaded, calibration), capacity)
        for i in members:
            if sparse_prefill:
                with method_attention(model, cache, specs[i], sparse_prefill=True):
                    gen.prefill(model, ctx, cache)
            with method_attention(model, cache, specs[i], scorer=scorers.get(i)) as stats:
                ids = _decode_answer(model, cache, q, max_new_tokens, stop)
            out[i] = (tok.decode(ids.tolist(), skip_special_tokens=True).strip(), stats.kept_fraction)
            _crop(cache, ctx.shape[1])
    return [out[i] for i in range(len(specs))]


def run(config: TaskConfig, loaded: LoadedModel, calibration: Calibration | None,
        on_result: Callable[[TaskResult], None] | None = None, *, specs: list[MethodSpec] | None = None,
        scorers: dict[int, DecodeScorer] | None = None) -> list[TaskResult]:
    """Every (task, length, depth) x method of `config`: one TaskResult each, `full` first."""
    specs = specs if specs is not None else config.eval.specs()
    facts, tok = loaded.facts, loaded.tokenizer
    T.check_request(config.tasks, config.lengths, config.depths, facts.max_positions)
    if tok is None:
        raise UserError("--tasks needs a model with a tokenizer")
    hay = haystack_text(config.haystack, 8 * max(config.lengths) + 4096)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    overhead = T.template_overhead(tok, facts.bos_token_id)
    dims = [layer_dims(spec, calibration, facts) if spec.method in DIM_SCANNERS else None for spec in specs]  # as eval --ppl
    results = []
    for task in config.tasks:
        for length in config.lengths:
            for depth in [None] if task in T.DEPTHLESS else config.depths:
                rows = [[] for _ in specs]  # per spec: (tokens, score, answer, expected, kept, seconds)
                for k in range(config.samples):
                    sample = T.make_sample(task, length=length, depth=depth, seed=config.seed + k, haystack=hay,
                                           encode=encode, decode=decode, overhead=overhead)
                    context, question = T.prompt_ids(sample, tok, facts.bos_token_id)
                    start = time.perf_counter()
                    answers = answer_sample(loaded, context, question, sample.max_new_tokens, specs, calibration,
                                            sparse_prefill=config.sparse_prefill, scorers=scorers)
                    seconds = (time.perf_counter() - start) / len(specs)
                    for row, (answer, kept) in zip(rows, answers):
                        row.append((len(context) + len(question), T.score(sample.expected, answer), answer,
                                    list(sample.expected), kept, seconds))
                for spec, row, spec_dims in zip(specs, rows, dims):
                    kept = [r[4] for r in row if r[4] is not None]
                    result = TaskResult(
                        **spec.fields(), label=label(spec), task=task, length=length, depth=depth,
                        tokens=[r[0] for r in row], score=sum(r[1] for r in row) / len(row), scores=[r[1] for r in row],
                        answers=[r[2] for r in row], expected=[r[3] for r in row],
                        kept_fraction=sum(kept) / len(kept) if kept else None, sparse_prefill=config.sparse_prefill,
                        seconds=sum(r[5] for r in row), bytes=round(spec.step_bytes(facts, spec_dims), 6),
                    )
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
    return results


# ----------------------------------------------------------------------------------------------
# Reporting


def depth_label(d: float | None) -> str:
    return "-" if d is None else f"{d:g}"


def table_markdown(results: list[TaskResult]) -> str:
    """Rows (task, length, depth), one column per method: the mean score; then the mean per method."""
    labels = list(dict.fromkeys(r.label for r in results))
    rows = list(dict.fromkeys((r.task, r.length, r.depth) for r in results))
    by = {(r.task, r.length, r.depth, r.label): r for r in results}
    lines = ["| task | tokens | depth | " + " | ".join(labels) + " |", "|---|---:|---:|" + "---:|" * len(labels)]
    for task, length, depth in rows:
        cells = [f"{by[(task, length, depth, m)].score:.2f}" if (task, length, depth, m) in by else "-" for m in labels]
        lines.append(f"| {task} | {length} | {depth_label(depth)} | " + " | ".join(cells) + " |")
    means = [sum(r.score for r in results if r.label == m) / sum(1 for r in results if r.label == m) for m in labels]
    lines.append("| **mean** | | | " + " | ".join(f"**{v:.2f}**" for v in means) + " |")
    kept = []
    for m in labels:
        values = [r.kept_fraction for r in results if r.label == m and r.kept_fraction is not None]
        kept.append(f"{sum(values) / len(values):.3f}" if values else "-")
    lines.append("| kept fraction | | | " + " | ".join(kept) + " |")
    return "\n".join(lines)


def plot_heatmaps(results: list[TaskResult], out_dir: Path, title: str) -> list[Path]:
    """One figure per method: a length x depth grid of scores per task. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = list(dict.fromkeys(r.task for r in results))
    for m in dict.fromkeys(r.label for r in results):
        mine = [r for r in results if r.label == m]
        fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks) + 1, 3.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rs = [r for r in mine if r.task == task]
            lengths = sorted({r.length for r in rs})
            depths = sorted({r.depth for r in rs}, key=lambda d: -1 if d is None else d)
            grid = torch.full((len(lengths), len(depths)), float("nan"))
            for r in rs:
                grid[lengths.index(r.length), depths.index(r.depth)] = r.score
            ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i in range(len(lengths)):
                for j in range(len(depths)):
                    ax.text(j, i, f"{grid[i, j].item():.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(depths)), [depth_label(d) for d in depths])
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_xlabel("depth")
            ax.set_title(task)
        axes[0][0].set_ylabel("tokens")
        fig.suptitle(f"{m} — {title}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"heatmap_{m.replace(' ', '_').replace('=', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(config: TaskConfig, loaded: LoadedModel, calibration: Calibration | None,
                  results: Iterable[TaskResult]) -> Path:
    """tasks_<date>.json (kept) and tasks.json (the newest), tasks.md (the table) and one heatmap
    per method, in the output directory."""
    results = list(results)
    ev = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config.eval).items()}
    cfg = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "eval"}, "eval": ev}
    document = {
        "config": cfg,
        "model": loaded.facts.to_dict(),
        "calibration": {"file": str(config.eval.calibration), **calibration.info} if calibration else None,
        "results": [asdict(r) for r in results],
    }
    out_dir = config.eval.output_path
    path = results_file.write_results(out_dir, "tasks", document)
    write_text_atomic(out_dir / "tasks.md", table_markdown(results) + "\n")
    plot_heatmaps(results, out_dir, loaded.facts.model_id)
    return path
