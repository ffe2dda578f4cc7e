"""Command-line values shared by the commands: comma-separated lists (`--kf 0.125,0.25`,
`--seq-len 4096,16384`), parsed once, and the `--device` / `--dtype` options."""

from __future__ import annotations

from typing import Annotated, Callable, TypeVar

import typer

from ..errors import UserError

# `device: Device = "auto"` in a command's signature (resolved by models.resolve_device / resolve_dtype)
Device = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on GPU).")]

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


def sink_list(text: str) -> tuple[int, ...]:
    """`--sink 0,1`: whole numbers, possibly none (eval and eval --tasks)."""
    try:
        return tuple(int(x) for x in word_list(text))
    except ValueError as err:
        raise UserError(f"--sink takes whole numbers, got {text!r}") from err


def word_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def listed(values: tuple) -> str:
    """A config's tuple default as the comma-separated text its option takes: (0.25, 0.5) -> "0.25,0.5"."""
    return ",".join(str(v) for v in values)
