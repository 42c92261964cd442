"""Bayesian LSTM: torchbayes vs the reference's ``LSTMReparameterization``.

Batch 64, sequence 50, input 32, hidden 128, with a deterministic linear head on the
last hidden state. In one process with 2 threads, interleaved rounds, medians:

* **training step**: forward, ``loss = MSE(head(h_L), y) + KL / N``, backward, Adam step;
* **32-sample prediction**: for torchbayes ``torchbayes.predict(model, x, 32,
  task="regression")`` (samples plus the uncertainty decomposition); for the reference
  its README's loop of 32 forward passes under ``no_grad``.

Variants: ``torchbayes BayesLSTM`` with the reparameterization estimator (PyTorch's
fused recurrence on one weight draw) and with flipout (Python time loop), the
compatibility class ``torchbayes.layers.LSTMReparameterization`` (same calling
convention as the reference; Python time loop, as it returns every cell state), and the
reference. Ratios are reference time / torchbayes time (> 1: torchbayes is faster).

Usage: ``python benchmarks/bench_rnn.py [--rounds 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchbayes
from torchbayes.nn import BayesLSTM

from harness import markdown_table, time_interleaved

BATCH, SEQUENCE, INPUT, HIDDEN = 64, 50, 32, 128
NUM_DATA = 10_000  # training-set size that scales the KL term
NUM_SAMPLES = 32


class _Regressor(nn.Module):
    """A recurrent layer and a linear head on its last hidden state."""

    def __init__(self, recurrent: nn.Module) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: Tensor) -> Tensor:
        # Native layers return (output, state); the reference and compat ones add kl.
        return self.head(self.recurrent(x)[0][:, -1])


def _train_step(model: _Regressor, kl: Callable[[], Tensor], x: Tensor, y: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.mse_loss(model(x), y) + kl() / NUM_DATA
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _loop_prediction(model: _Regressor, x: Tensor) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            return torch.stack([model(x) for _ in range(NUM_SAMPLES)])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 for the reported numbers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, SEQUENCE, INPUT), torch.randn(BATCH, 1)

    models: dict[str, tuple[_Regressor, Callable[[], Tensor]]] = {}
    for estimator in ("reparameterization", "flipout"):
        model = _Regressor(BayesLSTM(INPUT, HIDDEN, batch_first=True, estimator=estimator))
        models[f"torchbayes BayesLSTM ({estimator})"] = (model, lambda m=model: torchbayes.kl_divergence(m))
    compat = _Regressor(torchbayes.layers.LSTMReparameterization(INPUT, HIDDEN))
    models["torchbayes.layers.LSTMReparameterization"] = (compat,
                                                          lambda m=compat: torchbayes.kl_divergence(m))
    try:
        from bayesian_torch.layers import LSTMReparameterization as ReferenceLSTM
        from bayesian_torch.models.dnn_to_bnn import get_kl_loss as reference_kl
        reference = _Regressor(ReferenceLSTM(INPUT, HIDDEN))
        models["reference LSTMReparameterization"] = (reference, lambda m=reference: reference_kl(m))
    except ImportError:
        print("bayesian-torch (the reference) is not installed: no ratios")

    train = time_interleaved({name: _train_step(m, kl, x, y) for name, (m, kl) in models.items()},
                             rounds=args.rounds, iters=1, warmup=1)
    predictors: dict[str, Callable[[], object]] = {}
    for name, (model, _) in models.items():
        model.eval()
        if name.startswith("torchbayes BayesLSTM"):
            predictors[name] = lambda m=model: torchbayes.predict(m, x, NUM_SAMPLES, task="regression")
        else:
            predictors[name] = _loop_prediction(model, x)
    predict = time_interleaved(predictors, rounds=args.rounds, iters=1, warmup=1)

    ref_name = "reference LSTMReparameterization"
    rows = []
    for name in models:
        row: list[object] = [name, train[name], predict[name]]
        if ref_name in models:
            row += [f"{train[ref_name] / train[name]:.1f}x", f"{predict[ref_name] / predict[name]:.1f}x"]
        rows.append(row)
    header = ["variant", "train step (ms)", f"{NUM_SAMPLES}-sample prediction (ms)"]
    if ref_name in models:
        header += ["train speed-up vs reference", "prediction speed-up vs reference"]
    print(f"LSTM, batch {BATCH}, sequence {SEQUENCE}, input {INPUT}, hidden {HIDDEN}, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
