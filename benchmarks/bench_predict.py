"""32-sample Monte Carlo prediction: torchbayes.predict vs the reference's loop and plain forwards.

Cases (select with ``--cases``; all by default):

* ``mlp``, ``lenet``: MLP 784-400-400-10 and LeNet-5 on 1x28x28 inputs, every layer
  Bayesian, batch 1 and 256;
* ``lenet1000``: LeNet-5 at batch 1,000;
* ``resnet-fc``, ``resnet-layer4``, ``resnet-full``: torchvision ``resnet18(num_classes=10)``
  on 3x32x32 inputs, converted with ``include=["fc"]`` (last-layer Bayesian, batch 16
  and 64), ``include=["layer4", "fc"]`` (batch 16 and 64), or entirely (batch 64);
* ``vit-head``, ``vit-block``: torchvision ``VisionTransformer(image_size=32, patch_size=4,
  num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256, num_classes=10)`` on 3x32x32,
  batch 16 and 64, with ``include=["heads"]`` or the last encoder block and the head
  Bayesian (its attention's ``out_proj``, read as a raw weight by
  ``nn.MultiheadAttention``, stays deterministic);
* ``bert-head``: a BERT-like text classifier (token embedding over 1,000 words, a CLS token
  through ``expand(batch_size, ...)``, learned positions, ``nn.TransformerEncoder`` with
  4 layers, width 128, 4 heads, feed-forward 256, sequences of 64 tokens) with a Bayesian
  head, batch 16 and 64.

Variants, in ONE process with 2 threads, interleaved in rounds so that a load change on
the machine hits all of them alike:

* ``torchbayes``: ``torchbayes.predict(model, x, 32)`` (samples, probabilities and the
  full uncertainty decomposition);
* ``ref loop``: the reference README's loop over 32 forward passes (softmax, stack) of
  the same architecture with the same layers converted by bayesian-torch 0.5.0's
  ``dnn_to_bnn`` (reparameterization; ``ref flipout`` too for the MLP and LeNet);
* ``1 x det`` / ``32 x det``: one / 32 forward passes of the deterministic network.

The table shows medians (ms) and the ratios the bars of issues 14 and 24 are stated in.

Usage: ``python benchmarks/bench_predict.py [--repeats 7] [--cases resnet-fc,lenet1000] [--chunk-size N]``
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from harness import lenet, markdown_table, mlp, time_interleaved
from torch import nn

import torchbayes
from torchbayes.prediction import whole_model_reason

NUM_SAMPLES = 32
REFERENCE_PRIOR = {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
                   "moped_enable": False, "moped_delta": 0.5}


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                hidden_dim=128, mlp_dim=256, num_classes=10)


class BertLike(nn.Module):
    """A BERT-style sequence classifier written as such models usually are: the batch size
    read from the input, a CLS token expanded to it, the classification from the CLS output."""

    def __init__(self, vocab: int = 1000, dim: int = 128, layers: int = 4, heads: int = 4, max_len: int = 64,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, max_len + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len = ids.shape
        tokens = torch.cat([self.cls.expand(batch_size, -1, -1), self.embed(ids)], dim=1)
        h = self.encoder(tokens + self.pos[:, : seq_len + 1])
        return self.head(self.norm(h[:, 0]))


def images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32)


def digits(batch: int) -> torch.Tensor:
    return torch.rand(batch, 1, 28, 28)


def token_ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, 64))


@dataclass
class Case:
    build: Callable[[], nn.Module]
    make_input: Callable[[int], torch.Tensor]
    batches: tuple[int, ...]
    include: list[str] | None  # what torchbayes.dnn_to_bnn converts (None: everything)
    exclude: list[str] | None = None
    reference_include: list[str] | None = None  # what the reference converts, if not `include`


VIT_BLOCK = "encoder.layers.encoder_layer_3"
CASES: dict[str, Case] = {
    "mlp": Case(mlp, digits, (1, 256), None),
    "lenet": Case(lenet, digits, (1, 256), None),
    "lenet1000": Case(lenet, digits, (1000,), None),
    "resnet-fc": Case(resnet18, images, (16, 64), ["fc"]),
    "resnet-layer4": Case(resnet18, images, (16, 64), ["layer4", "fc"]),
    "resnet-full": Case(resnet18, images, (64,), None),
    "vit-head": Case(vit, images, (16, 64), ["heads"]),
    # The reference's conversion would replace out_proj, which MultiheadAttention reads as a raw weight.
    "vit-block": Case(vit, images, (16, 64), [VIT_BLOCK, "heads"], [f"{VIT_BLOCK}.self_attention"],
                      [f"{VIT_BLOCK}.mlp", "heads"]),
    "bert-head": Case(BertLike, token_ids, (16, 64), ["head"]),
}


def reference_model(det: nn.Module, include: list[str] | None, kind: str) -> nn.Module | None:
    """``det`` with the ``include``d submodules (all if None) converted by the reference."""
    try:
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn
    except ImportError:
        return None
    ref = copy.deepcopy(det)
    params = {**REFERENCE_PRIOR, "type": kind}
    for name in include or [""]:
        # The reference converts the children of the module it is given: hand it a holder.
        holder = nn.Module()
        parent, _, leaf = name.rpartition(".")
        owner = ref.get_submodule(parent)
        if name:
            holder.add_module("m", owner.get_submodule(leaf))
            dnn_to_bnn(holder, params)
            setattr(owner, leaf, holder.m)
        else:
            dnn_to_bnn(ref, params)
    return ref.eval()


def reference_loop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference README's Monte Carlo prediction loop."""
    with torch.no_grad():
        output_mc = []
        for _ in range(NUM_SAMPLES):
            logits = model(x)
            output_mc.append(F.softmax(logits, dim=-1))
        return torch.stack(output_mc)


