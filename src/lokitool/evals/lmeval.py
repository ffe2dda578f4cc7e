"""`lokitool eval --lm-eval TASKS`: any lm-evaluation-harness task with the model's attention
routed through a method (`sparse.attention.patched`, as `eval --ppl`).

`LokiLM` is lm-eval's `HFLM` with `_model_call` (loglikelihood, loglikelihood_rolling) and
`_model_generate` (generate_until) run inside `patched(model, facts, method)`: every query row
keeps its top k_t = kf x (t + 1) keys, prompt and continuation alike (the sparse-prefill protocol;
generation goes through transformers' `generate` with its own cache). It is registered as the
model type `lokitool` the first time `lm_class()` runs, so `lm_eval --model lokitool --model_args
pretrained=default,method=loki,kf=0.25,df=0.25,calibration=FILE` works from Python once this
module is imported. Batches are of one document: the reference ignores padding masks.

Needs the `lmeval` extra (`pip install 'lokitool[lmeval]'`); nothing here imports lm_eval at import time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .. import results as results_file
from ..calib.calibration import Calibration
from ..calib.models import LoadedModel
from ..errors import UserError
from ..sparse.attention import MethodSpec, patched
from .config import EvalConfig

_CLASS = None


def check_available() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'lokitool[lmeval]' (or pip install lm-eval)") from None


def _spec_from_args(method: str, kf: float | None, df: float | None, basis: str) -> MethodSpec:
    from ..sparse.reference import LokiSpec

    if method == "full":
        return MethodSpec("full")
    low_rank = method in ("loki", "random-basis")
    return MethodSpec(method, LokiSpec(kf=float(kf), df=float(df) if low_rank else None,
                                       basis="random" if method == "random-basis" else basis))


def lm_class():
    """The `LokiLM` class (defined and registered as `lokitool` on first use)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    check_available()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class LokiLM(HFLM):
        """HFLM whose forward passes run under a sparse-attention method."""

        def __init__(self, pretrained: Any = "default", method: str | MethodSpec = "full", kf: float = 0.25,
                     df: float = 0.25, basis: str = "post", calibration: str | Calibration | None = None,
                     loaded: LoadedModel | None = None, device: str = "cpu", dtype: str = "float32", **kwargs):
            if loaded is None:
                from ..calib.models import load_model

                loaded = load_model(str(pretrained), device, dtype)
            if isinstance(calibration, (str, os.PathLike)):
                calibration = Calibration.load(Path(calibration))
            self.method = method if isinstance(method, MethodSpec) else _spec_from_args(method, kf, df, basis)
            self.loaded, self.calibration = loaded, calibration
            self.kept, self.rows = 0.0, 0
            kwargs.setdefault("batch_size", 1)
            super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **kwargs)

        @contextlib.contextmanager
        def _method(self):
            if self.method.method == "full":
                yield
                return
            with patched(self.loaded.model, self.loaded.facts, self.method, self.calibration) as recorder:
                yield
            self.kept += sum(s.kept_fraction for s in recorder.layers)
            self.rows += sum(s.rows for s in recorder.layers)

        @property
        def kept_fraction(self) -> float | None:
            return 1.0 if self.method.method == "full" else (self.kept / self.rows if self.rows else None)

        def _model_call(self, inps, attn_mask=None, labels=None):
            with self._method():
                return super()._model_call(inps, attn_mask, labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            with self._method():
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

    register_model("lokitool")(LokiLM)
    _CLASS = LokiLM
    return LokiLM


def split_tasks(names: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """Task names, and folders of task YAMLs to include (names that are existing directories)."""
    include = [str(Path(n).resolve()) for n in names if Path(n).is_dir()]
    return [n for n in names if not Path(n).is_dir()], include


def evaluate(lm, tasks: list[str], include: list[str], limit: int | None) -> dict:
    """lm-eval's simple_evaluate on one model object: its `results` dict (task -> metrics)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, or pass a folder of task YAMLs")
    out = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False,
                          bootstrap_iters=0)
    return out["results"]


def run(config: EvalConfig, names: tuple[str, ...], loaded: LoadedModel, calibration: Calibration | None,
        limit: int | None = None) -> list[dict]:
    """One row per (method, task, metric): label, method fields, task, metric, value, kept_fraction."""
    from .longctx import label

    tasks, include = split_tasks(names)
    cls = lm_class()
    rows = []
    for spec in config.specs():
        lm = cls(loaded=loaded, method=spec, calibration=calibration)
        for task, metrics in evaluate(lm, tasks, include, limit).items():
            for key, value in metrics.items():
                metric, comma, _filter = key.partition(",")  # "acc,none": metric, filter
                if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                rows.append({**spec.fields(), "label": label(spec), "task": task, "metric": key, "value": float(value),
                             "kept_fraction": lm.kept_fraction, "limit": limit})
    return rows


def write_results(config: EvalConfig, loaded: LoadedModel, calibration: Calibration | None, rows: list[dict]) -> Path:
    from dataclasses import asdict

    import lm_eval

    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    document = {
        "config": cfg,
        "model": loaded.facts.to_dict(),
        "calibration": {"file": str(config.calibration), **calibration.info} if calibration else None,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "results": rows,
    }
    return results_file.write_results(config.output_path, "lm_eval", document)
