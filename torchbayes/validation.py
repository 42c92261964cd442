"""Checks of the plain arguments the public API shares: on/off flags and random seeds.

Python treats any non-empty string as true, so ``dropout="False"`` would switch MC
dropout on; and ``torch.Generator.manual_seed`` overflows with a bare
"Overflow when unpacking long long" from ``2**64`` on. Every public function taking a
flag or a seed checks it here, so the message names the argument and is the same
everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MAX_SEED", "check_flag", "check_seed", "seeded_generator"]

#: The largest seed a ``torch.Generator`` takes (64 unsigned bits).
MAX_SEED = 2**64 - 1


def check_flag(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` if it is ``True`` or ``False`` (or ``None`` when allowed), else ``TypeError``.

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        allow_none: ``None`` is a valid value (e.g. "decide for me").

    Returns:
        ``value``.

    Example:
        >>> check_flag("dropout", "False")
        Traceback (most recent call last):
        TypeError: dropout must be True or False, got 'False' (str)
    """
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    expected = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})"[:200])


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` if it is an integer seed a ``torch.Generator`` takes (0 to ``2**64 - 1``).

    Raises:
        TypeError: not an int (a bool or a float is refused too).
        ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer from 0 to 2**64 - 1, got {type(value).__name__}")
    if not 0 <= value <= MAX_SEED:
        shown = repr(value) if len(repr(value)) <= 30 else f"{repr(value)[:27]}..."
        raise ValueError(f"{name} must be an integer from 0 to 2**64 - 1, got {shown}")
    return value


def seeded_generator(seed: int | torch.Generator | None, name: str = "seed") -> torch.Generator | None:
    """A fresh CPU generator seeded with ``seed``, a given generator as is, or ``None``.

    Args:
        seed: an integer (checked with :func:`check_seed`), a ``torch.Generator`` or ``None``.
        name: the argument's name, for the message.

    Raises:
        TypeError, ValueError: see :func:`check_seed`.
    """
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, a torch.Generator or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(check_seed(seed, name))
