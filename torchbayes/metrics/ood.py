"""Out-of-distribution detection: scores from logits and the false-positive rate at a fixed recall.

Beside entropy and mutual information (`torchbayes.uncertainty`), two scores read from
the logits, both "higher = more likely OOD" like the uncertainties, so they plug into
`torchbayes.metrics.ood_auroc`, `ood_aupr` and `fpr_at_tpr` as they are:

- `energy_score`: ``-T logsumexp(logits / T)`` (Liu et al. 2020, "Energy-based
  out-of-distribution detection"); low energy = in-distribution;
- `max_logit_score`: ``-max_c logit_c`` (Hendrycks et al. 2022, "Scaling
  out-of-distribution detection for real-world settings").

For Monte Carlo logits ``(S, N, C)`` each score is averaged over the ``S`` samples.

`fpr_at_tpr` is the usual "FPR at 95% TPR" (Hendrycks and Gimpel 2017; Liang et al.
2018): in-distribution inputs are the positives; the threshold keeps 95% of them, and
the result is the fraction of OOD inputs that also pass it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchbayes.metrics.classification import _check_logits, _ood_scores, _torchmetrics_classification

__all__ = ["energy_score", "fpr_at_tpr", "max_logit_score"]


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T logsumexp(logits / T)`` of each input; higher = more likely OOD.

    Args:
        logits: ``(N, C)``, or Monte Carlo ``(S, N, C)`` (the mean over samples).
        temperature: ``T > 0`` (1 in Liu et al. 2020).

    Returns:
        ``(N,)`` tensor.

    Example:
        >>> ood_auroc(energy_score(result.samples), energy_score(ood_result.samples))
    """
    _check_logits(logits, "energy_score")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"energy_score: temperature must be a finite number > 0, got {temperature!r}")
    energy = -temperature * torch.logsumexp(logits / temperature, dim=-1)
    return energy.mean(0) if logits.dim() == 3 else energy


def max_logit_score(logits: Tensor) -> Tensor:
    """Negative largest logit of each input; higher = more likely OOD.

    Args:
        logits: ``(N, C)``, or Monte Carlo ``(S, N, C)`` (the mean over samples).

    Returns:
        ``(N,)`` tensor.

    Example:
        >>> ood_auroc(max_logit_score(logits_test), max_logit_score(logits_ood))
    """
    _check_logits(logits, "max_logit_score")
    score = -logits.max(dim=-1).values
    return score.mean(0) if logits.dim() == 3 else score


def fpr_at_tpr(in_scores: Tensor, out_scores: Tensor, tpr: float = 0.95) -> Tensor:
    """False-positive rate of OOD detection at a true-positive rate of ``tpr`` (FPR95).

    The in-distribution inputs are the positives, accepted when their score is at most a
    threshold; the threshold is the lowest that accepts at least ``tpr`` of them, and the
    result is the fraction of OOD inputs it accepts too (lower is better; ties in score
    are accepted together). From torchmetrics' ``binary_roc``; equals scikit-learn's
    ``roc_curve`` read at the first point with TPR >= ``tpr``.

    Args:
        in_scores: ``(N,)`` uncertainty scores of in-distribution inputs.
        out_scores: ``(M,)`` scores of OOD inputs.
        tpr: the recall of in-distribution inputs, in ``(0, 1]``.

    Returns:
        0-D tensor in ``[0, 1]``.

    Example:
        >>> fpr_at_tpr(result.predictive_entropy, ood_result.predictive_entropy)   # FPR95
    """
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0 < tpr <= 1:
        raise ValueError(f"fpr_at_tpr: tpr must be in (0, 1], got {tpr!r}")
    scores, is_out = _ood_scores(in_scores, out_scores, "fpr_at_tpr")
    fpr, recall, _ = _torchmetrics_classification().binary_roc(-scores, 1 - is_out)
    return fpr[torch.nonzero(recall >= tpr - 1e-12)[0, 0]]
