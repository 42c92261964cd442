"""One training step (forward, cross-entropy + KL/N, backward, Adam step), batch 128.

Deterministic PyTorch, bayesian-torch 0.5.0 (via its ``dnn_to_bnn``) and torchbayes (via
its ``dnn_to_bnn``), on the MLP 784-400-400-10 and LeNet-5, 1x28x28 inputs, 2 threads,
all in one process. Prints medians (ms) and the ratios torchbayes / reference and
torchbayes / deterministic.

    python benchmarks/bench_train.py [--adam default|foreach|fused]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness import lenet, markdown_table, mlp, reference_bnn, time_interleaved, torchbayes_bnn

import torchbayes

NUM_DATA = 60_000  # KL is divided by the training-set size (ELBO per example)


# Adam implementations: torch's default on CPU (a loop over the parameter tensors), the
# multi-tensor ("foreach") one and the fused one; the same is used for every variant.
ADAM_OPTIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adam", choices=sorted(ADAM_OPTIONS), default="default",
                        help="the Adam implementation, used for every variant")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    rows = []
    for arch_name, build in (("MLP", mlp), ("LeNet-5", lenet)):
        steps = {"deterministic": make_step(build(), None, args.adam, x, y)}
        for est in ("reparameterization", "flipout"):
            ref = reference_bnn(build, est)
            if ref is not None:
                from bayesian_torch.models.dnn_to_bnn import get_kl_loss
                steps[f"reference {est}"] = make_step(ref, get_kl_loss, args.adam, x, y)
        for est in ("reparameterization", "flipout", "local"):
            steps[f"torchbayes {est}"] = make_step(torchbayes_bnn(build, est), torchbayes.kl_divergence,
                                                   args.adam, x, y)
        times = time_interleaved(steps, rounds=args.rounds)
        det = times["deterministic"]
        for name, ms in times.items():
            ref_ms = times.get("reference " + name.split(" ", 1)[-1]) if name.startswith("torchbayes") else None
            rows.append([arch_name, name, ms, ms / det, "" if ref_ms is None else f"{ms / ref_ms:.2f}"])
    print(f"Training step, batch 128, 2 threads, Adam ({args.adam}); "
          f"torch {torch.__version__}")
    print(markdown_table(["model", "variant", "median ms", "x deterministic", "x reference"], rows))


if __name__ == "__main__":
    main()
