"""Frozen settings of each command, validated once when built."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class CalibrateConfig:
    model: str = "default"
    dataset: str = "default"
    num_tokens: int = 131072
    seq_len: int = 1024
    output: Path = Path("calibration.safetensors")
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    bos: bool = True
    queries: bool = True
    device_map: str | None = None  # e.g. "auto": shard a large model over the visible GPUs (accelerate)
    encoding: str = "utf-8"  # of local text files
    # budgets d / D whose selection-aware subspace is fitted (empty, the default: none; opt in with
    # --sa-df 0.25: it costs calibration time and has not beaten qa-post on every model, see
    # reports/eval/selection-aware); skipped without queries or with fewer than two windows (the
    # fit needs one to fit on and one to check on)
    sa_df: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.num_tokens < self.seq_len:
            raise UserError(f"--num-tokens {self.num_tokens} is smaller than --seq-len {self.seq_len}; raise --num-tokens")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        for f in self.sa_df:
            if not 0 < f <= 1:
                raise UserError(f"--sa-df {f:g} is not a fraction of the head dim in (0, 1]; use e.g. --sa-df 0.25")
        from .data import check_encoding

        check_encoding(self.encoding)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        d["sa_df"] = list(self.sa_df)
        return d
