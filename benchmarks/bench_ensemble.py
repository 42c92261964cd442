"""Deep-ensemble prediction: one vectorized pass over the members vs a loop over them.

The bar of issue 13: a 5-member ensemble of the CLI's LeNet predicts a batch of 1 at
least 3x faster vectorized (:class:`torchbayes.Ensemble`: stacked parameters,
``functional_call`` under ``vmap``) than by looping over the members. Also reported:
larger batches, an MLP, and the physical floor of one deterministic LeNet forward.

Run under the shared lock (one process, 2 threads, interleaved medians)::

    flock /tmp/cpu.lock python benchmarks/bench_ensemble.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import markdown_table, time_interleaved

from torchbayes import Ensemble, predict
from torchbayes.cli.models import LeNet5, build_model

MEMBERS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32, 256])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    for name, make, shape in (("LeNet", lambda: LeNet5((1, 28, 28), 10), (1, 28, 28)),
                              ("MLP 784-400-400-10", lambda: build_model("mlp", (1, 28, 28), 10), (1, 28, 28))):
        ensemble = Ensemble([make() for _ in range(MEMBERS)]).eval()
        for batch in args.batches:
            x = torch.rand(batch, *shape)
            with torch.no_grad():
                torch.testing.assert_close(ensemble(x), ensemble.loop_forward(x), rtol=1e-4, atol=1e-5)
            times = time_interleaved({
                "vectorized": lambda e=ensemble, x=x: predict(e, x),
                "loop": lambda e=ensemble, x=x: _loop_predict(e, x),
                "one member": lambda e=ensemble, x=x: _one(e, x),
            }, rounds=args.rounds, iters=20 if batch <= 32 else 5)
            rows.append([name, batch, times["vectorized"], times["loop"], times["one member"],
                         f"{times['loop'] / times['vectorized']:.2f}x",
                         f"{times['vectorized'] / times['one member']:.2f}x"])
    print(markdown_table(["model", "batch", "vectorized ms", "loop ms", "1 member ms", "loop / vectorized",
                          "vectorized / 1 member"], rows))


def _loop_predict(ensemble: Ensemble, x: torch.Tensor) -> object:
    # The plain way: each member's forward, then the same summary predict computes.
    from torchbayes.prediction import summarize

    with torch.no_grad():
        return summarize(torch.stack([m(x) for m in ensemble.members]), task="classification")


def _one(ensemble: Ensemble, x: torch.Tensor) -> object:
    with torch.no_grad():
        return ensemble.members[0](x)


if __name__ == "__main__":
    main()
