"""Bayesian-Torch's recurrent layers, as front doors on :class:`~torchbayes.nn.BayesLSTM`.

The reference's ``LSTMReparameterization`` and ``LSTMFlipout`` are single-layer,
batch-first LSTMs with their own calling convention, kept here for code ported from
Bayesian-Torch. New code should use :class:`torchbayes.nn.BayesLSTM`, which follows
``torch.nn.LSTM`` exactly (layers, directions, time-major input, ``(h_n, c_n)``).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from torchbayes.layers.base import (
    PRIOR_ARGUMENTS,
    REQUIRED,
    ReferenceLayer,
    _bind_reference_arguments,
    _finish_reference_setup,
    reference_signature,
)
from torchbayes.nn.rnn import BayesLSTM

__all__ = ["LSTMReparameterization", "LSTMFlipout"]

_LSTM_SIGNATURE = reference_signature(
    (("in_features", REQUIRED), ("out_features", REQUIRED), *PRIOR_ARGUMENTS, ("bias", True))
)

# The reference holds the input and recurrent maps as two linear layers ``ih`` and
# ``hh`` (gates i, f, g, o stacked like torch's): the same tensors as torch's layer 0.
_REFERENCE_KEYS = {
    "weight_ih_l0_mu": "ih.mu_weight",
    "weight_ih_l0_rho": "ih.rho_weight",
    "bias_ih_l0_mu": "ih.mu_bias",
    "bias_ih_l0_rho": "ih.rho_bias",
    "weight_hh_l0_mu": "hh.mu_weight",
    "weight_hh_l0_rho": "hh.rho_weight",
    "bias_hh_l0_mu": "hh.mu_bias",
    "bias_hh_l0_rho": "hh.rho_bias",
}

LSTMReturn = tuple[Tensor, tuple[Tensor, Tensor], Tensor] | tuple[Tensor, tuple[Tensor, Tensor]]


def _cell_sequence(x: Tensor, hidden_seq: Tensor, h0: Tensor, c0: Tensor, weights: dict[str, Tensor]) -> Tensor:
    """Every step's LSTM cell state, recovered from the hidden states of the fused kernel.

    Given all hidden states, the gates of all steps take two matmuls, and the cell
    states are a cheap elementwise scan ``c_t = f_t * c_{t-1} + i_t * g_t``; much faster
    than running the recurrence in Python. Gradients flow through ``hidden_seq`` too.
    Batch-first shapes: ``x (N, L, H_in)``, ``hidden_seq (N, L, H)``, ``h0``/``c0`` ``(N, H)``.
    """
    previous = torch.cat([h0.unsqueeze(1), hidden_seq[:, :-1]], dim=1)
    gates = F.linear(x, weights["weight_ih_l0"], weights.get("bias_ih_l0")) + F.linear(
        previous, weights["weight_hh_l0"], weights.get("bias_hh_l0")
    )
    hidden = h0.shape[-1]
    act = gates.sigmoid()  # gate order i, f, g, o as in torch
    forget = act[..., hidden : 2 * hidden]
    write = act[..., :hidden] * gates[..., 2 * hidden : 3 * hidden].tanh()
    cells, c = [], c0
    for t in range(x.shape[1]):
        c = torch.addcmul(write[:, t], forget[:, t], c)
        cells.append(c)
    return torch.stack(cells, dim=1)


def _lstm_doc(name: str, estimator: str) -> str:
    return f"""Bayesian-Torch's ``{name}``: a one-layer, batch-first ``BayesLSTM(estimator="{estimator}")``.

    Args:
        in_features: size of each input vector (``input_size``).
        out_features: size of the hidden state (``hidden_size``).
        prior_mean: mean of the Gaussian prior.
        prior_variance: the prior's STANDARD DEVIATION (the reference's name, and its
            meaning: it is used as sigma, not sigma squared).
        posterior_mu_init: mean of the initial draw ``mu ~ N(posterior_mu_init, 0.1)``.
        posterior_rho_init: mean of the initial draw ``rho ~ N(posterior_rho_init, 0.1)``.
        bias: if ``False``, no biases.

    ``forward(X, hidden_states=None, return_kl=True)`` keeps the reference's return
    convention, quirks included:

    * it returns ``hidden_seq, (hidden_seq, c_seq), kl``: the SECOND element repeats the
      whole hidden sequence where ``torch.nn.LSTM`` returns the last hidden state, and
      ``c_seq`` is the cell state at every step (both of shape ``(N, L, out_features)``);
      take ``hidden_seq[:, -1]`` for the last hidden state;
    * ``kl`` is the reference's value, ``L * kl_loss()``: the reference adds its
      per-layer KL once per time step. Neither is the ELBO's KL
      (:func:`torchbayes.kl_divergence`);
    * ``hidden_states`` is ``(h_0, c_0)``, each of shape ``(N, out_features)``;
    * with ``return_kl=False`` or ``dnn_to_bnn_flag = True`` the ``kl`` is left out.

    Unlike the reference, which draws new weights at every time step, one weight sample
    is drawn per forward pass and shared by all steps (see
    :class:`~torchbayes.nn.BayesLSTM`). Parameters are saved under the reference's keys
    (``ih.mu_weight``, ``hh.rho_bias``...), so checkpoints move both ways.

    Shape:
        - X: :math:`(N, L, H_{{in}})`; hidden_seq and c_seq: :math:`(N, L, H_{{out}})`.

    Example:
        >>> lstm = {name}(8, 32)
        >>> hidden_seq, (_, c_seq), kl = lstm(torch.randn(16, 20, 8))
        >>> last_hidden = hidden_seq[:, -1]
    """


class _ReferenceLSTM(BayesLSTM):
    __signature__: ClassVar[inspect.Signature] = _LSTM_SIGNATURE
    _estimator: ClassVar[str]
    prior_mean: float
    prior_variance: float
    dnn_to_bnn_flag: bool
    # forward runs the cell-collecting loop on one draw: predict() samples pass by pass.
    supports_sample_groups = False

    # The reference's initialisation and KL, shared with the other front doors.
    reset_parameters = ReferenceLayer.reset_parameters
    init_parameters = ReferenceLayer.init_parameters
    kl_loss = ReferenceLayer.kl_loss

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        a = _bind_reference_arguments(self, args, kwargs)
        super().__init__(
            a["in_features"],
            a["out_features"],
            bias=a["bias"],
            batch_first=True,
            prior_mu=a["prior_mean"],
            prior_sigma=a["prior_variance"],
            posterior_mu_init=a["posterior_mu_init"],
            posterior_rho_init=a["posterior_rho_init"],
            estimator=self._estimator,
        )
        self.in_features, self.out_features = a["in_features"], a["out_features"]
        _finish_reference_setup(self, a["prior_mean"], a["prior_variance"])

    @classmethod
    def _reference_keys(cls) -> dict[str, str]:
        """Native parameter name -> the reference's name."""
        return dict(_REFERENCE_KEYS)

    def forward(  # type: ignore[override]
        self,
        X: Tensor,
        hidden_states: tuple[Tensor, Tensor] | None = None,
        return_kl: bool = True,
    ) -> LSTMReturn:
        """Run the sequence; see the class docstring for the reference's return convention.

        Args:
            X: input of shape ``(N, L, in_features)``.
            hidden_states: optional ``(h_0, c_0)``, each ``(N, out_features)``.
            return_kl: also return the reference's ``kl`` (unless ``dnn_to_bnn_flag``).

        Returns:
            ``hidden_seq, (hidden_seq, c_seq), kl``, or without ``kl``.
        """
        self._check_estimator()
        if not (isinstance(X, Tensor) and X.dim() == 3):
            shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(
                f"{type(self).__name__}: X must be 3-D (batch, sequence, in_features={self.in_features}), got {shape}"
            )
        self._check_input(X)
        hx = None
        if hidden_states is not None:
            if not (isinstance(hidden_states, (tuple, list)) and len(hidden_states) == 2):
                raise TypeError(
                    f"{type(self).__name__}: hidden_states must be a tuple (h_0, c_0), "
                    f"got {type(hidden_states).__name__}"
                )
            expected = (X.shape[0], self.out_features)
            for what, state in zip(("h_0", "c_0"), hidden_states):
                if not (isinstance(state, Tensor) and tuple(state.shape) == expected):
                    shape = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
                    raise ValueError(
                        f"{type(self).__name__}: hidden_states {what} must have shape "
                        f"(batch, out_features) = {expected}, got {shape}"
                    )
            # The reference's states have no layer dimension: (N, H) -> (1, N, H).
            hx = (hidden_states[0].unsqueeze(0), hidden_states[1].unsqueeze(0))
        states = self._initial_state(X, hx, True, X.shape[0])
        if self.estimator == "flipout" and not self.deterministic:
            # The time loop records every step's cell state (time-major).
            hidden_seq, (_, _, c_seq) = self._loop_forward(X, states, collect_cells=True)
            c_seq = c_seq.transpose(0, 1)
        else:
            weights = self.sample_weights()
            hidden_seq, _ = self._fused_forward(X, states, weights)
            c_seq = _cell_sequence(X, hidden_seq, states[0][0], states[1][0], weights)
        if return_kl and not self.dnn_to_bnn_flag:
            return hidden_seq, (hidden_seq, c_seq), self.kl_divergence("mean") * X.shape[1]  # L * kl_loss()
        return hidden_seq, (hidden_seq, c_seq)


class LSTMReparameterization(_ReferenceLSTM):
    __doc__ = _lstm_doc("LSTMReparameterization", "reparameterization")
    _estimator = "reparameterization"


class LSTMFlipout(_ReferenceLSTM):
    __doc__ = _lstm_doc("LSTMFlipout", "flipout")
    _estimator = "flipout"
