"""`lokitool calibrate`: model + text -> streamed key statistics -> PCA -> calibration file."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..fileio import check_output_file
from ..results import versions
from ..sparse.reference import dims_for  # the one owner of f -> d: the stored d are those Loki uses
from . import pca
from . import selection_aware
from .calibration import QA_FRACTIONS, Calibration
from .collect import collect_statistics
from .config import CalibrateConfig
from .data import Windows, check_dataset, load_windows, resolve_dataset_spec
from .distributed import World, all_reduce_, barrier, shard
from .models import LoadedModel, ModelFacts, load_model
from .moments import KINDS, Statistics


@dataclass(frozen=True)
class CalibrationJob:
    """Everything checked and loaded before the long part starts."""

    config: CalibrateConfig
    loaded: LoadedModel
    windows: Windows


@dataclass(frozen=True)
class CalibrationRun:
    calibration: Calibration
    seconds: float


def build_calibration(
    stats: Statistics, facts: ModelFacts, info: dict, query_aware: bool = True,
    sample: selection_aware.SelectionSample | None = None, sa_df: tuple[float, ...] = (),
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """PCA per kind, the query second moments, and (with queries, unless told not to) the query-aware
    subspaces for the budgets d = dims_for(f, D), f in QA_FRACTIONS, fitted where the statistics live;
    with a sample, the selection-aware subspaces (post-RoPE) for d = dims_for(f, D), f in sa_df."""
    fitted = {kind: pca.fit(stats.keys[kind]) for kind in KINDS}
    moments = {}
    for kind, sums in stats.queries.items():
        n = sums.count.clamp_min(1)[..., None, None]
        moments[kind] = (sums.outer / n).cpu()
    calibration = Calibration(facts=facts, info=info, pca=fitted, query_moment=moments)
    if not (query_aware and moments):
        return calibration
    device = next(iter(stats.queries.values())).outer.device
    dims = sorted({dims_for(f, facts.head_dim) for f in QA_FRACTIONS})
    stored = {kind: {d: calibration.fit_query_aware(kind, d, device) for d in dims} for kind in moments}
    calibration = replace(calibration, query_aware=stored)
    if sample is None or not sa_df or "post" not in moments:
        return calibration
    return fit_selection_aware(calibration, sample, sorted({dims_for(f, facts.head_dim) for f in sa_df}), progress)


def fit_selection_aware(
    calibration: Calibration, sample: selection_aware.SelectionSample, dims: list[int],
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Add the selection-aware subspaces for each d (from the PCA and query-aware starts) and their
    per-head report (`info["selection_aware"]`, keyed by d) to a calibration."""
    fitted, reports = {}, {}
    covariance, query_moment = calibration.score_statistics("post")
    for d in dims:
        starts = {"pca": calibration.basis("post")[..., :d].float(), "qa": calibration.query_aware_basis("post", d)[..., :d].float()}
        fitted[d], reports[str(d)] = selection_aware.fit_all(sample, starts, covariance, query_moment, progress=progress)
    info = {**calibration.info, "selection_aware": reports}
    return replace(calibration, info=info, selection_aware={"post": fitted})


def prepare(config: CalibrateConfig) -> CalibrationJob:
    """Check the output path, load the model and tokenize the text: every input error surfaces here."""
    check_output_file(config.output)
    check_dataset(resolve_dataset_spec(config.dataset, "calibrate"), config.encoding)  # bad text fails before the model loads
    loaded = load_model(config.model, config.device, config.dtype, device_map=config.device_map)
    windows = load_windows(
        loaded, config.dataset, seq_len=config.seq_len, num_tokens=config.num_tokens, bos=config.bos, purpose="calibrate",
        encoding=config.encoding,
    )
    return CalibrationJob(config=config, loaded=loaded, windows=windows)


def run(
    job: CalibrationJob, progress: Callable[[int, int], None] | None = None, world: World = World(),
    fit_progress: Callable[[int, int], None] | None = None,
) -> CalibrationRun:
    """Calibrate and write the output file (rank 0 only, after the sums of all ranks are reduced).

    `progress(done_tokens, total_tokens)` is called per batch, with this rank's count scaled to the world;
    `fit_progress(done_heads, total_heads)` per (layer, KV head) of each selection-aware fit."""
    import time

    config, loaded, windows = job.config, job.loaded, job.windows
    total = windows.num_tokens
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(min(total, done * world.size), total)

    start = time.perf_counter()
    stats = collect_statistics(
        loaded.model, loaded.facts, shard(windows.tokens, world), batch_size=config.batch_size,
        with_queries=config.queries, progress=step,
    )
    all_reduce_(stats)
    sample = None
    if config.sa_df and config.queries and world.is_main and windows.tokens.shape[0] >= 2:
        taken = selection_aware.sample_windows(loaded.facts, windows.seq_len, windows.tokens.shape[0])
        sample = selection_aware.collect_sample(loaded.model, loaded.facts, windows.tokens[:taken])
    seconds = time.perf_counter() - start
    device = next(loaded.model.parameters()).device
    info = {
        "dataset": windows.dataset,
        "num_tokens": total,
        "num_windows": windows.tokens.shape[0],
        "seq_len": windows.seq_len,
        "bos": windows.bos,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "processes": world.size,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    calibration = build_calibration(stats, loaded.facts, info, query_aware=world.is_main,  # only rank 0 writes
                                    sample=sample, sa_df=config.sa_df, progress=fit_progress)
    if world.is_main:
        calibration.save(config.output)
    barrier()  # no rank reports success before the file exists
    return CalibrationRun(calibration=calibration, seconds=seconds)
