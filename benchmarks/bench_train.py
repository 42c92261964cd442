"""One training step (forward, cross-entropy + KL/N, backward, Adam step).

Deterministic PyTorch, bayesian-torch 0.5.0 (via its ``dnn_to_bnn``) and torchbayes (via
its ``dnn_to_bnn``), all in one process with 2 threads:

* the MLP 784-400-400-10 and LeNet-5 on 1x28x28 inputs, batch 128;
* torchvision's ResNet-18 (10 classes) on 3x32x32 inputs, batch 64, fully Bayesian and
  last-layer Bayesian (``include=["fc"]``; the reference converts only ``fc`` too).

Prints medians (ms) and the ratios torchbayes / reference and any variant / deterministic.
The same Adam implementation is used for every variant of a run.

``--optimizers`` measures instead the variational optimizers on the plain network (issue
20): one step of ``torchbayes.optim.IVON`` (sample, forward, backward, update) against a
plain ``torch.optim.Adam`` step (default settings: not fused, not foreach) and against
``ivon-opt`` 0.1.3's IVON with the same hyperparameters, for ResNet-18 and LeNet-5 at
batch 64; ``--profile`` splits the IVON step into its parts.

    python benchmarks/bench_train.py [--models mlp lenet resnet18] [--adam default|foreach|fused]
    python benchmarks/bench_train.py --optimizers [--models lenet resnet18] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import lenet, markdown_table, mlp, reference_bnn, resnet18, time_interleaved, torchbayes_bnn
from torch import nn

import torchbayes

NUM_DATA = 60_000  # KL is divided by the training-set size (ELBO per example)

# Adam implementations: torch's default on CPU (a loop over the parameter tensors), the
# multi-tensor ("foreach") one and the fused one; the same is used for every variant.
ADAM_OPTIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}

#: name -> (builder, input shape, batch size, rounds x iterations per round)
MODELS = {
    "mlp": ("MLP", mlp, (1, 28, 28), 128, 15),
    "lenet": ("LeNet-5", lenet, (1, 28, 28), 128, 15),
    "resnet18": ("ResNet-18", resnet18, (3, 32, 32), 64, 3),
}


def make_step(model: nn.Module, kl: Callable[[nn.Module], torch.Tensor] | None, adam: str,
              x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **ADAM_OPTIONS[adam])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if kl is not None:
            loss = loss + kl(model) / NUM_DATA
        loss.backward()
        opt.step()

    return step


def reference_last_layer(build: Callable[[], nn.Module], estimator: str) -> nn.Module | None:
    """``build()`` with only its ``fc`` converted by the reference's ``dnn_to_bnn``."""
    model = build()
    holder = nn.Module()
    holder.fc = model.fc
    converted = reference_bnn(lambda: holder, estimator)
    if converted is None:
        return None
    model.fc = converted.fc
    return model


def torchbayes_last_layer(build: Callable[[], nn.Module], estimator: str) -> nn.Module:
    return torchbayes.dnn_to_bnn(build(), estimator=estimator, prior_mu=0.0, prior_sigma=1.0,
                                 posterior_mu_init=0.0, posterior_rho_init=-3.0, include=["fc"])


def variants(key: str) -> list[tuple[str, Callable[[Callable[[], nn.Module], str], nn.Module | None], str]]:
    """``(label, converter, estimator)`` of every Bayesian variant measured for model ``key``."""
    full = [("reparameterization", torchbayes_bnn, "reparameterization"), ("flipout", torchbayes_bnn, "flipout")]
    if key == "resnet18":
        return [*full, ("last-layer reparameterization", torchbayes_last_layer, "reparameterization")]
    return [*full, ("local", torchbayes_bnn, "local")]


def reference_for(label: str) -> Callable[[Callable[[], nn.Module], str], nn.Module | None]:
    return reference_last_layer if label.startswith("last-layer") else reference_bnn


