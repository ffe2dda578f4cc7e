"""Loading a model and its calibration for the commands that decode (generate, passkey)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UserError
from .app import console


def load_model_and_calibration(model: str, calibration: Optional[Path], full: bool, device: str, dtype: str):
    from ..calib.calibration import Calibration
    from ..calib.models import load_model

    if not full and calibration is None:
        raise UserError("Loki needs --calibration FILE (make one with `lokitool calibrate`), or pass --full")
    cal = Calibration.load(calibration) if calibration is not None and not full else None
    with console.status(f"loading {model}"):
        loaded = load_model(model, device, dtype)
    if cal is not None:
        cal.check_model(loaded.facts, str(calibration))
    return loaded, cal
