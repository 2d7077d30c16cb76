"""The error of the data tools' inputs and options."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A bad input or option of preprocessing, merge, clustering or the classifier labeller: one
    line naming the file, line, flag or value."""
