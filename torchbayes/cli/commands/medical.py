"""``torchbayes medical``: breast-cancer triage with referral curves."""

from __future__ import annotations

import argparse

from torchbayes.cli.arguments import Console, add_common, check_output_folder
from torchbayes.cli.errors import EXIT_OK

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``medical`` subcommand and its options to ``commands``."""
    parser = commands.add_parser(
        "medical",
        help="breast-cancer triage: which diagnoses to refer to a doctor (referral curves)",
        description="Train a deterministic MLP and its Bayesian twin on scikit-learn's breast-cancer data "
        "(Wisconsin diagnostic) and report the referral curve: accuracy on the cases each model "
        "keeps when the most uncertain ones are referred, against random referral.",
    )
    parser.add_argument("--out", default="torchbayes-medical", help="report folder (default ./torchbayes-medical)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and samples (what the tests run)")
    add_common(parser)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``torchbayes medical`` with parsed ``args``; returns the exit code."""
    from torchbayes.cli.medical import run_medical

    check_output_folder(args.out, "--out")

    result = run_medical(
        args.out, quick=args.quick, seed=args.seed, device=args.device, show_progress=not args.quiet, echo=console
    )
    if args.quiet:
        print(result.report.html)
    return EXIT_OK
