"""The ``torchbayes`` command: ``demo``, ``medical``, ``train``, ``evaluate`` and ``quantize``.

Exit codes (stable, for scripts):

* ``0``: success.
* ``1``: the run failed: training diverged (a NaN or infinite loss or parameter; no
  checkpoint is written), or an error while predicting or writing files (a full disk).
* ``2``: bad usage or input: unknown option, data set or model name, a missing file or
  folder, an output path that cannot be written, a checkpoint that is corrupted,
  crafted, non-finite or does not fit, a non-positive number of epochs or samples...
* ``130``: interrupted (Ctrl-C, SIGINT); temporary files are removed.
* ``143``: terminated (SIGTERM); temporary files are removed.

Errors are one line on stderr, ``torchbayes <command>: error: ...``, without a
traceback; set ``TORCHBAYES_DEBUG=1`` to get the traceback too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torchbayes.cli.arguments import Console
from torchbayes.cli.commands import COMMANDS
from torchbayes.cli.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    BadInput,
    Terminated,
)
from torchbayes.cli.training import TrainingDiverged

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]


@contextlib.contextmanager
def _signals_raise() -> Iterator[list[int]]:
    """While the command runs, SIGINT raises KeyboardInterrupt and SIGTERM raises
    :class:`Terminated`; the list yielded records the signals received (an exception raised
    inside C++ code, e.g. torch.save's writer, may come out as a RuntimeError)."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (main() called from a worker thread): leave signals alone
        previous = {}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchbayes`` command: one subcommand per module of
    `torchbayes.cli.commands`."""
    from torchbayes import __version__

    parser = argparse.ArgumentParser(
        prog="torchbayes",
        description="Train, evaluate and compare Bayesian neural networks on real data.",
        epilog="exit codes: 0 success, 1 failure while running (e.g. training diverged), 2 bad usage or "
        "input, 130 interrupted, 143 terminated",
    )
    parser.add_argument("--version", action="version", version=f"torchbayes {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


#: What each subcommand runs (looked up at call time, so a test can replace one).
_COMMANDS: dict[str, Callable[[argparse.Namespace, Console], int]] = {
    name: command.run for name, command in COMMANDS.items()
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``torchbayes`` command.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code (see the module docstring); the console script exits with it.

    Example:
        >>> main(["demo", "--quick", "--out", "report"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
        return int(e.code or 0)
    prog = f"torchbayes {args.command}"
    debug = os.environ.get("TORCHBAYES_DEBUG", "") not in ("", "0")
    with _signals_raise() as received:
        try:
            return _COMMANDS[args.command](args, Console(args.quiet))
        except BadInput as e:
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated:
            print(f"{prog}: terminated", file=sys.stderr)
            return EXIT_TERMINATED
        except TrainingDiverged as e:
            lost = "no checkpoint was written" if args.command == "train" else "no report was written"
            print(f"{prog}: failed: training diverged: {e}; {lost}", file=sys.stderr)
            return EXIT_FAILURE
        except Exception as e:  # a runtime failure: one line, the traceback only on request
            if received:  # a signal raised inside C++ code comes out as another exception
                terminated = received[0] == signal.SIGTERM
                print(f"{prog}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
                return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
            if debug:
                traceback.print_exc()
            if isinstance(e, OSError) and e.strerror:  # "No space left on device", "Permission denied"...
                where = f": {e.filename!r}" if e.filename else ""
                print(f"{prog}: failed: {e.strerror}{where}", file=sys.stderr)
                return EXIT_FAILURE
            detail = " ".join(str(e).split())[:500] or ("out of memory" if isinstance(e, MemoryError) else "no message")
            print(
                f"{prog}: failed: {type(e).__name__}: {detail} (TORCHBAYES_DEBUG=1 shows the traceback)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
