"""``torchbayes train``: train a model of any method and save its checkpoint (and, with
``--report``, evaluate it)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from typing import Any

from torchbayes.cli.arguments import (
    BadInput,
    Console,
    add_common,
    add_data,
    check_apart,
    check_image_size,
    check_output_file,
    check_output_folder,
    finite_float,
    image_inputs,
    input_checks,
    load_data,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    sample_count,
)
from torchbayes.cli.commands.evaluate import evaluate_and_report
from torchbayes.cli.errors import EXIT_OK
from torchbayes.cli.tabular import TABLE_DEFAULTS, add_table_arguments, resolve
from torchbayes.cli.training import (
    METHODS,
    TrainConfig,
    batch_bounds,
    build_classifier,
    check_table_network,
    load_checkpoint,
    model_label,
    save_checkpoint,
    train_model,
    training_warnings,
)
from torchbayes.nn import ESTIMATORS

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand and its options to ``commands``."""
    parser = commands.add_parser(
        "train",
        help="train a deterministic or Bayesian classifier and save it",
        description="Train a classifier and save a checkpoint; --report also evaluates it and writes the report.",
    )
    add_data(parser, required_default=None)
    parser.add_argument(
        "--model", default="mlp", help="mlp, lenet, or a torchvision classification model name (resnet18, ...)"
    )
    d = TrainConfig  # every default below is TrainConfig's: the recipe of docs/quality.md
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--method",
        choices=METHODS,
        default=d.method,
        help=f"bayesian: dnn_to_bnn after deterministic pre-training, trained on the ELBO; "
        f"deterministic: plain training; dropout: MC dropout; ensemble: a deep ensemble; "
        f"ivon: the plain network trained by the variational optimizer IVON, saved as Bayesian layers "
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
    parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=d.estimator,
        help=f"Monte Carlo estimator of the Bayesian layers (default {d.estimator})",
    )
    parser.add_argument(
        "--prior-mu", type=finite_float, default=d.prior_mu, help=f"prior mean (default {d.prior_mu:g})"
    )
    parser.add_argument(
        "--prior-sigma", type=positive_float, default=d.prior_sigma, help=f"prior std (default {d.prior_sigma:g})"
    )
    parser.add_argument(
        "--posterior-rho-init",
        type=finite_float,
        default=d.posterior_rho_init,
        help=f"initial rho without MOPED, sigma = softplus(rho) (default {d.posterior_rho_init:g})",
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=non_negative_int,
        default=None,
        help=f"Bayesian: deterministic epochs first, then MOPED from them (default "
        f"{d.pretrain_epochs}, tables {TABLE_DEFAULTS['pretrain_epochs']}; 0: from scratch)",
    )
    parser.add_argument(
        "--pretrain-lr",
        type=positive_float,
        default=None,
        help=f"learning rate of the pre-training (default {d.pretrain_lr:g}, tables {TABLE_DEFAULTS['pretrain_lr']:g})",
    )
    parser.add_argument(
        "--moped",
        metavar="CHECKPOINT",
        default=None,
        help="initialise the posterior from this deterministic checkpoint (MOPED) instead of pre-training",
    )
    parser.add_argument(
        "--moped-delta",
        type=positive_float,
        default=d.moped_delta,
        help=f"MOPED: posterior sigma = delta * |w| (default {d.moped_delta:g})",
    )
    parser.add_argument(
        "--bayesian-layers",
        type=non_negative_int,
        default=d.bayesian_layers,
        help=f"how many of the last weight layers are Bayesian (default {d.bayesian_layers}; 0: all)",
    )
    parser.add_argument(
        "--kl-weight",
        type=non_negative_float,
        default=d.kl_weight,
        help=f"weight of the KL term of the ELBO (default {d.kl_weight:g})",
    )
    parser.add_argument(
        "--dropout",
        type=probability,
        default=None,
        help=f"--method dropout: dropout probability (default {d.dropout:g}, tables {TABLE_DEFAULTS['dropout']:g})",
    )
    parser.add_argument(
        "--members",
        type=positive_int,
        default=d.num_members,
        help=f"--method ensemble: number of members (default {d.num_members})",
    )
    parser.add_argument(
        "--ivon-lr",
        type=positive_float,
        default=d.ivon_lr,
        help=f"--method ivon: IVON's learning rate (default {d.ivon_lr:g})",
    )
    parser.add_argument(
        "--ivon-epochs",
        type=positive_int,
        default=d.ivon_epochs,
        help=f"--method ivon: training epochs (default {d.ivon_epochs})",
    )
    parser.add_argument(
        "--hess-init",
        type=positive_float,
        default=d.hess_init,
        help=f"--method ivon: initial Hessian, sets the initial posterior std (default {d.hess_init:g})",
    )
    parser.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=d.weight_decay,
        help=f"--method ivon: weight decay = prior precision per example (default {d.weight_decay:g})",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"training epochs (Bayesian: after pre-training; default {d.epochs}, tables {TABLE_DEFAULTS['epochs']})",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"default {d.batch_size}, tables {TABLE_DEFAULTS['batch_size']}",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"Adam learning rate (default {d.lr:g}, tables {TABLE_DEFAULTS['lr']:g})",
    )
    parser.add_argument(
        "--num-samples",
        type=sample_count,
        default=None,
        help=f"Monte Carlo samples when evaluating (default {d.num_samples}, tables {TABLE_DEFAULTS['num_samples']})",
    )
    parser.add_argument("--avuc", action="store_true", help="add the AvUC calibration loss (Bayesian only)")
    parser.add_argument("--avuc-beta", type=positive_float, default=3.0, help="weight of AvUC (default 3)")
    parser.add_argument("--out", default=None, help="checkpoint file (default ./torchbayes-<model>.pt)")
    parser.add_argument("--report", default=None, metavar="DIR", help="also evaluate and write a report here")
    parser.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="--data regression with --report: leave out the baselines (plain network with learned noise, "
        "MC dropout, deep ensemble) trained beside the model for the report",
    )
    add_table_arguments(parser, training=True)
    add_common(parser)


