"""``torchbayes evaluate``: predict a checkpoint's test and held-out inputs and write the report."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from torchbayes.cli.arguments import (
    BadInput,
    Console,
    add_common,
    add_data,
    check_apart,
    check_image_size,
    check_output_folder,
    data_source,
    image_inputs,
    input_checks,
    load_data,
    positive_int,
    probability,
    sample_count,
)
from torchbayes.cli.errors import EXIT_OK
from torchbayes.cli.tabular import add_table_arguments
from torchbayes.cli.training import Checkpoint, TrainConfig, load_checkpoint, model_label
from torchbayes.datasets import DatasetSplits

__all__ = ["add_parser", "evaluate_and_report", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand and its options to ``commands``."""
    parser = commands.add_parser(
        "evaluate",
        help="evaluate a checkpoint and write the report",
        description="Predict the test (and held-out) inputs of the data a "
        "checkpoint was trained on and write the report.",
    )
    parser.add_argument("checkpoint", help="a checkpoint written by 'torchbayes train'")
    add_data(parser, required_default=None)
    parser.add_argument(
        "--num-samples", type=sample_count, default=None, help="Monte Carlo samples (default: the checkpoint's)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=128, help="inputs per prediction call (default 128)")
    parser.add_argument(
        "--prediction",
        choices=("mc", "moments"),
        default="mc",
        help="how a Bayesian model predicts: mc (Monte Carlo samples, default) or moments "
        "(one pass propagating means and variances; see docs/moments.md)",
    )
    parser.add_argument(
        "--conformal",
        type=probability,
        default=None,
        metavar="ALPHA",
        help="add split conformal prediction sets (LAC, APS, RAPS) at miscoverage ALPHA, e.g. 0.1 for 90%% "
        "coverage: calibrated on a stratified half of the test split, coverage and set size measured on "
        "the other half (see docs/conformal.md)",
    )
    parser.add_argument("--out", default="torchbayes-report", help="report folder (default ./torchbayes-report)")
    add_table_arguments(parser, training=False)
    parser.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="table regressors: leave out the baselines (plain network with learned noise, MC dropout, deep "
        "ensemble) trained on the same training split for the report",
    )
    add_common(parser)


def evaluate_and_report(
    model: nn.Module,
    config: TrainConfig,
    data: DatasetSplits,
    *,
    history: Sequence[Mapping[str, Any]],
    out_dir: str,
    num_samples: int,
    batch_size: int,
    args: argparse.Namespace,
    console: Console,
    int8: bool = False,
    prediction: str = "mc",
    conformal: float | None = None,
) -> None:
    """Evaluate ``model`` on ``data``'s test and held-out inputs, print the comparison and write
    the report to ``out_dir`` (shared by ``train --report`` and ``evaluate``)."""
    from torchbayes.cli.evaluation import describe_data, evaluate_classifier
    from torchbayes.cli.report import comparison_table, write_report
    from torchbayes.prediction.moments import UnsupportedOperationError

    name = f"{model_label(config)}{' INT8' if int8 else ''}{' (moments)' if prediction == 'moments' else ''}"
    try:
        evaluation = evaluate_classifier(
            model,
            data,
            name=name,
            num_samples=num_samples,
            batch_size=batch_size,
            device=args.device,
            seed=args.seed,
            show_progress=not args.quiet,
            dropout=config.method == "dropout",
            prediction=prediction,
            conformal=conformal,
        )
    except UnsupportedOperationError as e:  # the model cannot propagate moments: the user's choice
        raise BadInput(f"--prediction moments: {e}") from e
    except ValueError as e:
        if conformal is None or "conformal" not in str(e):
            raise
        raise BadInput(f"--conformal {conformal}: {e}") from e
    if history:  # its pre-training included
        evaluation.metrics["train_seconds"] = float(sum(h.get("seconds", 0.0) for h in history))
    console(comparison_table([evaluation]))
    settings = {"data": describe_data(data), "model": config.to_dict(), "num_samples": num_samples}
    report = write_report(
        out_dir, [evaluation], title=f"torchbayes: {name} on {data.name}", settings=settings, histories={name: history}
    )
    console(f"report: {report.html}")
    if args.quiet:
        print(report.html)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``torchbayes evaluate`` with parsed ``args``; returns the exit code."""
    check_apart({"--out": args.out}, {"checkpoint": args.checkpoint, "--data": args.data, **image_inputs(args)})
    check_image_size(args)
    check_output_folder(args.out, "--out")
    with input_checks("checkpoint"):
        ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.config
    if ckpt.table is not None:
        return _run_table(args, ckpt, console)
    if args.data is not None:
        raise BadInput(f"--data reads a table; checkpoint {args.checkpoint!r} holds an image model (use --dataset)")
    if args.prediction == "moments" and (ckpt.int8 or config.method != "bayesian"):
        what = "an INT8 model" if ckpt.int8 else f"a {model_label(config)} model"
        raise BadInput(
            f"--prediction moments propagates the moments of float Bayesian layers; checkpoint "
            f"{args.checkpoint!r} holds {what} (use --prediction mc)"
        )
    dataset, data_root = data_source(args, config)
    same_data = args.dataset is None
    data = load_data(
        dataset,
        data_root,
        args.image_size or config.image_size,
        config.ood_classes if args.ood_classes is None else args.ood_classes,
        config.seed,
    )
    if data.input_shape != ckpt.input_shape or data.num_classes != ckpt.num_classes:
        raise BadInput(
            f"checkpoint {args.checkpoint!r} expects inputs {ckpt.input_shape} and "
            f"{ckpt.num_classes} classes, but --dataset {dataset!r} has inputs {data.input_shape} "
            f"and {data.num_classes} classes"
        )
    if not same_data:
        console(f"note: evaluating on {data.name}, not {config.dataset} (the training data)")
    model = ckpt.model.to(args.device)
    evaluate_and_report(
        model,
        config,
        data,
        history=ckpt.history,
        out_dir=args.out,
        num_samples=args.num_samples or config.num_samples,
        batch_size=args.batch_size,
        args=args,
        console=console,
        int8=ckpt.int8,
        prediction=args.prediction,
        conformal=args.conformal,
    )
    return EXIT_OK


def _run_table(args: argparse.Namespace, ckpt: Checkpoint, console: Console) -> int:
    """``evaluate`` of a model trained on a table (``--data`` gives the file)."""
    from torchbayes.cli.tabular import evaluation_rows, report_table_model

    assert ckpt.table is not None
    images = [f for f, v in (("--dataset", args.dataset), ("--data-root", args.data_root)) if v is not None]
    if images:
        raise BadInput(f"{images[0]} reads images; checkpoint {args.checkpoint!r} holds a table model (use --data)")
    if args.prediction == "moments":
        raise BadInput("--prediction moments is for image classifiers; a table model predicts with --prediction mc")
    if args.conformal is not None:
        raise BadInput("--conformal is for image classifiers; for a table model use torchbayes.conformal in Python")
    splits, table = evaluation_rows(args.data, args.checkpoint, ckpt.table, ckpt.config, console)
    report_table_model(
        ckpt.model.to(args.device),
        ckpt.config,
        ckpt.table,
        splits,
        table,
        history=ckpt.history,
        out_dir=args.out,
        num_samples=args.num_samples or ckpt.config.num_samples,
        batch_size=args.batch_size,
        baselines=args.baselines,
        args=args,
        console=console,
    )
    return EXIT_OK
