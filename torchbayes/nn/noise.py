"""The source of Monte Carlo noise used by every Bayesian layer.

All randomness in torchbayes' layers goes through :func:`randn` and :func:`random_signs`,
so a single :func:`noise_generator` context makes a whole model's draws reproducible
without touching PyTorch's global random state.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import math
import os
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from torchbayes.validation import seeded_generator

__all__ = ["noise_generator", "randn", "normal_", "random_signs"]

_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "torchbayes_noise_generator", default=None
)


@contextlib.contextmanager
def noise_generator(seed_or_generator: int | torch.Generator | None) -> Iterator[torch.Generator | None]:
    """Draw all Bayesian-layer noise inside the block from one generator.

    Args:
        seed_or_generator: an integer seed from 0 to ``2**64 - 1`` (a fresh CPU generator is made from it),
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
    gen = seeded_generator(seed_or_generator, "seed_or_generator")
    token = _GENERATOR.set(gen)
    try:
        yield gen
    finally:
        _GENERATOR.reset(token)


def randn(shape: Sequence[int], like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype and device."""
    gen = _GENERATOR.get()
    if _parallel_ok(like, gen) and math.prod(shape) >= _PARALLEL_FROM:  # this order: no size guard when tracing
        return _parallel_normal_(torch.empty(shape, dtype=like.dtype), gen)
    if gen is None:
        # No ``generator=`` keyword: ``generator=None`` selects aten.randn.generator, which
        # torch.export cannot trace with a symbolic batch size and ONNX cannot convert.
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    if gen.device == like.device:
        return torch.randn(shape, dtype=like.dtype, device=like.device, generator=gen)
    # A seeded CPU generator driving an accelerator model: draw on the CPU, then move.
    return torch.randn(shape, dtype=like.dtype, generator=gen).to(like.device)


def normal_(out: Tensor) -> Tensor:
    """Fill ``out`` in place with standard normal noise (as :func:`randn` would draw it) and return it."""
    gen = _GENERATOR.get()
    if _parallel_ok(out, gen) and out.numel() >= _PARALLEL_FROM and out.is_contiguous():
        return _parallel_normal_(out, gen)
    if gen is None or gen.device == out.device:
        return out.normal_(generator=gen)
    return out.copy_(torch.randn(out.shape, dtype=out.dtype, generator=gen))


# torch's CPU normal generator is one serial Mersenne twister (about 4 ns per number), the
# largest single cost of a training step once a model has millions of weights (ResNet-18:
# 11M). From _PARALLEL_FROM numbers on, a draw is cut into _CHUNK-sized pieces, each drawn
# by its own Mersenne twister on up to torch.get_num_threads() threads. Each piece's
# twister gets a full random 19,968-bit state drawn from the active generator, so the
# numbers depend only on that generator (seeded runs stay reproducible, whatever the thread
# count) and distinct pieces never share a stream (a 32-bit seed, all manual_seed takes,
# would make repeats likely over a long run).
_PARALLEL_FROM = 1 << 20
_CHUNK = 1 << 18
_MT_WORDS = 624  # 32-bit words of the Mersenne twister's state


def _state_layout() -> tuple[Tensor, int] | None:
    """A template generator state and the byte offset of its 624 twister words, or None.

    ``Generator.set_state`` takes torch's serialised state: the seed, counters, then the
    624 words, each stored as a 64-bit integer. The layout is private, so it is checked
    here against the twister's published seeding recurrence; if torch ever changes it,
    this returns None and draws stay serial.
    """
    seed = 20_240_521
    words = [seed]
    for i in range(1, 4):
        prev = words[-1]
        words.append((1_812_433_253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    state = torch.Generator().manual_seed(seed).get_state()
    offset = 24  # int64 seed, int32 left, int32 seeded, uint64 next
    if state.numel() < offset + 8 * _MT_WORDS or state.dtype != torch.uint8:
        return None
    found = state[offset : offset + 8 * len(words)].view(torch.int64).tolist()
    if found != words:
        return None
    return state, offset


_LAYOUT = _state_layout()
_POOL: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def _parallel_ok(like: Tensor, gen: torch.Generator | None) -> bool:
    return (
        not torch.compiler.is_compiling()
        and _LAYOUT is not None
        and like.device.type == "cpu"
        and (gen is None or gen.device.type == "cpu")
        and like.dtype.is_floating_point
    )


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The helper threads (made again after a fork: threads do not survive one)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1]._max_workers < workers:
            _POOL = (os.getpid(), concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="torchbayes-noise"))
        return _POOL[1]


def _parallel_normal_(out: Tensor, gen: torch.Generator | None) -> Tensor:
    """Fill the contiguous CPU tensor ``out`` with N(0, 1) noise, piece by piece, in parallel."""
    assert _LAYOUT is not None
    template, offset = _LAYOUT
    flat = out.view(-1)
    pieces = flat.split(_CHUNK)
    # The twisters' states: random 32-bit words (stored as 64-bit) from the active generator.
    words = torch.randint(0, 2**32, (len(pieces), _MT_WORDS), dtype=torch.int64, generator=gen)
    jobs = iter(range(len(pieces)))
    lock = threading.Lock()

    def work() -> None:
        piece_gen = torch.Generator()
        state = template.clone()  # set_state wants a tensor of its own (a row view crashes it)
        while True:
            with lock:
                i = next(jobs, None)
            if i is None:
                return
            state[offset : offset + 8 * _MT_WORDS].view(torch.int64).copy_(words[i])
            piece_gen.set_state(state)
            pieces[i].normal_(generator=piece_gen)

    helpers = min(torch.get_num_threads(), len(pieces)) - 1
    futures = [_pool(helpers).submit(work) for _ in range(helpers)] if helpers > 0 else []
    work()
    for future in futures:
        future.result()
    return out


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
    if _is_exporting():
        # torch.export / ONNX with a symbolic batch take the plain form: one uniform per
        # sign, which symbolic shapes and ONNX handle (no generator argument when unseeded).
        uniform = (
            torch.rand(shape, dtype=like.dtype, device=device)
            if gen is None
            else torch.rand(shape, dtype=like.dtype, device=device, generator=gen)
        )
        signs = uniform.lt(0.5)
        return signs.to(like.dtype).mul(2.0).sub(1.0).to(like.device)
    numel = math.prod(shape)
    # One uniform 32-bit draw yields 32 signs (the generator is the serial bottleneck).
    # Each bit is shifted into the float32 sign bit and OR-ed with 1.0's exponent bits:
    # the int32 words then ARE the floats +/-1.0, with no conversion or arithmetic pass.
    words = torch.randint(-(2**31), 2**31, ((numel + 31) // 32, 1), dtype=torch.int32, device=device, generator=gen)
    shifts = _BIT_SHIFTS if device.type == "cpu" else _BIT_SHIFTS.to(device)
    bits = torch.bitwise_left_shift(words, shifts).bitwise_and_(_SIGN_BIT).bitwise_or_(_ONE_BITS)
    signs = bits.view(torch.float32).reshape(-1)[:numel].reshape(shape)
    if signs.dtype != like.dtype:
        signs = signs.to(like.dtype)
    return signs if signs.device == like.device else signs.to(like.device)
