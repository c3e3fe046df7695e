"""What the command lines share: parsing the sizes and counts users type
(`512M`, `1G`), and the two-column tables they print."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
ParsedT = TypeVar("ParsedT")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'1G', '512M', '64K', '4096' (binary units) -> bytes; ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a size such as 512M or 1G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"'{text}' is not an integer") from None
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def argument_type(parse: Callable[[str], ParsedT]) -> Callable[[str], ParsedT]:
    """Wrap a parser for argparse so its own message reaches the user."""

    def convert(text: str) -> ParsedT:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def two_columns(rows: Sequence[tuple[str, str]]) -> str:
    """Label/value rows as a table: labels padded to the longest, two spaces, the value."""
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
