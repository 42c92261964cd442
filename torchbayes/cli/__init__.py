"""The ``torchbayes`` command-line tool (``torchbayes`` or ``python -m torchbayes``).

Subcommands: ``demo`` (a deterministic network and its Bayesian twin compared on real
digits, with an HTML report), ``train``, ``evaluate`` and ``quantize``. Run
``torchbayes COMMAND --help`` for the options; exit codes are documented in
:mod:`torchbayes.cli.main`.
"""

from torchbayes.cli.main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USAGE, build_parser, main

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "EXIT_USAGE", "build_parser", "main"]
