"""AvUC speed: torchbayes' vectorized AvU loss and metrics vs the reference's loops.

Times, on 1,024 examples of 10 classes (CPU, 2 threads, one process), the forward +
backward of ``AvULoss`` and the evaluation of ``eval_avu`` and of the area under AvU
(the reference's ``AUAvULoss.auc_avu``, since its ``forward`` raises in 0.5.0), prints
the medians and the speed-up, and checks that both give the same numbers.

Run:  python benchmarks/bench_avuc.py [--n 1024] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from torchbayes import AUAvULoss, AvULoss, eval_avu
from torchbayes.avuc import avu_uncertainty


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bayesian_torch.utils import avuc_loss as ref

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.n, 10, generator=g) * 3
    labels = torch.randint(0, 10, (args.n,), generator=g)
    unc = avu_uncertainty(logits)
    threshold = float(unc.mean())
    pred, unc_np = logits.argmax(1), unc.numpy()
    quiet = io.StringIO()  # the reference prints in some of its functions

    def ours_loss() -> torch.Tensor:
        x = logits.clone().requires_grad_(True)
        loss = AvULoss(3.0)(x, labels, threshold)
        loss.backward()
        return loss

    def ref_loss() -> torch.Tensor:
        x = logits.clone().requires_grad_(True)
        with contextlib.redirect_stdout(quiet):
            loss = ref.AvULoss(3.0)(x, labels, threshold)
        loss.sum().backward()
        return loss

    ref_entropy = ref.AvULoss().entropy(F.softmax(logits, 1))
    cases = [
        ("AvULoss forward+backward", ours_loss, ref_loss),
        ("area under AvU (AUAvULoss)", lambda: AUAvULoss()(logits, labels)[1],
         lambda: ref.AUAvULoss().auc_avu(logits, labels, ref_entropy)),
        ("eval_avu (21 thresholds)", lambda: eval_avu(pred, labels, unc)[0],
         lambda: ref.eval_avu(pred.numpy(), labels.numpy(), unc_np)[0]),
    ]
    print(f"N = {args.n} examples, 10 classes, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'':<30}{'torchbayes':>14}{'reference':>14}{'speed-up':>10}   same value")
    for name, ours, theirs in cases:
        a, b = ours(), theirs()
        same = torch.allclose(torch.as_tensor(a, dtype=torch.float64).reshape(-1),
                              torch.as_tensor(b, dtype=torch.float64).reshape(-1), rtol=1e-5, atol=1e-7)
        t_ours = median_seconds(ours, args.repeats)
        t_ref = median_seconds(theirs, max(3, args.repeats // 2))
        print(f"{name:<30}{t_ours * 1e3:>11.3f} ms{t_ref * 1e3:>11.1f} ms{t_ref / t_ours:>9.0f}x   {same}")


if __name__ == "__main__":
    main()
