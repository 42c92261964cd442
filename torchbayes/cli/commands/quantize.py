"""``torchbayes quantize``: turn a Bayesian checkpoint into an INT8 model that still samples."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from torch import nn

from torchbayes.cli.arguments import (
    BadInput,
    Console,
    add_common,
    add_data,
    check_apart,
    check_image_size,
    check_output_file,
    check_output_folder,
    data_source,
    image_inputs,
    input_checks,
    load_data,
    positive_int,
    shown,
)
from torchbayes.cli.errors import EXIT_OK
from torchbayes.cli.training import Checkpoint, load_checkpoint, model_label, save_checkpoint
from torchbayes.datasets import DatasetSplits

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` subcommand and its options to ``commands``."""
    parser = commands.add_parser(
        "quantize",
        help="turn a Bayesian checkpoint into an INT8 model",
        description="Quantize a Bayesian checkpoint to INT8 (it keeps sampling).",
    )
    parser.add_argument("checkpoint", help="a Bayesian checkpoint written by 'torchbayes train'")
    parser.add_argument("--out", default=None, help="output file (default <checkpoint>-int8.pt)")
    parser.add_argument(
        "--calibration-samples",
        type=positive_int,
        default=256,
        help="training images used to calibrate activations (default 256)",
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="also evaluate the float and the INT8 model side by side (metrics and time) and write the report here",
    )
    add_data(parser, required_default=None)
    add_common(parser)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``torchbayes quantize`` with parsed ``args``; returns the exit code."""
    from torchbayes.quantization import quantize

    source = Path(args.checkpoint)
    out = check_output_file(args.out or source.with_name(source.stem + "-int8" + source.suffix), "--out")
    check_apart({"--out": out, "--report": args.report}, {"checkpoint": args.checkpoint, **image_inputs(args)})
    if args.report is not None:
        check_output_folder(args.report, "--report")
    check_image_size(args)
    with input_checks("checkpoint"):
        ckpt = load_checkpoint(args.checkpoint)
    if ckpt.table is not None:
        raise BadInput(f"checkpoint {args.checkpoint!r} holds a model of a table; quantize handles image models")
    if not ckpt.config.bayesian or ckpt.int8:
        what = "an INT8 model already" if ckpt.int8 else "a deterministic model"
        raise BadInput(f"checkpoint {args.checkpoint!r} holds {what}; quantize expects a Bayesian float one")
    config = ckpt.config
    dataset, data_root = data_source(args, config)
    data = load_data(
        dataset,
        data_root,
        args.image_size or config.image_size,
        config.ood_classes if args.ood_classes is None else args.ood_classes,
        config.seed,
    )
    if data.input_shape != ckpt.input_shape:
        raise BadInput(
            f"checkpoint {args.checkpoint!r} expects inputs {ckpt.input_shape}, but --dataset "
            f"{shown(dataset)} has inputs {data.input_shape}"
        )
    # Static activation ranges from training images (what the model saw), not test ones.
    with warnings.catch_warnings(record=True) as caught:  # shown as one line each, like ours
        warnings.simplefilter("always")
        quantized = quantize(ckpt.model.eval(), data.train_x[: args.calibration_samples])
    for warning in caught:
        print(f"torchbayes quantize: warning: {warning.message}", file=sys.stderr, flush=True)
    save_checkpoint(out, quantized, config, ckpt.input_shape, ckpt.num_classes, ckpt.history, int8=True)
    sizes = source.stat().st_size, out.stat().st_size
    console(
        f"INT8 model: {out} ({sizes[1] / 1e6:.2f} MB, {sizes[0] / sizes[1]:.1f}x smaller than "
        f"{source}); evaluate it with: torchbayes evaluate {out}"
    )
    if args.report is not None:
        _report_side_by_side(ckpt, quantized, data, args, console)
    if args.quiet:
        print(out)
    return EXIT_OK


def _report_side_by_side(
    ckpt: Checkpoint, quantized: nn.Module, data: DatasetSplits, args: argparse.Namespace, console: Console
) -> None:
    """Evaluate the float and the INT8 model on the same inputs and draws; one report for both."""
    from torchbayes.cli.evaluation import describe_data, evaluate_classifier
    from torchbayes.cli.report import comparison_table, write_report

    config = ckpt.config
    label = model_label(config)
    evaluations = [
        evaluate_classifier(
            model.to(args.device),
            data,
            name=f"{label} {kind}",
            num_samples=config.num_samples,
            device=args.device,
            seed=args.seed,
            show_progress=not args.quiet,
        )
        for model, kind in ((ckpt.model, "FP32"), (quantized, "INT8"))
    ]
    console(comparison_table(evaluations))
    settings = {"data": describe_data(data), "model": config.to_dict(), "num_samples": config.num_samples}
    report = write_report(
        args.report, evaluations, title=f"torchbayes: {label}, FP32 and INT8, on {data.name}", settings=settings
    )
    console(f"report: {report.html}")
