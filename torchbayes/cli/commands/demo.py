"""``torchbayes demo``: the main job, every method on real MNIST digits, with a report."""

from __future__ import annotations

import argparse

from torchbayes.cli.arguments import Console, add_common, check_output_folder
from torchbayes.cli.errors import EXIT_OK

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand and its options to ``commands``."""
    parser = commands.add_parser(
        "demo",
        help="train a deterministic LeNet and its Bayesian twin on MNIST digits and write a report",
        description="Train a deterministic network and its Bayesian twin (dnn_to_bnn + MOPED) on real "
        "handwritten digits, with two digit classes held out as out-of-distribution inputs, "
        "print a comparison and write an HTML/JSON report. Under a minute on 2 CPU cores.",
    )
    parser.add_argument("--out", default="torchbayes-demo", help="report folder (default ./torchbayes-demo)")
    parser.add_argument("--quick", action="store_true", help="reduced version: an MLP on 8x8 digits, seconds")
    add_common(parser)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``torchbayes demo`` with parsed ``args``; returns the exit code."""
    from torchbayes.cli.demo import run_demo

    check_output_folder(args.out, "--out")

    result = run_demo(
        args.out, quick=args.quick, seed=args.seed, device=args.device, show_progress=not args.quiet, echo=console
    )
    if args.quiet:
        print(result.report.html)
    return EXIT_OK
