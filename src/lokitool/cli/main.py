"""The entry point: import every command module (each registers itself on `app`), run, and turn
errors a user can cause into one line and exit status 2 (LOKITOOL_DEBUG=1 shows the traceback).
SIGTERM is handled as Ctrl-C: temporary files are removed on the way out, exit status 143."""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from ..errors import UserError
from . import bench, bench_e2e, calibrate, eval, generate, passkey, rank_report  # noqa: F401  (registration)
from .app import app, console


def debug_enabled() -> bool:
    """LOKITOOL_DEBUG read as a boolean: 1/true/yes/on turn tracebacks on; 0/false/no/off/empty do not."""
    return os.environ.get("LOKITOOL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that `finally` blocks clean up as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: Optional[list[str]] = None) -> None:
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        app(args=argv)
    except UserError as err:
        if debug_enabled():
            raise
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt as err:
        _stop(err)
    except SystemExit as err:  # Typer turns an interrupt into exit status 130 before it reaches here
        interrupt = _interrupt_behind(err)
        if interrupt is None:
            raise
        _stop(interrupt)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM an exception was raised while handling, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _stop(interrupt: KeyboardInterrupt) -> None:
    terminated = isinstance(interrupt, Terminated)
    console.print(f"{'terminated' if terminated else 'interrupted'}; temporary files removed, existing outputs left as they were")
    sys.exit(143 if terminated else 130)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    main()
