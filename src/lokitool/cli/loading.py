"""Loading a model and its calibration for the commands that decode (generate, passkey)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserError
from .app import console


def load_model_and_calibration(
    model: str, calibration: Optional[Path], full: bool, device: str, dtype: str, *, basis: str | None = None,
    allow_other_model: bool = False,
):
    """The model and (unless `full`) its calibration; the calibration is checked against the model's
    identity and against `basis` before the model loads, and against its shapes after."""
    from ..calib.calibration import Calibration
    from ..calib.models import identify, load_model
    from ..sparse.bases import check_basis

    if not full and calibration is None:
        raise UserError("Loki needs --calibration FILE (make one with `lokitool calibrate`), or pass --full")
    cal = Calibration.load(calibration) if calibration is not None and not full else None
    if cal is not None:
        if basis is not None:
            check_basis(basis, cal)
        if not allow_other_model:
            cal.check_identity(*identify(model), str(calibration))
    with console.status(f"loading {model}"):
        loaded = load_model(model, device, dtype)
    if cal is not None:
        cal.check_model(loaded.facts, str(calibration), allow_other_model)
    return loaded, cal


def check_context(facts, prompt_tokens: int, new_tokens: int, what: str = "the prompt",
                  fix: str = "shorten it or lower --max-new-tokens") -> None:
    """Refuse a prompt that, with the tokens to generate, does not fit the model's context."""
    limit = facts.max_positions
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise UserError(
            f"{what} has {prompt_tokens} tokens; with {new_tokens} new tokens that exceeds "
            f"{facts.model_id}'s context of {limit} positions; {fix}"
        )
