"""torch.compile vs eager for Bayesian models: training-step and prediction times (CPU).

Runs everything in one process with 2 intra-op threads and prints, per model and
estimator, the one-off compile time and the median time of a training step (forward,
ELBO, backward, Adam step) and of a sampling prediction (one Monte Carlo forward, no
autograd), eager and compiled, with the eager/compiled ratio (> 1: compiled is faster).

Usage:
    python benchmarks/bench_compile.py                 # MLP and LeNet, reparameterization
    python benchmarks/bench_compile.py --estimators reparameterization flipout local --resnet
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.conversion import REFERENCE_PRIOR_PARAMETERS, dnn_to_bnn


def mlp() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                         nn.Linear(400, 10)), (1, 28, 28)


def lenet() -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)), (1, 28, 28)


def resnet18() -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision

    return torchvision.models.resnet18(num_classes=10), (3, 32, 32)


def paired_medians(eager: Callable[[], object], compiled: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of each, timed alternately so that load changes hit both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, sink in ((eager, times[0]), (compiled, times[1])):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def bench(name: str, factory: Callable[[], tuple[nn.Module, tuple[int, ...]]], estimator: str,
          batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    base, shape = factory()
    eager = dnn_to_bnn(base, {**REFERENCE_PRIOR_PARAMETERS, "type": estimator})
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

    def train_step(forward: nn.Module, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = torchbayes.elbo_loss(F.cross_entropy(forward(x), y), model, num_data=60_000)
        opt.zero_grad()
        loss.backward()
        opt.step()

    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.Adam(compiled_model.parameters(), lr=1e-3)
    start = time.perf_counter()
    train_step(compiled, compiled_model, opt_c)  # first call compiles forward + backward
    compile_train = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        compiled(x)  # no-grad forward: a second graph
        compile_predict = time.perf_counter() - start
    train_step(eager, eager, opt_e)  # warm-up
    t_train_e, t_train_c = paired_medians(lambda: train_step(eager, eager, opt_e),
                                          lambda: train_step(compiled, compiled_model, opt_c), repeats)
    with torch.no_grad():
        t_pred_e, t_pred_c = paired_medians(lambda: eager(x), lambda: compiled(x), repeats)
    print(f"{name:<9} {estimator:<18} compile {compile_train:6.1f}s + {compile_predict:5.1f}s | "
          f"train step eager {1e3 * t_train_e:8.2f} ms compiled {1e3 * t_train_c:8.2f} ms "
          f"ratio {t_train_e / t_train_c:5.2f} | predict eager {1e3 * t_pred_e:7.2f} ms compiled "
          f"{1e3 * t_pred_c:7.2f} ms ratio {t_pred_e / t_pred_c:5.2f}", flush=True)
    dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimators", nargs="+", default=["reparameterization"],
                        choices=list(torchbayes.nn.ESTIMATORS))
    parser.add_argument("--resnet", action="store_true", help="also ResNet-18 (compiling takes minutes)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = [("MLP", mlp), ("LeNet", lenet)] + ([("ResNet-18", resnet18)] if args.resnet else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"medians of {args.repeats}", flush=True)
    for name, factory in models:
        for estimator in args.estimators:
            batch = min(args.batch, 32) if name == "ResNet-18" else args.batch
            bench(name, factory, estimator, batch, args.repeats if name != "ResNet-18" else 5)


if __name__ == "__main__":
    main()
