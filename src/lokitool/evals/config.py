"""The settings of `lokitool eval`, validated once when built (each point's LokiSpec validates its
own budgets). Light at import time: the CLI reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..sparse.attention import MethodSpec


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

    def __post_init__(self) -> None:
        from ..sparse.attention import LOW_RANK, METHODS

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
        self.specs()  # every point's LokiSpec validates its own settings

    def specs(self) -> list[MethodSpec]:
        """Every point of the sweep, `full` first (once)."""
        from ..sparse.attention import LOW_RANK, MethodSpec
        from ..sparse.reference import LokiSpec

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
class TaskConfig:
    """The settings of `lokitool eval --tasks`: which synthetic tasks, at which lengths and depths,
    under the methods of `eval` (an EvalConfig: methods, budgets, calibration, model, output)."""

    eval: EvalConfig
    tasks: tuple[str, ...] = ("niah", "multikey", "vt", "cwe")
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 1  # samples per (task, length, depth), seeds seed .. seed + samples - 1
    seed: int = 0
    sparse_prefill: bool = False  # apply the method to the context too, not only to the decode
    haystack: Path | None = None  # a text file; None = the held-out speeches

    def __post_init__(self) -> None:
        from .tasks import check_request

        check_request(self.tasks, self.lengths, self.depths, None)
        if not self.tasks or not self.lengths or not self.depths:
            raise UserError("give at least one of each: --tasks, --lengths, --depths")
        if self.samples < 1:
            raise UserError(f"--samples must be at least 1, got {self.samples}")
        if self.eval.variance:
            raise UserError("--tasks decodes with a fixed d: give --df, not --variance")
        if "window" in self.eval.budget:
            raise UserError("--tasks decodes with per-row budgets (k = kf x context): drop --budget window")
