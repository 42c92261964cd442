"""Exit codes of the ``torchbayes`` command and the exceptions that choose them.

- `EXIT_OK` (0): success.
- `EXIT_FAILURE` (1): the run failed: training diverged (a NaN or infinite loss or
  parameter; no checkpoint is written), or an error while predicting or writing files (a
  full disk).
- `EXIT_USAGE` (2): bad usage or input: unknown option, data set or model name, a missing
  file or folder, an output path that cannot be written, a checkpoint that is corrupted,
  crafted, non-finite or does not fit, a non-positive number of epochs or samples...
- `EXIT_INTERRUPTED` (130): interrupted (Ctrl-C, SIGINT); temporary files are removed.
- `EXIT_TERMINATED` (143): terminated (SIGTERM); temporary files are removed.
"""

from __future__ import annotations

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "BadInput", "Terminated"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class BadInput(Exception):
    """The user's input cannot be used (exit code 2)."""


class Terminated(BaseException):
    """SIGTERM arrived: raised like KeyboardInterrupt, so that every ``finally`` and
    ``except BaseException`` (temporary files) runs before the process exits with 143."""
