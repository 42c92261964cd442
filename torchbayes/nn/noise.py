"""The source of Monte Carlo noise used by every Bayesian layer.

All randomness in torchbayes' layers goes through :func:`randn` and :func:`random_signs`,
so a single :func:`noise_generator` context makes a whole model's draws reproducible
without touching PyTorch's global random state.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["noise_generator", "randn", "random_signs"]

_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "torchbayes_noise_generator", default=None
)


@contextlib.contextmanager
def noise_generator(seed_or_generator: int | torch.Generator | None) -> Iterator[torch.Generator | None]:
    """Draw all Bayesian-layer noise inside the block from one generator.

    Args:
        seed_or_generator: an integer seed (a fresh CPU generator is made from it),
            a ``torch.Generator`` (used as is; it must live on the model's device),
            or ``None`` (use PyTorch's global generator, the default).

    Returns:
        A context manager yielding the generator in force.

    Example:
        >>> with noise_generator(0):
        ...     y1 = model(x)
        >>> with noise_generator(0):
        ...     y2 = model(x)   # identical to y1
    """
    if seed_or_generator is None or isinstance(seed_or_generator, torch.Generator):
        gen = seed_or_generator
    elif isinstance(seed_or_generator, int) and not isinstance(seed_or_generator, bool):
        gen = torch.Generator().manual_seed(seed_or_generator)
    else:
        raise TypeError(
            "seed_or_generator must be an int, a torch.Generator or None, "
            f"got {type(seed_or_generator).__name__}"
        )
    token = _GENERATOR.set(gen)
    try:
        yield gen
    finally:
        _GENERATOR.reset(token)


def randn(shape: Sequence[int], like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype and device."""
    gen = _GENERATOR.get()
    if gen is None:
        # No ``generator=`` keyword: ``generator=None`` selects aten.randn.generator, which
        # torch.export cannot trace with a symbolic batch size and ONNX cannot convert.
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    if gen.device == like.device:
        return torch.randn(shape, dtype=like.dtype, device=like.device, generator=gen)
    # A seeded CPU generator driving an accelerator model: draw on the CPU, then move.
    return torch.randn(shape, dtype=like.dtype, generator=gen).to(like.device)


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return is_exporting() if is_exporting is not None else torch.compiler.is_compiling()


# Sign bit and the bit pattern of 1.0 in IEEE float32: (bits & _SIGN_BIT) | _ONE_BITS is +/-1.0.
_SIGN_BIT = -(2**31)
_ONE_BITS = 0x3F800000
_BIT_SHIFTS = torch.arange(31, -1, -1, dtype=torch.int32, device="cpu")


def random_signs(shape: Sequence[int], like: Tensor) -> Tensor:
    """Independent +/-1 entries (Rademacher noise) of ``shape``, as used by flipout."""
    gen = _GENERATOR.get()
    device = like.device if gen is None else gen.device
    extra = {} if gen is None else {"generator": gen}
    if _is_exporting():
        # torch.export / ONNX with a symbolic batch take the plain form: one uniform per
        # sign, which symbolic shapes and ONNX handle.
        signs = torch.rand(shape, dtype=like.dtype, device=device, **extra).lt(0.5)
        return signs.to(like.dtype).mul(2.0).sub(1.0).to(like.device)
    numel = math.prod(shape)
    # One uniform 32-bit draw yields 32 signs (the generator is the serial bottleneck).
    # Each bit is shifted into the float32 sign bit and OR-ed with 1.0's exponent bits:
    # the int32 words then ARE the floats +/-1.0, with no conversion or arithmetic pass.
    words = torch.randint(-(2**31), 2**31, ((numel + 31) // 32, 1), dtype=torch.int32, device=device, **extra)
    shifts = _BIT_SHIFTS if device.type == "cpu" else _BIT_SHIFTS.to(device)
    bits = torch.bitwise_left_shift(words, shifts).bitwise_and_(_SIGN_BIT).bitwise_or_(_ONE_BITS)
    signs = bits.view(torch.float32).reshape(-1)[:numel].reshape(shape)
    if signs.dtype != like.dtype:
        signs = signs.to(like.dtype)
    return signs if signs.device == like.device else signs.to(like.device)
