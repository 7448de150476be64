"""The error type of unusable input data, shared by the apps.

    raise DataError(f"{path}: cannot read the image (image file is truncated)")

A DataError says which file (and line, field or sample) is wrong and what was expected, in one message that
the `mambakit` command prints as is, without a traceback (MAMBAKIT_DEBUG=1 shows it). It is a ValueError, so
code that already catches bad values catches it too. Apps raise it (or a subclass) for input the user must
fix; a bug in mambakit stays an ordinary exception with its traceback.
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what is wrong with it."""
