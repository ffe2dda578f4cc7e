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
    bytes: tuple[float, ...] = ()  # bytes per decode step (full = 1): each method's kf derived from it, instead of --kf
    page: int = 16  # Quest's page size
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
        for b in self.bytes:
            if not 0 < b <= 1:
                raise UserError(f"--bytes must be in (0, 1], got {b}")
        if self.bytes and self.variance:
            raise UserError("--bytes needs --df, not --variance (d sets what scoring reads)")
        if any(m != "full" for m in self.methods) and not (self.kf or self.bytes):
            raise UserError("give at least one --kf")
        if any(m in LOW_RANK for m in self.methods) and not (self.df or self.variance):
            raise UserError("low-rank methods need --df or --variance")
        for m in ("loki", "double-sparsity"):
            if m in self.methods and self.calibration is None:
                raise UserError(f"method {m} needs --calibration FILE (make one with `lokitool calibrate`)")
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
        """Every point of the sweep, `full` first (once). With `bytes`, each method's kf is the one that
        spends that many bytes per decode step (sparse/peers.kf_for_bytes), else each of `kf`."""
        from ..sparse.attention import DIM_SCANNERS, LOW_RANK, MethodSpec
        from ..sparse.peers import kf_for_bytes
        from ..sparse.reference import LokiSpec

        out: list[MethodSpec] = []
        if "full" in self.methods:
            out.append(MethodSpec("full"))
        dims = [dict(df=v) for v in self.df] + [dict(df=None, variance=v) for v in self.variance]
        points = [(None, b) for b in self.bytes] or [(kf, None) for kf in self.kf]

        def kf_of(method: str, kf: float | None, budget_bytes: float | None, df: float | None) -> float:
            return kf if budget_bytes is None else kf_for_bytes(method, budget_bytes, df=df, page=self.page)

        for budget in self.budget:
            for sink in self.sink:
                for kf, budget_bytes in points:
                    common = dict(budget=budget, sink=sink, group=self.group)
                    for method in self.methods:
                        page = self.page if method == "quest" else None
                        if method == "full":
                            continue
                        if method not in DIM_SCANNERS:
                            first_df = self.df[0] if self.df else None  # exact top-k under 0.5 bytes: the scanners' kf
                            spec = LokiSpec(df=None, kf=kf_of(method, kf, budget_bytes, first_df), **common)
                            out.append(MethodSpec(method, spec, page=page))
                            continue
                        bases = self.basis if method == "loki" else (("random",) if method in LOW_RANK else ("post",))
                        for basis in bases:
                            for dim in dims:
                                if method == "sparq" and dim["df"] is None:
                                    continue  # SparQ's r comes from --df only
                                kf_m = kf_of(method, kf, budget_bytes, dim["df"])
                                out.append(MethodSpec(method, LokiSpec(basis=basis, kf=kf_m, **dim, **common)))
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
