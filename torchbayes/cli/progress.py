"""Progress bars on stderr, shown only to a person watching a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, desc: str, enabled: bool = True, unit: str = "it") -> Iterator[T]:
    """Iterate over ``iterable`` with a tqdm bar on stderr.

    The bar is left out when ``enabled`` is false, when stderr is not a terminal (logs and
    pipes stay clean), or when tqdm is not installed.

    Args:
        iterable: what to iterate over (a sized one gives a bar with a total).
        desc: label in front of the bar.
        enabled: ``False`` for ``--quiet``.
        unit: name of one step.

    Returns:
        An iterator over ``iterable``'s items.
    """
    if not enabled or not sys.stderr.isatty():
        return iter(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the 'cli' extra is missing: no bar, same results
        return iter(iterable)
    return iter(tqdm(iterable, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True))
