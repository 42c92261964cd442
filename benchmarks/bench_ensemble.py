"""Deep-ensemble prediction: ``predict(Ensemble)`` vs a Python loop over the members.

The bar of issue 22: ``predict(ensemble, x)`` of a 5-member ensemble costs at most the
plain loop (each member's forward, then the same summary) at batch 1, 64 and 1000, for
the CLI's LeNet and the MLP 784-400-400-10: ratio ``predict / loop <= 1.0x``. Also
reported: the same vmapped pass (``torch.vmap`` over the stacked parameters, the former
default), and one member's forward (the physical floor is 5 of those unless work is
shared). Every timed path is first checked equal to the loop.

Run alone on the machine (one process, 2 threads, interleaved medians)::

    cpujob --exclusive python benchmarks/bench_ensemble.py
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
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 64, 1000])
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
            assert ensemble.loop_reason() is None, ensemble.loop_reason()
            with torch.no_grad():
                reference = ensemble.loop_forward(x)
                torch.testing.assert_close(ensemble(x), reference, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(_vmapped(ensemble, x), reference, rtol=1e-4, atol=1e-5)
            times = time_interleaved({
                "predict": lambda e=ensemble, x=x: predict(e, x),
                "loop": lambda e=ensemble, x=x: _loop_predict(e, x),
                "vmap": lambda e=ensemble, x=x: _vmap_predict(e, x),
                "one member": lambda e=ensemble, x=x: _one(e, x),
            }, rounds=args.rounds, iters=20 if batch <= 64 else 3)
            rows.append([name, batch, times["predict"], times["loop"], times["vmap"], times["one member"],
                         f"{times['predict'] / times['loop']:.2f}x",
                         f"{times['vmap'] / times['loop']:.2f}x",
                         f"{times['predict'] / times['one member']:.2f}x"])
    print(markdown_table(["model", "batch", "predict ms", "loop ms", "vmap ms", "1 member ms",
                          "predict / loop", "vmap / loop", "predict / 1 member"], rows))


def _vmapped(ensemble: Ensemble, x: torch.Tensor) -> torch.Tensor:
    params, buffers = ensemble._stacked_state()
    return ensemble._vmapped()(params, buffers, x)


def _vmap_predict(ensemble: Ensemble, x: torch.Tensor) -> object:
    from torchbayes.prediction import summarize

    with torch.no_grad():
        return summarize(_vmapped(ensemble, x), task="classification")


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
