"""Comma-separated command-line values (`--kf 0.125,0.25`, `--seq-len 4096,16384`), parsed once."""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import UserError

T = TypeVar("T")


def _parse_list(text: str, flag: str, convert: Callable[[str], T], kind: str, example: str) -> tuple[T, ...]:
    try:
        values = tuple(convert(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise UserError(f"{flag} takes comma-separated {kind}, e.g. {flag} {example} (got {text!r})") from None
    return values


def int_list(text: str, flag: str, example: str = "4096,16384") -> tuple[int, ...]:
    values = _parse_list(text, flag, int, "integers", example)
    if not values:
        raise UserError(f"{flag} is empty; give e.g. {flag} {example}")
    return values


def float_list(text: str, flag: str, example: str = "0.125,0.25") -> tuple[float, ...]:
    """May be empty (an unused option)."""
    return _parse_list(text, flag, float, "numbers", example)


def word_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())
