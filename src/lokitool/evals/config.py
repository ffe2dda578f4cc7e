"""The settings of `lokitool eval`, validated once when built (each point's LokiSpec validates its
own budgets). Light at import time: the CLI reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..calib.calibration import Calibration
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
    encoding: str = "utf-8"  # of local text files

    def __post_init__(self) -> None:
        from ..sparse.attention import EVAL_METHODS, LOW_RANK

        if not self.methods:
            raise UserError(f"--methods is empty; choose from {', '.join(EVAL_METHODS)}")
        for m in self.methods:
            if m not in EVAL_METHODS:
                raise UserError(f"unknown method {m!r}; choose from {', '.join(EVAL_METHODS)}")
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
        from ..sparse.bases import check_basis

        for spec in self.specs():
            if spec.method == "loki":
                check_basis(spec.loki.basis, calibration)

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
