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

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.num_tokens < self.seq_len:
            raise UserError(f"--num-tokens {self.num_tokens} is smaller than --seq-len {self.seq_len}; raise --num-tokens")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        from .data import check_encoding

        check_encoding(self.encoding)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        return d
