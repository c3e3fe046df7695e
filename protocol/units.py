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
# Far above any guest this project can run, far below what overflows a C
# off_t or a nanosecond count derived from it.
MAX_SIZE = 1 << 50
# The mocked guest models its free lists pageblock by pageblock (1 TiB: half a
# million of them, ~200 MB and seconds per pass); a real guest this size is
# far beyond any host this study runs on.
MAX_GUEST_MEMORY = 1 << 40


def parse_size(text: str) -> int:
    """'1G', '512M', '64K', '4096' (binary units) -> bytes, at most MAX_SIZE;
    ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a size such as 512M or 1G")
    digits = match.group(1).lstrip("0") or "0"
    # 20 digits are already above MAX_SIZE; int() of thousands would raise its own error.
    value = int(digits) * _UNITS[match.group(2).upper()] if len(digits) <= 20 else MAX_SIZE + 1
    if value > MAX_SIZE:
        raise ValueError(f"'{text.strip()}' is larger than {format_size(MAX_SIZE)}")
    return value


def parse_guest_memory(text: str) -> int:
    """A guest RAM size: parse_size, above 0 and at most MAX_GUEST_MEMORY."""
    size = parse_size(text)
    if not 0 < size <= MAX_GUEST_MEMORY:
        raise ValueError(
            f"guest memory '{text.strip()}' is not between 1 byte and "
            f"{format_size(MAX_GUEST_MEMORY)}"
        )
    return size


def format_size(size: int) -> str:
    """Bytes as the largest binary unit that divides them exactly: 1024M -> '1G'."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    if size >= 1 << 10 and size % (1 << 10) == 0:
        return f"{size >> 10}K"
    return str(size)


MAX_COUNT = 10_000_000  # reports, rounds, seconds, MiB: beyond any run this tool makes


def parse_positive_int(text: str) -> int:
    """A count given on a command line: 1 to MAX_COUNT."""
    digits = text.strip()
    if len(digits) > 20:  # never hand int() a digit string it would refuse itself
        raise ValueError(f"'{text}' is larger than {MAX_COUNT}")
    try:
        value = int(digits)
    except ValueError:
        raise ValueError(f"'{text}' is not an integer") from None
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    if value > MAX_COUNT:
        raise ValueError(f"{value} is larger than {MAX_COUNT}")
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
