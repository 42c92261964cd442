"""Bayesian recurrent layers: :class:`BayesLSTM` and :class:`BayesGRU`.

Both mirror ``torch.nn.LSTM`` / ``torch.nn.GRU`` argument for argument and return
exactly what they return, with a mean-field Gaussian posterior over every weight and
bias (``weight_ih_l0_mu``, ``weight_ih_l0_rho``, ``weight_hh_l0_reverse_mu``...; the
names are torch's with ``_mu``/``_rho`` appended).

One weight sample is drawn per forward pass and shared by all time steps of the
sequence, so each sequence is processed by one network drawn from the posterior
(Fortunato et al., 2017), not by a fresh network at every step.

* ``reparameterization`` (and posterior-mean mode) hands the sampled weights to
  PyTorch's own fused recurrence (``torch._VF.lstm`` / ``torch._VF.gru``), so the time
  loop runs in C++ and the result is bit-for-bit what ``torch.nn.LSTM`` computes with
  those weights. Gradients reach ``mu`` and ``rho`` through the sampled weights.
* ``flipout`` gives each example its own pseudo-independent weight sample,
  ``W_b = mu + diag(r_b) (sigma * eps) diag(s_b)``, with sign vectors ``s_b``, ``r_b``
  drawn once per example and forward and shared by all time steps. The input
  projections of all time steps take one matmul; only the hidden-to-hidden products run
  in a Python loop over time.
* ``local`` reparameterization is not offered: it samples pre-activations
  independently at every time step, which is not the distribution of a recurrent
  network whose weights are shared across time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from torchbayes.nn import functional as BF
from torchbayes.nn import noise, vectorized
from torchbayes.nn.base import BayesianModule
from torchbayes.priors import Prior

__all__ = ["BayesLSTM", "BayesGRU"]

#: Estimators the recurrent layers implement (see the module docstring for ``local``).
RNN_ESTIMATORS: tuple[str, ...] = ("reparameterization", "flipout")

LSTMState = tuple[Tensor, Tensor]


class _FlipoutProjection:
    """``x -> x W_b^T + b_b`` with one pseudo-independent posterior draw per example ``b``.

    The draw is ``W_b = mu + diag(r_b) dW diag(s_b)`` (the bias likewise), evaluated as
    ``x mu^T + ((x * s) dW^T) * r`` without forming ``W_b``. The signs ``s``, ``r`` have
    one row per example and broadcast over any leading (time) dimension of ``x``, so
    every time step of a sequence sees the same weights.
    """

    def __init__(
        self,
        mu_weight: Tensor,
        mu_bias: Tensor | None,
        delta_weight: Tensor,
        delta_bias: Tensor | None,
        batch_size: int,
    ) -> None:
        self.mu_weight_t = mu_weight.t()
        self.delta_weight_t = delta_weight.t()
        self.sign_in = noise.random_signs((batch_size, mu_weight.shape[1]), mu_weight)
        self.sign_out = noise.random_signs((batch_size, mu_weight.shape[0]), mu_weight)
        # The bias part of each example's draw does not depend on x: fold it once.
        const = None if delta_bias is None else self.sign_out * delta_bias
        if mu_bias is not None:
            const = mu_bias.expand(batch_size, -1) if const is None else const + mu_bias
        self.const = const

    def __call__(self, x: Tensor) -> Tensor:
        if self.const is None:
            mean = x @ self.mu_weight_t
        elif x.dim() == 2:  # one time step: fused add
            mean = torch.addmm(self.const, x, self.mu_weight_t)
        else:
            mean = x @ self.mu_weight_t + self.const
        return torch.addcmul(mean, (x * self.sign_in) @ self.delta_weight_t, self.sign_out)

    def accumulate(self, base: Tensor, x: Tensor) -> Tensor:
        """``base + x W_b^T`` for 2-D ``x``, leaving out the bias (``const``), in three kernels."""
        mean = torch.addmm(base, x, self.mu_weight_t)
        return torch.addcmul(mean, (x * self.sign_in) @ self.delta_weight_t, self.sign_out)


class _BayesRNNBase(BayesianModule):
    """Shared implementation of :class:`BayesLSTM` and :class:`BayesGRU`."""

    #: Opts in to :func:`torchbayes.predict`'s many-samples-per-pass mode.
    supports_sample_groups: bool = True
    _torch_cls: type[nn.LSTM] | type[nn.GRU]
    _fused: Callable[..., Any]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        prior_mu: float | Tensor = 0.0,
        prior_sigma: float | Tensor = 1.0,
        posterior_mu_init: float = 0.0,
        posterior_rho_init: float = -3.0,
        estimator: str = "reparameterization",
        prior: Prior | None = None,
    ) -> None:
        super().__init__(
            prior_mu=prior_mu,
            prior_sigma=prior_sigma,
            posterior_mu_init=posterior_mu_init,
            posterior_rho_init=posterior_rho_init,
            estimator=estimator,
            prior=prior,
        )
        self._check_estimator()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # The meta-device twin validates the rest exactly as torch does and names the weights.
        twin = self._torch_cls(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device="meta",
        )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(twin.dropout)
        self.bidirectional = bool(bidirectional)
        self._flat_weights_names: list[str] = list(twin._flat_weights_names)
        for name in self._flat_weights_names:
            self.register_variational(name, tuple(getattr(twin, name).shape), device=device, dtype=dtype)
        self.reset_parameters()

    # ----------------------------------------------------------------- set-up
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """Means as ``torch.nn.LSTM``/``GRU`` initialises its weights, then the posterior offsets."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for _, mu, _, _ in self.variational_parameters():
            nn.init.uniform_(mu, -bound, bound)
        self.reset_variational_parameters()

    def _check_estimator(self) -> None:
        if self.estimator not in RNN_ESTIMATORS:
            raise ValueError(
                f"{type(self).__name__} supports estimator in {RNN_ESTIMATORS}, got "
                f"{self.estimator!r} (local reparameterization would resample the "
                f"weights shared across time steps independently at every step)"
            )

    def _weight_names(self, layer: int, direction: int) -> tuple[str, str, str | None, str | None]:
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        if not self.bias:
            return f"weight_ih{suffix}", f"weight_hh{suffix}", None, None
        return f"weight_ih{suffix}", f"weight_hh{suffix}", f"bias_ih{suffix}", f"bias_hh{suffix}"

    # ----------------------------------------------------------------- weights
    def _draw(self, name: str) -> Tensor:
        mu = getattr(self, f"{name}_mu")
        return mu if self.deterministic else BF.sample_gaussian(mu, getattr(self, f"{name}_rho"))

    def sample_weights(self) -> dict[str, Tensor]:
        """One draw of every weight from the posterior (the means in posterior-mean mode).

        Returns:
            ``{torch_name: tensor}`` in ``torch.nn.LSTM``/``GRU``'s flat-weight order,
            differentiable in the posterior parameters.
        """
        return {name: self._draw(name) for name in self._flat_weights_names}

    def _flipout_projection(self, weight: str, bias: str | None, batch_size: int) -> _FlipoutProjection:
        return _FlipoutProjection(
            getattr(self, f"{weight}_mu"),
            None if bias is None else getattr(self, f"{bias}_mu"),
            BF.sample_perturbation(getattr(self, f"{weight}_rho")),
            None if bias is None else BF.sample_perturbation(getattr(self, f"{bias}_rho")),
            batch_size,
        )

    def _projections(
        self, layer: int, direction: int, batch_size: int
    ) -> tuple[_FlipoutProjection, _FlipoutProjection]:
        """Flipout input and hidden projections of one layer and direction, for the time loop."""
        w_ih, w_hh, b_ih, b_hh = self._weight_names(layer, direction)
        return (self._flipout_projection(w_ih, b_ih, batch_size), self._flipout_projection(w_hh, b_hh, batch_size))

    # ----------------------------------------------------------------- input checks
    def _check_input(self, input: Tensor) -> bool:
        """Validate ``input``; return whether it is batched."""
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            layout = "(N, L, H_in)" if self.batch_first else "(L, N, H_in)"
            raise ValueError(
                f"{name}: input must be 3-D {layout} (batch_first={self.batch_first}) or "
                f"2-D (L, H_in) unbatched, got shape {tuple(input.shape)}"
            )
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input must have input_size={self.input_size} features in its last "
                f"dimension, got shape {tuple(input.shape)}"
            )
        return input.dim() == 3

    def _check_state(self, state: Tensor, what: str, batched: bool, batch_size: int) -> None:
        expected = (self.num_layers * self.num_directions,) + ((batch_size,) if batched else ()) + (self.hidden_size,)
        if not isinstance(state, Tensor):
            raise TypeError(f"{type(self).__name__}: {what} must be a Tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected:
            dims = (
                "(num_layers * num_directions, N, hidden_size)"
                if batched
                else "(num_layers * num_directions, hidden_size) for unbatched input"
            )
            raise ValueError(
                f"{type(self).__name__}: {what} must have shape {dims} = {expected}, got {tuple(state.shape)}"
            )

    def _zero_state(self, input: Tensor, batch_size: int) -> Tensor:
        return torch.zeros(
            self.num_layers * self.num_directions, batch_size, self.hidden_size, dtype=input.dtype, device=input.device
        )

    # ----------------------------------------------------------------- forward
    def _run(self, input: Tensor | PackedSequence, hx: Any) -> tuple[Any, Any]:
        """Validate, draw the weights once and run the recurrence; handles unbatched input."""
        self._check_estimator()
        if isinstance(input, PackedSequence):
            return self._run_packed(input, hx)
        batched = self._check_input(input)
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        batch_size = input.shape[batch_dim]
        states = self._initial_state(input, hx, batched, batch_size)
        groups = vectorized.active_sample_groups()
        if groups is not None and groups.num_groups > 1 and not self.deterministic:
            output, final = self._forward_sample_groups(input, states, groups.num_groups, batched)
        elif self.deterministic or self.estimator == "reparameterization":
            output, final = self._fused_forward(input, states, self.sample_weights())
        else:
            output, final = self._loop_forward(input, states)
            if torch.is_autocast_enabled(input.device.type):
                dtype = self._fused_autocast_dtype(input, states)
                output, final = output.to(dtype), tuple(s.to(dtype) for s in final)
        if not batched:
            output = output.squeeze(batch_dim)
            final = tuple(s.squeeze(1) for s in final)
        return output, final

    def _initial_state(self, input: Tensor, hx: Any, batched: bool, batch_size: int) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _fused_autocast_dtype(self, input: Tensor, states: tuple[Tensor, ...]) -> torch.dtype:
        """The output dtype of torch's fused kernel on ``input`` under the autocast in force.

        The flipout loop computes in the parameters' dtype, but a drop-in twin must return
        what ``torch.nn.LSTM``/``GRU`` returns under autocast, and that differs by kernel and
        device (CPU runs LSTM in bfloat16, GRU in float32). One time step of one example on
        the posterior means, without dropout or gradients, asks the kernel itself.
        """
        time_dim, batch_dim = (1, 0) if self.batch_first else (0, 1)
        if input.shape[time_dim] == 0 or input.shape[batch_dim] == 0:
            return input.dtype
        step = input.narrow(time_dim, 0, 1).narrow(batch_dim, 0, 1)
        hx = tuple(s.narrow(1, 0, 1) for s in states)
        weights = [getattr(self, f"{name}_mu").detach() for name in self._flat_weights_names]
        with torch.no_grad():
            probe = type(self)._fused(
                step,
                hx if len(hx) > 1 else hx[0],
                weights,
                self.bias,
                self.num_layers,
                0.0,
                False,
                self.bidirectional,
                self.batch_first,
            )
        return probe[0].dtype

    def _run_packed(self, input: PackedSequence, hx: Any) -> tuple[PackedSequence, tuple[Tensor, ...]]:
        """Variable-length sequences, as ``torch.nn.LSTM`` takes them (fused kernel only)."""
        if not self.deterministic and self.estimator != "reparameterization":
            raise ValueError(
                f"{type(self).__name__}: PackedSequence input needs estimator="
                f"'reparameterization' (or posterior-mean mode), got {self.estimator!r}; "
                "pad the sequences for flipout"
            )
        if vectorized.active_sample_groups() is not None:
            raise RuntimeError(
                f"{type(self).__name__}: a PackedSequence cannot hold several Monte Carlo "
                "samples; use predict(..., chunk_size=1) for this model"
            )
        data, batch_sizes, sorted_indices, unsorted_indices = input
        if data.dim() != 2 or data.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: packed data must have shape (sum of lengths, "
                f"input_size={self.input_size}), got {tuple(data.shape)}"
            )
        batch_size = int(batch_sizes[0])
        states = self._initial_state(data, hx, True, batch_size)
        if hx is not None and sorted_indices is not None:  # the caller's order -> the packed order
            states = tuple(s.index_select(1, sorted_indices) for s in states)
        hidden: Any = states if len(states) > 1 else states[0]
        result = type(self)._fused(
            data,
            batch_sizes,
            hidden,
            list(self.sample_weights().values()),
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
        )
        final = tuple(result[1:])
        if unsorted_indices is not None:
            final = tuple(s.index_select(1, unsorted_indices) for s in final)
        return PackedSequence(result[0], batch_sizes, sorted_indices, unsorted_indices), final

    def _forward_sample_groups(
        self, input: Tensor, states: tuple[Tensor, ...], num_groups: int, batched: bool
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One independent posterior draw per block of the batch (see :mod:`torchbayes.nn.vectorized`).

        Each block runs PyTorch's fused recurrence on its own weight draw: exact posterior
        samples whatever the training estimator, and faster than the flipout loop.
        """
        batch_dim = 0 if self.batch_first else 1
        if not batched or input.shape[batch_dim] % num_groups:
            raise RuntimeError(
                f"{type(self).__name__}: predicting {num_groups} Monte Carlo samples per pass needs "
                f"a batch dimension divisible by {num_groups}; got input of shape {tuple(input.shape)} "
                f"(batch_first={self.batch_first}). Use predict(..., chunk_size=1) for this model."
            )
        blocks = zip(input.chunk(num_groups, batch_dim), *(s.chunk(num_groups, 1) for s in states))
        results = [self._fused_forward(block[0], tuple(block[1:]), self.sample_weights()) for block in blocks]
        output = torch.cat([out for out, _ in results], dim=batch_dim)
        final = tuple(torch.cat(parts, dim=1) for parts in zip(*(f for _, f in results)))
        return output, final

    def _fused_forward(
        self, input: Tensor, states: tuple[Tensor, ...], weights: dict[str, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """PyTorch's own recurrence (C++ time loop) on one draw of the weights."""
        hx: Any = states if len(states) > 1 else states[0]
        result = type(self)._fused(
            input,
            hx,
            list(weights.values()),
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            self.batch_first,
        )
        return result[0], tuple(result[1:])

    def _loop_forward(
        self, input: Tensor, states: tuple[Tensor, ...], collect_cells: bool = False
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The flipout recurrence: a Python loop over time on per-example weight draws.

        Args:
            collect_cells: also return the LSTM cell states of the last layer at every
                step, time-major, directions concatenated (an extra last element).
        """
        x = input.transpose(0, 1) if self.batch_first else input  # time-major (L, N, H_in)
        batch_size = x.shape[1]
        finals: list[list[Tensor]] = [[] for _ in states]
        cells: list[Tensor] = []  # of the current layer
        for layer in range(self.num_layers):
            outputs, cells = [], []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                project_input, project_hidden = self._projections(layer, direction, batch_size)
                sequence = x.flip(0) if direction == 1 else x
                # One matmul for the input projections of all time steps.
                out, last, cell_seq = self._recurrence(
                    project_input(sequence), project_hidden, tuple(s[index] for s in states), collect_cells
                )
                outputs.append(out.flip(0) if direction == 1 else out)
                if collect_cells:
                    assert cell_seq is not None  # _recurrence returns the cells when asked
                    cells.append(cell_seq.flip(0) if direction == 1 else cell_seq)
                for acc, s in zip(finals, last):
                    acc.append(s)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        output = x.transpose(0, 1) if self.batch_first else x
        final = tuple(torch.stack(acc) for acc in finals)
        if collect_cells:
            return output, (*final, torch.cat(cells, dim=-1))
        return output, final

    def _recurrence(
        self, pre: Tensor, project_hidden: _FlipoutProjection, state: tuple[Tensor, ...], collect_cells: bool
    ) -> tuple[Tensor, tuple[Tensor, ...], Tensor | None]:
        """Run one layer and direction over time from precomputed input projections ``pre``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return f"{s}, {super().extra_repr()}"

    # ----------------------------------------------------------------- conversion
    @classmethod
    def from_torch(cls, module: nn.RNNBase, **bayes_kwargs: Any) -> Any:
        """The Bayesian twin of a ``torch.nn.LSTM``/``GRU``, whose posterior means are its weights.

        Every constructor argument (``num_layers``, ``bias``, ``batch_first``,
        ``dropout``, ``bidirectional``, device, dtype) is kept, so in posterior-mean mode
        the new layer computes what ``module`` computes (plus ``posterior_mu_init``, 0 by
        default). ``module`` is not modified. The variational parameters carry torch's
        names, so :func:`torchbayes.dnn_to_bnn` (with ``moped_enable``) and
        :func:`torchbayes.moped` pair them with ``module``'s weights.

        Args:
            module: a ``torch.nn.LSTM`` (``proj_size`` 0) or ``torch.nn.GRU``, matching this class.
            **bayes_kwargs: ``prior_mu``, ``prior_sigma``, ``posterior_mu_init``,
                ``posterior_rho_init``, ``estimator``, ``prior``.

        Returns:
            A new layer in ``module``'s training mode, with ``requires_grad`` of its
            posterior parameters copied from ``module``'s first weight.

        Example:
            >>> BayesLSTM.from_torch(nn.LSTM(8, 32, num_layers=2), estimator="flipout")
        """
        if not isinstance(module, cls._torch_cls):
            raise TypeError(
                f"{cls.__name__}.from_torch: module must be a torch.nn."
                f"{cls._torch_cls.__name__}, got {type(module).__name__}"
            )
        if getattr(module, "proj_size", 0):
            raise ValueError(
                f"{cls.__name__}.from_torch: LSTM projections are not supported, got proj_size={module.proj_size}"
            )
        first = getattr(module, module._flat_weights_names[0])
        layer = cls(
            module.input_size,
            module.hidden_size,
            module.num_layers,
            module.bias,
            module.batch_first,
            module.dropout,
            module.bidirectional,
            device=first.device,
            dtype=first.dtype,
            **bayes_kwargs,
        )
        with torch.no_grad():
            for name, mu, rho, _ in layer.variational_parameters():
                mu.copy_(getattr(module, name)).add_(layer.posterior_mu_init)
                mu.requires_grad_(first.requires_grad)
                rho.requires_grad_(first.requires_grad)
        return layer.train(module.training)

    def to_torch(self) -> nn.RNNBase:
        """The deterministic ``torch.nn`` twin carrying the posterior means.

        Returns:
            A new ``torch.nn.LSTM``/``GRU`` (same hyperparameters, device and dtype).
        """
        mu = next(self.parameters())
        twin = self._torch_cls(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            device=mu.device,
            dtype=mu.dtype,
        )
        with torch.no_grad():
            for name in self._flat_weights_names:
                getattr(twin, name).copy_(getattr(self, f"{name}_mu"))
        twin.train(self.training)
        return twin


def _rnn_arguments_doc(twin: str) -> str:
    return f"""
    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
        device, dtype: as in ``torch.nn.{twin}`` (``proj_size`` is not supported).
        prior_mu, prior_sigma, posterior_mu_init, posterior_rho_init, prior:
            see :class:`~torchbayes.nn.BayesianModule`.
        estimator: ``"reparameterization"`` (one weight draw per forward, shared by the
            batch; runs PyTorch's fused recurrence) or ``"flipout"`` (one
            pseudo-independent draw per sequence of the batch; Python time loop).

    Attributes:
        weight_ih_l[k]_mu, weight_ih_l[k]_rho, weight_hh_l[k]_mu, ...: posterior
            parameters named and shaped like ``torch.nn.{twin}``'s parameters
            (``_reverse`` for the backward direction), means initialised like them.
    """


class BayesLSTM(_BayesRNNBase):
    __doc__ = f"""Bayesian ``torch.nn.LSTM``: a Gaussian posterior over every weight and bias.

    A drop-in twin of ``torch.nn.LSTM``: same arguments, same input and state shapes,
    same return value. One weight sample is drawn per forward pass and used at every time
    step. With ``posterior_mean(model)`` (or sigma -> 0) it computes exactly what
    ``torch.nn.LSTM`` computes with the posterior means as weights.
    {_rnn_arguments_doc("LSTM")}
    Shape:
        - input: :math:`(L, N, H_{{in}})`, :math:`(N, L, H_{{in}})` if ``batch_first``, or
          :math:`(L, H_{{in}})` unbatched.
          A ``PackedSequence`` works as in torch with the reparameterization estimator or
          in posterior-mean mode (the output is then packed too).
        - hx: optional ``(h_0, c_0)``, each :math:`(D \\cdot num\\_layers, N, H)` (or without
          ``N`` for unbatched input); zeros if omitted.
        - output: ``(output, (h_n, c_n))`` with output :math:`(L, N, D \\cdot H)`
          (batch first if ``batch_first``) and ``h_n``, ``c_n`` like ``h_0``.

    Example:
        >>> lstm = BayesLSTM(8, 32, num_layers=2, batch_first=True, estimator="flipout")
        >>> out, (h_n, c_n) = lstm(torch.randn(16, 20, 8))
        >>> out.shape, h_n.shape
        (torch.Size([16, 20, 32]), torch.Size([2, 16, 32]))
        >>> loss = F.mse_loss(head(out[:, -1]), y) + lstm.kl_divergence() / num_data
    """

    _torch_cls = nn.LSTM
    _fused = staticmethod(_VF.lstm)

    def forward(
        self, input: Tensor | PackedSequence, hx: LSTMState | None = None
    ) -> tuple[Tensor | PackedSequence, LSTMState]:
        """Run the sequence(s) through one network drawn from the posterior.

        Args:
            input: ``(L, N, input_size)`` (``(N, L, input_size)`` if ``batch_first``),
                ``(L, input_size)`` unbatched, or a ``PackedSequence``.
            hx: optional ``(h_0, c_0)``, zeros if omitted.

        Returns:
            ``(output, (h_n, c_n))``, exactly as ``torch.nn.LSTM`` returns them.
        """
        output, (h_n, c_n) = self._run(input, hx)
        return output, (h_n, c_n)

    def _initial_state(self, input: Tensor, hx: Any, batched: bool, batch_size: int) -> tuple[Tensor, ...]:
        if hx is None:
            zeros = self._zero_state(input, batch_size)
            return zeros, zeros
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{type(self).__name__}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        self._check_state(hx[0], "h_0 (hx[0])", batched, batch_size)
        self._check_state(hx[1], "c_0 (hx[1])", batched, batch_size)
        return (hx[0], hx[1]) if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))

    def _recurrence(
        self, pre: Tensor, project_hidden: _FlipoutProjection, state: tuple[Tensor, ...], collect_cells: bool
    ) -> tuple[Tensor, tuple[Tensor, ...], Tensor | None]:
        h, c = state
        if project_hidden.const is not None:  # the hidden bias is constant in time: add it once
            pre = pre + project_hidden.const
        hs, cs = [], []
        hidden = self.hidden_size
        for x_gates in pre.unbind(0):
            gates = project_hidden.accumulate(x_gates, h)
            # One sigmoid over all gates (the cell gate's is unused) beats three slices.
            act = gates.sigmoid()
            c = torch.addcmul(
                act[:, hidden : 2 * hidden] * c, act[:, :hidden], gates[:, 2 * hidden : 3 * hidden].tanh()
            )
            h = act[:, 3 * hidden :] * c.tanh()
            hs.append(h)
            if collect_cells:
                cs.append(c)
        return torch.stack(hs), (h, c), torch.stack(cs) if collect_cells else None


class BayesGRU(_BayesRNNBase):
    __doc__ = f"""Bayesian ``torch.nn.GRU``: a Gaussian posterior over every weight and bias.

    A drop-in twin of ``torch.nn.GRU``: same arguments, shapes and return value. One
    weight sample is drawn per forward pass and used at every time step. With
    ``posterior_mean(model)`` (or sigma -> 0) it computes exactly what ``torch.nn.GRU``
    computes with the posterior means as weights.
    {_rnn_arguments_doc("GRU")}
    Shape:
        - input: :math:`(L, N, H_{{in}})`, :math:`(N, L, H_{{in}})` if ``batch_first``, or
          :math:`(L, H_{{in}})` unbatched.
          A ``PackedSequence`` works as in torch with the reparameterization estimator or
          in posterior-mean mode.
        - hx: optional ``h_0`` of shape :math:`(D \\cdot num\\_layers, N, H)` (or without ``N``).
        - output: ``(output, h_n)`` with output :math:`(L, N, D \\cdot H)`.

    Example:
        >>> gru = BayesGRU(8, 32, batch_first=True)
        >>> out, h_n = gru(torch.randn(16, 20, 8))
    """

    _torch_cls = nn.GRU
    _fused = staticmethod(_VF.gru)

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        """Run the sequence(s) through one network drawn from the posterior.

        Args:
            input: ``(L, N, input_size)`` (``(N, L, input_size)`` if ``batch_first``),
                ``(L, input_size)`` unbatched, or a ``PackedSequence``.
            hx: optional ``h_0``, zeros if omitted.

        Returns:
            ``(output, h_n)``, exactly as ``torch.nn.GRU`` returns them.
        """
        output, (h_n,) = self._run(input, hx)
        return output, h_n

    def _initial_state(self, input: Tensor, hx: Any, batched: bool, batch_size: int) -> tuple[Tensor, ...]:
        if hx is None:
            return (self._zero_state(input, batch_size),)
        self._check_state(hx, "hx", batched, batch_size)
        return (hx,) if batched else (hx.unsqueeze(1),)

    def _recurrence(
        self, pre: Tensor, project_hidden: _FlipoutProjection, state: tuple[Tensor, ...], collect_cells: bool
    ) -> tuple[Tensor, tuple[Tensor, ...], Tensor | None]:
        (h,) = state
        hs = []
        hidden = self.hidden_size
        for x_gates in pre.unbind(0):
            h_gates = project_hidden(h)
            reset_update = (x_gates[:, : 2 * hidden] + h_gates[:, : 2 * hidden]).sigmoid()
            candidate = torch.addcmul(
                x_gates[:, 2 * hidden :], reset_update[:, :hidden], h_gates[:, 2 * hidden :]
            ).tanh()
            # h' = (1 - z) * n + z * h
            h = torch.addcmul(candidate, reset_update[:, hidden:], h - candidate)
            hs.append(h)
        return torch.stack(hs), (h,), None
