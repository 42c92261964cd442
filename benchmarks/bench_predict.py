"""32-sample Monte Carlo prediction: torchbayes.predict vs the reference's loop.

Compares, in one process with 2 threads, for an MLP 784-400-400-10 and LeNet-5 on
1x28x28 inputs, batch 1 and batch 256:

* ``torchbayes``: ``torchbayes.predict(model, x, 32)`` (samples, probabilities and the
  full uncertainty decomposition);
* ``ref reparam`` / ``ref flipout``: the reference README's loop over 32 forward passes
  (softmax, stack) of the same architecture converted by the reference's ``dnn_to_bnn``;
* ``32 x deterministic``: 32 forward passes of the deterministic network.

The variants run round-robin, so a load change on the machine hits all of them alike;
the table shows medians and the ratios the issue's targets are stated in.

Usage: ``python benchmarks/bench_predict.py [--repeats 15] [--chunk-size N]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import torchbayes
from torchbayes.nn import BayesConv2d, BayesLinear

NUM_SAMPLES = 32


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                         nn.Linear(400, 10))


def lenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84),
                         nn.ReLU(), nn.Linear(84, 10))


def bayesian_twin(model: nn.Module) -> nn.Module:
    """The model with every Linear / Conv2d replaced by its torchbayes twin (means = weights)."""
    twin = copy.deepcopy(model)
    for name, child in list(twin.named_children()):
        if isinstance(child, nn.Linear):
            setattr(twin, name, BayesLinear.from_torch(child))
        elif isinstance(child, nn.Conv2d):
            setattr(twin, name, BayesConv2d.from_torch(child))
    return twin


def reference_model(model: nn.Module, kind: str) -> nn.Module | None:
    try:
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn
    except ImportError:
        return None
    ref = copy.deepcopy(model)
    dnn_to_bnn(ref, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
                     "posterior_rho_init": -3.0, "type": kind, "moped_enable": False})
    return ref


def reference_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference README's Monte Carlo prediction loop."""
    model.eval()
    with torch.no_grad():
        output_mc = []
        for _ in range(NUM_SAMPLES):
            logits = model(x)
            output_mc.append(F.softmax(logits, dim=-1))
        return torch.stack(output_mc)


def deterministic_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(NUM_SAMPLES)])


def time_round_robin(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call, variants interleaved."""
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--chunk-size", type=int, default=None, help="predict's chunk_size (default: auto)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    for arch_name, build in (("MLP 784-400-400-10", mlp), ("LeNet-5", lenet)):
        det = build().eval()
        ours = bayesian_twin(det)
        refs = {kind: reference_model(det, kind) for kind in ("Reparameterization", "Flipout")}
        for batch in (1, 256):
            x = torch.rand(batch, 1, 28, 28)
            variants: dict[str, Callable[[], object]] = {
                "torchbayes": lambda: torchbayes.predict(ours, x, NUM_SAMPLES, chunk_size=args.chunk_size),
                "32 x deterministic": lambda: deterministic_loop(det, x),
            }
            for kind, ref in refs.items():
                if ref is not None:
                    variants[f"ref {kind.lower()[:7]}"] = lambda ref=ref: reference_loop(ref, x)
            rows.append((arch_name, batch, time_round_robin(variants, args.repeats)))

    print(f"32-sample prediction, median ms over {args.repeats} runs, torch {torch.__version__}, 2 threads\n")
    print("| model | batch | torchbayes | ref reparam. loop | ref flipout loop | 32 x deterministic "
          "| speed-up vs ref reparam. / flipout | vs deterministic |")
    print("|---|---|---|---|---|---|---|---|")
    for arch_name, batch, t in rows:
        ours_ms = t["torchbayes"]
        ref_r, ref_f = t.get("ref reparam", float("nan")), t.get("ref flipout", float("nan"))
        print(f"| {arch_name} | {batch} | {ours_ms:.2f} | {ref_r:.2f} | {ref_f:.2f} | {t['32 x deterministic']:.2f} "
              f"| {ref_r / ours_ms:.1f}x / {ref_f / ours_ms:.1f}x | {ours_ms / t['32 x deterministic']:.2f}x time |")


if __name__ == "__main__":
    main()
