"""Errors a user can cause: one clear line naming the fix.

Library code raises `UserError`; only `cli.py` turns it into a message and an exit code.
Set LOKITOOL_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment that the user can fix; the message says how."""
