"""Sizes read from files, bounded before they size anything.

A header, a manifest or a key name is written by whoever made the file: a number in it that decides
how much memory selfflow allocates (a shape, a count, a depth) goes through `bounded_size` (one
number) or `bounded_bytes` (a shape times an item size, multiplied in Python integers so that no
product wraps) first. Each refusal is one line naming the file, the field and the bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DAMAGED = "the file is damaged or not made for this job"


class FileSizeError(ValueError):
    """A size read from a file is not a whole number within its bound."""


def bounded_size(value: Any, bound: int, what: str, minimum: int = 1) -> int:
    """`value` as an int in [minimum, bound], or FileSizeError naming `what` (the file and field).

    Args:
        value: the number as read from the file (anything: it is checked to be a whole number
            first).
        bound: the largest value accepted.
        what: the file and field, e.g. "manifest.json latent_channels".
        minimum: the smallest value accepted.

    Returns:

        The value as a Python int.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise FileSizeError(f"{what} is {value!r:.60}, not a whole number; {DAMAGED}")
        value = int(value)
    if not minimum <= value <= bound:
        raise FileSizeError(f"{what} is {value}, outside [{minimum}, {bound}]; {DAMAGED}")
    return value


def bounded_bytes(shape: Sequence[Any], itemsize: int, bound: int, what: str) -> int:
    """The bytes an array of `shape` and `itemsize` takes, or FileSizeError when that exceeds
    `bound`.

    Args:
        shape: sizes read from the file (each checked to be a whole number >= 0).
        itemsize: bytes per element.
        bound: the largest total accepted, in bytes.
        what: the file and field, named in the refusal.

    Returns:

        The total in bytes.
    """
    where = f"{what} (a size of {list(shape)})"
    sizes = [bounded_size(n, 1 << 63, where, minimum=0) for n in shape]
    total = math.prod(sizes) * itemsize
    if total > bound:
        declared = f"{what} declares {list(shape)} ({total:,} bytes)"
        raise FileSizeError(f"{declared}, above the {bound:,} bytes accepted; {DAMAGED}")
    return total