def _settings(args: argparse.Namespace, table: bool) -> dict[str, Any]:
    """The flags whose defaults differ for tables, resolved."""
    keys = ("epochs", "pretrain_epochs", "batch_size", "lr", "pretrain_lr", "dropout", "num_samples")
    return {key: resolve(getattr(args, key), key, table) for key in keys}


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``torchbayes train`` with parsed ``args``; returns the exit code."""
    if args.data is not None:
        return _run_table(args, console)
    args.dataset = args.dataset or "digits"
    for key, value in _settings(args, table=False).items():
        setattr(args, key, value)
    table_only = [
        flag
        for flag, given in (
            ("--target", args.target is not None),
            ("--noise", args.noise is not None),
            ("--hidden", args.hidden is not None),
            ("--objective", args.objective != "mc"),
            ("--ignore", bool(args.ignore)),
        )
        if given
    ]
    if table_only:
        raise BadInput(f"{table_only[0]} applies to a table (--data FILE); --dataset {args.dataset!r} holds images")
    moped_source = None
    # A MOPED checkpoint replaces the pre-training; without either, the posterior starts from scratch.
    pretrain_epochs = 0 if args.moped is not None or args.method == "ivon" else args.pretrain_epochs
    with input_checks():
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
            ivon_lr=args.ivon_lr,
            ivon_epochs=args.ivon_epochs,
            hess_init=args.hess_init,
            weight_decay=args.weight_decay,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            num_samples=args.num_samples,
            avuc=args.avuc,
            avuc_beta=args.avuc_beta,
            seed=args.seed,
        )
    if args.moped is not None and config.method != "bayesian":
        raise BadInput(f"--moped initialises a Bayesian model; it cannot be combined with --method {config.method}")
    out = check_output_file(args.out or f"torchbayes-{config.model}.pt", "--out")
    check_apart({"--out": out, "--report": args.report}, {"--moped": args.moped, **image_inputs(args)})
    check_image_size(args)
    if args.report is not None:
        check_output_folder(args.report, "--report")
    data = load_data(config.dataset, config.data_root, config.image_size, config.ood_classes, config.seed)
    if args.moped is not None:
        with input_checks("--moped"):
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
    with input_checks("--model"):  # an unknown or unsuitable architecture fails here, before training
        probe = build_classifier(replace(config, moped=False), data.input_shape, data.num_classes)
    with input_checks("--batch-size"):  # BatchNorm cannot train on batches of one
        batch_bounds(len(data.train_x), config.batch_size, probe)
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
        evaluate_and_report(
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


def _run_table(args: argparse.Namespace, console: Console) -> int:
    """``train --data FILE``: a regressor or classifier on a table (the MLP of every method)."""
    from torchbayes.cli.regression import DEFAULT_HIDDEN, DEFAULT_NOISE, epoch_line, train_regressor
    from torchbayes.cli.tabular import classification_splits, load_table_splits, report_table_model

    images = [
        flag
        for flag, given in (
            ("--dataset", args.dataset is not None),
            ("--data-root", args.data_root is not None),
            ("--image-size", args.image_size is not None),
            ("--ood-classes", args.ood_classes is not None),
            ("--moped", args.moped is not None),
            ("--avuc", args.avuc),
            ("--model", args.model != "mlp"),
        )
        if given
    ]
    if images:
        raise BadInput(f"{images[0]} applies to images; --data {args.data!r} is a table (an MLP is trained on it)")
    if args.method == "ivon":
        raise BadInput("--method ivon trains image classifiers; on a table (--data) use bayesian, dropout or ensemble")
    if args.target is None:
        raise BadInput("--data needs --target COLUMN: the column to predict (its name, or its index from 0)")
    if args.method == "ivon" and args.task == "regression":
        raise BadInput(
            "--method ivon trains classifiers; a regressor on a table: bayesian, deterministic, dropout or ensemble"
        )
    if args.noise is not None and args.task == "classification":
        raise BadInput("--noise chooses the Gaussian head of a regressor; --task is classification")
    if args.objective != "mc" and (args.task != "regression" or args.method != "bayesian"):
        raise BadInput("--objective chooses how a Bayesian regressor's ELBO is computed (--method bayesian)")
    settings = _settings(args, table=True)
    with input_checks():
        config = TrainConfig(
            dataset=args.data,
            model="mlp",
            method=args.method,
            estimator=args.estimator,
            prior_mu=args.prior_mu,
            prior_sigma=args.prior_sigma,
            posterior_rho_init=args.posterior_rho_init,
            moped=settings["pretrain_epochs"] > 0,
            moped_delta=args.moped_delta,
            bayesian_layers=args.bayesian_layers,
            kl_weight=args.kl_weight,
            num_members=args.members,
            seed=args.seed,
            task=args.task,
            noise=args.noise or DEFAULT_NOISE.get(args.method, "heteroscedastic"),
            objective=args.objective,
            hidden=args.hidden or DEFAULT_HIDDEN,
            test_fraction=args.test_fraction,
            val_fraction=args.val_fraction,
            **settings,
        )
    out = check_output_file(args.out or f"torchbayes-{config.model}.pt", "--out")
    if args.report is not None:
        check_output_folder(args.report, "--report")
    check_apart({"--out": out, "--report": args.report}, {"--data": args.data})
    data = load_table_splits(
        args.data,
        target=args.target,
        task=config.task,
        ignore=args.ignore,
        seed=config.seed,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
    )
    with input_checks("--hidden"):
        check_table_network(config, data.input_shape[0], max(2, data.num_classes))
    epochs = config.epochs + (config.pretrain_epochs if config.bayesian else 0)
    kind = f"{data.num_classes} classes" if config.task == "classification" else config.noise + " Gaussian noise"
    console(
        f"training a {model_label(config)} ({config.task}, {kind}) on {data.name}: {len(data.train_x)} training, "
        f"{len(data.val_x)} validation, {len(data.test_x)} test rows of {data.input_shape[0]} inputs, target "
        f"{data.table.target_name!r}; {epochs} epochs"
    )
    if config.task == "regression":
        model, history = train_regressor(
            config,
            data,
            device=args.device,
            show_progress=not args.quiet,
            on_epoch=lambda s: console(epoch_line(s, epochs)),
        )
    else:
        images_like = classification_splits(data)
        model, summaries = train_model(
            config,
            images_like,
            device=args.device,
            show_progress=not args.quiet,
            on_epoch=lambda s: console(s.line(epochs)),
        )
        for line in training_warnings(summaries, images_like, config):
            print(f"torchbayes train: warning: {line}", file=sys.stderr, flush=True)
        history = [asdict(h) for h in summaries]
    save_checkpoint(out, model.cpu(), config, data.input_shape, data.num_classes, history, table=data.schema)
    console(f"checkpoint: {out}")
    if args.report is not None:
        report_table_model(
            model.to(args.device),
            config,
            data.schema,
            data,
            data.table,
            history=history,
            out_dir=args.report,
            num_samples=config.num_samples,
            batch_size=1024,
            baselines=args.baselines,
            args=args,
            console=console,
        )
    elif args.quiet:
        print(out)
    return EXIT_OK