def ivon_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor) -> Callable[[], None]:
    """One IVON step: the loss of one weight sample, backward, update (both IVONs share the loop)."""
    sampled = optimizer.sampled_params  # type: ignore[attr-defined]

    def step() -> None:
        with sampled(train=True):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def optimizer_steps(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The plain Adam step, torchbayes' IVON step and (if installed) ivon-opt's, on one architecture."""
    from torchbayes.optim import IVON

    hyper = {"lr": 0.1, "ess": NUM_DATA, "hess_init": 0.5, "weight_decay": 1e-4}
    steps = {"Adam (default)": make_step(build(), None, "default", x, y)}
    model = build()
    steps["torchbayes IVON"] = ivon_step(model, IVON(model.parameters(), **hyper), x, y)
    try:
        import ivon
    except ImportError:
        return steps
    model = build()
    steps["ivon-opt IVON"] = ivon_step(model, ivon.IVON(model.parameters(), **hyper), x, y)
    return steps


def profile_ivon(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int) -> list[list[object]]:
    """Median ms of the parts of torchbayes' IVON step (draw, forward + backward, restore, update)."""
    from torchbayes.optim import IVON

    model = build()
    opt = IVON(model.parameters(), lr=0.1, ess=NUM_DATA, hess_init=0.5, weight_decay=1e-4)
    parts: dict[str, list[float]] = {"draw and perturb": [], "forward + backward": [], "restore and collect": [],
                                     "update (step)": []}
    for i in range(rounds * 5 + 3):
        t0 = time.perf_counter()
        draws = opt._draw()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        t2 = time.perf_counter()
        opt._restore(draws)
        opt._collect(draws)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if i >= 3:
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[key].append(1e3 * dt)
    return [[key, statistics.median(ts)] for key, ts in parts.items()]


def main_optimizers(args: argparse.Namespace) -> None:
    rows, profile_rows = [], []
    for key in args.models:
        arch_name, build, shape, _, iters = MODELS[key]
        torch.manual_seed(0)
        x, y = torch.randn(64, *shape), torch.randint(0, 10, (64,))
        times = time_interleaved(optimizer_steps(build, x, y), rounds=args.rounds, iters=iters, warmup=3)
        adam, peer = times["Adam (default)"], times.get("ivon-opt IVON")
        for name, ms in times.items():
            rows.append([arch_name, "64", name, ms, ms / adam, "" if peer is None else f"{ms / peer:.2f}"])
        if args.profile:
            profile_rows += [[arch_name, *row] for row in profile_ivon(build, x, y, args.rounds)]
    print(f"Training step, 2 threads, batch 64, rounds {args.rounds}; torch {torch.__version__}")
    print(markdown_table(["model", "batch", "optimizer", "median ms", "x Adam", "x ivon-opt"], rows))
    if profile_rows:
        print("\nWhere torchbayes' IVON step goes (median ms per part)")
        print(markdown_table(["model", "part", "median ms"], profile_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                        help="the architectures to measure (default: all)")
    parser.add_argument("--adam", choices=sorted(ADAM_OPTIONS), default="fused",
                        help="the Adam implementation, used for every variant (default: fused)")
    parser.add_argument("--no-reference", action="store_true", help="skip bayesian-torch's variants")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--optimizers", action="store_true",
                        help="time IVON (torchbayes, ivon-opt) against a plain Adam step instead (batch 64)")
    parser.add_argument("--profile", action="store_true", help="with --optimizers: split the IVON step into parts")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.optimizers:
        main_optimizers(args)
        return
    rows = []
    for key in args.models:
        arch_name, build, shape, batch, iters = MODELS[key]
        torch.manual_seed(0)
        x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        steps = {"deterministic": make_step(build(), None, args.adam, x, y)}
        for label, convert, est in variants(key):
            ref = None if args.no_reference or label == "local" else reference_for(label)(build, est)
            if ref is not None:  # the reference is installed
                from bayesian_torch.models.dnn_to_bnn import get_kl_loss
                steps[f"reference {label}"] = make_step(ref, get_kl_loss, args.adam, x, y)
            steps[f"torchbayes {label}"] = make_step(convert(build, est), torchbayes.kl_divergence, args.adam, x, y)
        times = time_interleaved(steps, rounds=args.rounds, iters=iters, warmup=3)
        det = times["deterministic"]
        for name, ms in times.items():
            ref_ms = times.get("reference " + name.split(" ", 1)[-1]) if name.startswith("torchbayes") else None
            rows.append([arch_name, f"{batch}", name, ms, ms / det, "" if ref_ms is None else f"{ms / ref_ms:.2f}"])
    print(f"Training step, 2 threads, Adam ({args.adam}), rounds {args.rounds}; torch {torch.__version__}")
    print(markdown_table(["model", "batch", "variant", "median ms", "x deterministic", "x reference"], rows))


if __name__ == "__main__":
    main()