def deterministic(model: nn.Module, x: torch.Tensor, passes: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(passes)])


def _variants(ours: nn.Module, det: nn.Module, refs: dict[str, nn.Module | None], x: torch.Tensor,
              chunk_size: int | None) -> dict[str, Callable[[], object]]:
    variants: dict[str, Callable[[], object]] = {
        "torchbayes": lambda: torchbayes.predict(ours, x, NUM_SAMPLES, chunk_size=chunk_size),
        "1 x det": lambda: deterministic(det, x, 1),
        "32 x det": lambda: deterministic(det, x, NUM_SAMPLES),
    }
    for kind, ref in refs.items():
        if ref is not None:
            variants[f"ref {kind.lower()[:7]}"] = lambda ref=ref: reference_loop(ref, x)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median over them)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--chunk-size", type=int, default=None, help="predict's chunk_size (default: auto)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    torch.set_num_threads(2)
    rows = []
    for name in cases:
        case = CASES[name]
        torch.manual_seed(0)
        det = case.build().eval()
        ours = torchbayes.dnn_to_bnn(copy.deepcopy(det), include=case.include, exclude=case.exclude).eval()
        kinds = ("Reparameterization", "Flipout") if name in ("mlp", "lenet") else ("Reparameterization",)
        reference_include = case.reference_include or case.include
        refs = {kind: reference_model(det, reference_include, kind) for kind in kinds}
        for batch in case.batches:
            variants = _variants(ours, det, refs, case.make_input(batch), args.chunk_size)
            # Expensive calls: one call per round, medians over the rounds.
            t = time_interleaved(variants, rounds=args.repeats, iters=1, warmup=1)
            rows.append((name, batch, t))
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in t.items()), flush=True)
            reason = whole_model_reason(ours)
            if reason is not None:
                print(f"  {name}: predict runs the whole model per pass: {reason}", flush=True)

    print(f"\n32-sample prediction, median ms over {args.repeats} interleaved rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    nan = float("nan")
    table = []
    for case, batch, t in rows:
        ours = t["torchbayes"]
        ref_r, ref_f = t.get("ref reparam", nan), t.get("ref flipout", nan)
        table.append([case, batch, ours, ref_r, ref_f, t["1 x det"], t["32 x det"],
                      f"{ref_r / ours:.1f}x" + (f" / {ref_f / ours:.1f}x" if ref_f == ref_f else ""),
                      f"{ours / t['1 x det']:.2f}x", f"{ours / t['32 x det']:.2f}x"])
    print(markdown_table(["case", "batch", "torchbayes", "ref reparam. loop", "ref flipout loop", "1 x det",
                          "32 x det", "speed-up vs ref", "time / 1 det", "time / 32 det"], table))


if __name__ == "__main__":
    main()
