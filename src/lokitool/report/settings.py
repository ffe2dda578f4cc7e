"""rank-report's settings: variance thresholds and dimension budgets, parsed and checked once."""

from __future__ import annotations

from typing import Sequence

from ..errors import UserError
from ..sparse.reference import dims_for

DEFAULT_VARIANCE = "0.8,0.9,0.95"
DEFAULT_DIMS = "0.25,0.5"


def _parse_fractions(text: str, what: str, flag: str, default: str, example: str) -> tuple[float, ...]:
    """'0.8,0.9' -> (0.8, 0.9): sorted, without repeats, each in (0, 1]; errors name `flag`."""
    values = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"{what} {part!r} is not a number; give fractions such as {flag} {default}") from None
        if not 0 < value <= 1:
            raise UserError(f"{what} {part} is outside (0, 1]; give fractions such as {example} (not percentages)")
        values.add(value)
    if not values:
        raise UserError(f"no {what} given; use for example {flag} {default}")
    return tuple(sorted(values))


def parse_variance(text: str) -> tuple[float, ...]:
    """'0.8,0.9,0.95' -> (0.8, 0.9, 0.95): sorted, without repeats, each in (0, 1]."""
    return _parse_fractions(text, "variance threshold", "--variance", DEFAULT_VARIANCE, "0.9")


def parse_dims(text: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5): fractions of the head dimension, sorted, without repeats, each in (0, 1]."""
    return _parse_fractions(text, "dimension fraction", "--dims", DEFAULT_DIMS, "0.25")


def budget_dims(fractions: Sequence[float], head_dim: int) -> tuple[int, ...]:
    """Fractions of D -> the distinct d that Loki would use for them (`sparse.reference.dims_for`), ascending."""
    return tuple(sorted({dims_for(f, head_dim) for f in fractions}))


def reference_threshold(variance: Sequence[float]) -> float:
    """The threshold that sets d for comparisons and heatmaps: 0.9 if asked for, else the middle one."""
    return 0.9 if 0.9 in variance else sorted(variance)[len(variance) // 2]
