"""What produced a result: library versions and the git commit, written beside every number."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import __version__


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"lokitool": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def git_hash(short: bool = False) -> str | None:
    """The commit of the checkout lokitool runs from, or None outside a git checkout."""
    args = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        done = subprocess.run(args, cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None
