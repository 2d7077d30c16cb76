"""Conversions shared by the config dataclasses: each error names the flag and the bad value.

Every user-facing error of the config tree is an :class:`EDLConfigError` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from megatron_edl.core.options import EDLConfigError

__all__ = [
    "as_enum",
    "as_float",
    "as_int",
    "as_names",
    "choices",
    "fields_from_args",
]


def choices(enum: type[StrEnum]) -> str:
    """``"a, b, c"``: the values of ``enum`` in definition order."""
    return ", ".join(member.value for member in enum)


def as_enum[E: StrEnum](flag: str, value: Any, enum: type[E]) -> E:
    """Convert an enum member or a (case-insensitive) string to ``enum``."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(value.strip().lower())
        except ValueError:
            pass
    raise EDLConfigError(f"unknown {flag} {value!r}; choose from {choices(enum)}")


def as_names(value: Any, num_domains: int | None) -> tuple[str, ...] | None:
    """Normalise ``domain_names``: ``None`` or unique non-empty strings, ``num_domains`` of them."""
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise EDLConfigError(f"domain_names must be a sequence of non-empty strings, got {value!r}")
    names = tuple(value)
    if num_domains is not None and len(names) != num_domains:
        raise EDLConfigError(f"{len(names)} domain names {names} for {num_domains} domains")
    if len(set(names)) != len(names):
        raise EDLConfigError(f"domain names must be unique, got {names}")
    return names


def as_float(flag: str, value: Any) -> float:
    """Convert a real number or a numeric string to ``float`` (bools are rejected)."""
    if isinstance(value, bool):
        raise EDLConfigError(f"{flag} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EDLConfigError(f"{flag} must be a number, got {value!r}") from None


def as_int(flag: str, value: Any, *, minimum: int) -> int:
    """Convert an integer (or a decimal string) to ``int`` and check ``value >= minimum``."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise EDLConfigError(f"{flag} must be an integer, got {value!r}")
    if number < minimum:
        raise EDLConfigError(f"{flag} must be >= {minimum}, got {value!r}")
    return number


def fields_from_args(args: Any, flags: Mapping[str, str]) -> dict[str, Any]:
    """``{field: value}`` of each flag in ``flags`` (field -> flag) that ``args`` holds, its
    attribute being the flag's argparse ``dest`` (``--a-b`` -> ``a_b``)."""
    kwargs: dict[str, Any] = {}
    for field, flag in flags.items():
        dest = flag.removeprefix("--").replace("-", "_")
        if hasattr(args, dest):
            kwargs[field] = getattr(args, dest)
    return kwargs
