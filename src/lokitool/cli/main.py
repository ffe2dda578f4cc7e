"""The entry point: import every command module (each registers itself on `app`), run, and turn
errors a user can cause into one line and exit status 2 (LOKITOOL_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import os
import sys
from typing import Optional

from ..errors import UserError
from . import bench, bench_e2e, calibrate, eval, generate, passkey, rank_report  # noqa: F401  (registration)
from .app import app, console


def main(argv: Optional[list[str]] = None) -> None:
    try:
        app(args=argv)
    except UserError as err:
        if os.environ.get("LOKITOOL_DEBUG"):
            raise
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; no output was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
