"""IVON: variational learning with an Adam-like optimizer (Shen et al., ICML 2024).

IVON learns a mean-field Gaussian posterior ``N(m, diag(1 / (ess * (h + delta))))`` over an
ordinary network's weights: the parameters hold the means ``m``, the optimizer holds ``h``
(an average of Hessian diagonals) and the prior precision ``delta`` is the weight decay.
Each step draws one weight sample (or several), shared by the whole batch, and estimates
the Hessian from the same gradient by the reparameterization trick (Price's theorem):
``E[eps * g] / sigma``. No Bayesian layers and no KL term are needed; the posterior can be
turned into torchbayes' Bayesian layers afterwards (:func:`torchbayes.optim.ivon_to_bnn`).

The update is that of ``ivon-opt`` 0.1.3 (the paper's reference code), step for step:

    g, f      = mean over samples of grad and of ess * (h + delta) * noise * grad
    momentum  = beta1 * momentum + (1 - beta1) * g
    h         = beta2 * h + (1 - beta2) * f + (1 - beta2)^2 / 2 * (h - f)^2 / (h + delta)
    m         = m - lr * (hess_init + delta) * clip((momentum / debias + delta * m) / (h + delta))

but it is computed differently, for speed on CPUs: in place over the list of parameter
tensors (``torch._foreach_*``; ivon-opt concatenates all parameters into new vectors
several times per step), with the library's parallel normal draw, and with the state kept
as ``precision = h + delta`` so that neither the draw nor the update needs ``h + delta``
recomputed. The momentum absorbs each sample's gradient when the sample ends, so no
gradient average is stored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchbayes.nn import noise

__all__ = ["IVON"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


def _check(name: str, value: Any, *, low: float, low_ok: bool, high: float = math.inf, high_ok: bool = True) -> float:
    """``value`` as a float in the interval, or a ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"IVON: {name} must be a number, got {value!r}")
    value = float(value)
    if not ((value >= low) if low_ok else (value > low)) or not ((value <= high) if high_ok else (value < high)):
        left, right = "[" if low_ok else "(", "]" if high_ok else ")"
        raise ValueError(f"IVON: {name} must lie in {left}{low}, {high}{right}, got {value!r}")
    return value


class IVON(torch.optim.Optimizer):
    r"""Improved Variational Online Newton: a Gaussian posterior over the weights at Adam's cost.

    The training loop is Adam's with one block around the forward and backward, which
    puts a weight sample into the parameters and takes it out again:

        for x, y in loader:
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
            optimizer.step()

    or ``optimizer.step(closure)`` with a closure that zeroes the gradients, computes the
    loss, calls ``backward()`` and returns the loss (the optimizer draws the sample around
    each call). With ``mc_samples=K`` a step averages ``K`` samples: enter the block ``K``
    times before ``step()`` (the closure is called ``K`` times). Gradient clipping
    (``clip_grad_norm_``) goes inside the block, after ``backward()``: the sample's
    gradient is read when the block ends. The loss is the plain average loss of the
    batch; the KL term is implicit in ``ess`` and ``weight_decay``.

    After training the parameters hold the posterior means; :meth:`posterior_std` gives
    the standard deviations and :func:`torchbayes.optim.ivon_to_bnn` turns the pair into
    a Bayesian model that `torchbayes.predict` samples. To sample without converting:
    ``with optimizer.sampled_params(): model(x)``.

    Args:
        params: the parameters, or parameter groups (dicts overriding any of the
            hyperparameters below except ``mc_samples`` and ``sync``). All tensors of a
            group must share one device and dtype.
        lr: learning rate, >= 0 (IVON's are large: 0.1-0.5 for classification nets,
            because the step is divided by ``h + delta``; see ``rescale_lr``).
        ess: effective sample size ``lambda``, > 0: usually the training set's size.
            The posterior variance is ``1 / (ess * (h + delta))``.
        hess_init: initial Hessian ``h`` of every weight, > 0: it sets the initial
            posterior standard deviation ``1 / sqrt(ess * (hess_init + delta))``.
        beta1: momentum of the gradient, in [0, 1).
        beta2: momentum of the Hessian, in [0, 1] (IVON uses ``1 - 1e-5``).
        weight_decay: ``delta``, the prior precision per example (prior
            ``N(0, 1 / (ess * delta))``), >= 0.
        mc_samples: weight samples averaged per step, >= 1.
        clip_radius: the update ``(momentum / debias + delta * m) / (h + delta)`` is
            clipped elementwise to ``[-clip_radius, clip_radius]`` (> 0; ``inf``: none).
        rescale_lr: multiply ``lr`` by ``hess_init + weight_decay`` (as ivon-opt does),
            so that the first steps have the size of an SGD step of ``lr``.
        debias: divide the momentum by ``1 - beta1 ** step`` (Adam's bias correction).
        sync: with ``torch.distributed`` initialised, average the gradients and the
            Hessian estimates of all ranks in ``step()`` (each rank draws its own sample:
            call `torchbayes.seed_per_rank`). Use it with a replicated model that is not
            wrapped in ``DistributedDataParallel``, or run the backward under DDP's
            ``no_sync()``: DDP's own averaging of the gradients would mix the ranks'
            gradients before each is paired with its rank's noise.
        keep_noise_buffer: keep the parameter-sized buffer of the weight draw between
            steps (``True``: no allocation per step, about 10 ms on a ResNet-18 on a
            CPU) or free it after each ``step()`` (``False``: the optimizer then holds
            only its two state buffers between steps).

    State (per parameter, in ``state_dict``):
        ``momentum`` and ``precision`` (``h + weight_decay``), two parameter-sized
        tensors, as Adam's ``exp_avg`` and ``exp_avg_sq``.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = IVON(model.parameters(), lr=0.1, ess=1000)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> with opt.sampled_params(train=True):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        clip_radius: float = math.inf,
        rescale_lr: bool = True,
        debias: bool = True,
        sync: bool = False,
        keep_noise_buffer: bool = True,
    ) -> None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"IVON: mc_samples must be an int >= 1, got {mc_samples!r}")
        for name, flag in (
            ("rescale_lr", rescale_lr),
            ("debias", debias),
            ("sync", sync),
            ("keep_noise_buffer", keep_noise_buffer),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"IVON: {name} must be a bool, got {type(flag).__name__}")
        defaults = {
            "lr": lr,
            "ess": ess,
            "hess_init": hess_init,
            "beta1": beta1,
            "beta2": beta2,
            "weight_decay": weight_decay,
            "clip_radius": clip_radius,
        }
        self._check_hyperparameters(defaults)
        self.mc_samples = mc_samples
        self.rescale_lr = rescale_lr
        self.debias = debias
        self.sync = sync
        self.keep_noise_buffer = keep_noise_buffer
        # The current step's weight draws (one flat buffer per group, viewed per parameter)
        # and, with several samples, the running sums of noise * gradient.
        self._noise: list[Tensor | None] = []
        self._sums: list[list[Tensor] | None] = []
        self._samples = 0
        self._inside = False
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        group["lr"] = _check("lr", group["lr"], low=0.0, low_ok=True)
        group["ess"] = _check("ess", group["ess"], low=0.0, low_ok=False)
        group["hess_init"] = _check("hess_init", group["hess_init"], low=0.0, low_ok=False)
        group["beta1"] = _check("beta1", group["beta1"], low=0.0, low_ok=True, high=1.0, high_ok=False)
        group["beta2"] = _check("beta2", group["beta2"], low=0.0, low_ok=True, high=1.0)
        group["weight_decay"] = _check("weight_decay", group["weight_decay"], low=0.0, low_ok=True)
        group["clip_radius"] = _check("clip_radius", group["clip_radius"], low=0.0, low_ok=False)
        if not math.isfinite(group["ess"]) or not math.isfinite(group["hess_init"]):
            raise ValueError("IVON: ess and hess_init must be finite")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (hyperparameters not given take the defaults)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_hyperparameters(group)
        params = group["params"]
        if not params:
            raise ValueError("IVON: a parameter group has no parameters")
        kinds = {(p.device, p.dtype) for p in params}
        if len(kinds) > 1:
            raise ValueError(
                f"IVON: the parameters of a group must share one device and dtype, got {sorted(map(str, kinds))}"
            )
        if not params[0].dtype.is_floating_point:
            raise ValueError(f"IVON: parameters must be floating point, got {params[0].dtype}")
        group.setdefault("step", 0)
        # The weight decay folded into the stored precision (h + weight_decay): a later
        # change of group["weight_decay"] (a scheduler) is applied to it in _precisions.
        group.setdefault("precision_weight_decay", group["weight_decay"])
        self._noise.append(None)
        self._sums.append(None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_noise", [None] * len(self.param_groups))
        self.__dict__.setdefault("_sums", [None] * len(self.param_groups))
        self.__dict__.setdefault("_samples", 0)
        self.__dict__.setdefault("_inside", False)

    def _state(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's momentum and precision tensors, created on first use."""
        momenta, precisions = [], []
        for p in group["params"]:
            state = self.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # in the weight decay already folded in (a changed one is applied below)
                state["precision"] = torch.full_like(
                    p, group["hess_init"] + group["precision_weight_decay"], memory_format=torch.preserve_format
                )
            momenta.append(state["momentum"])
            precisions.append(state["precision"])
        if group["weight_decay"] != group["precision_weight_decay"]:
            torch._foreach_add_(precisions, group["weight_decay"] - group["precision_weight_decay"])
            group["precision_weight_decay"] = group["weight_decay"]
        return momenta, precisions

    # ------------------------------------------------------------------ sampling
    @contextlib.contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Put one posterior sample ``m + sigma * eps`` into the parameters for the block.

        On leaving the block the parameters hold the means again. With ``train=True`` the
        sample's gradient (``p.grad``, read when the block ends) is collected for the next
        ``step()``; parameters without a gradient count as having a zero one. If the block
        raises, the sample is discarded and the means restored.

        Args:
            train: collect the gradient for ``step()`` (``False``: only sample, e.g. to
                predict with ``S`` samples by entering the block ``S`` times).

        Returns:
            A context manager.

        Example:
            >>> with opt.sampled_params(train=True):
            ...     opt.zero_grad()
            ...     loss_fn(model(x), y).backward()
            >>> opt.step()
        """
        if self._inside:
            raise RuntimeError("IVON.sampled_params: already inside a sampled_params block")
        if train and self._samples >= self.mc_samples:
            raise RuntimeError(
                f"IVON.sampled_params: {self.mc_samples} training sample(s) taken since the last step() "
                "(mc_samples); call step() first"
            )
        draws = self._draw()
        self._inside = True
        try:
            yield
        except BaseException:
            self._restore(draws)
            raise
        finally:
            self._inside = False
        self._restore(draws)
        if train:
            self._collect(draws)

    @torch.no_grad()
    def _draw(self) -> list[list[Tensor]]:
        """Add ``sigma * eps`` to every parameter; return the per-parameter ``eps / sqrt(precision)``."""
        draws = []
        for i, group in enumerate(self.param_groups):
            params: list[Tensor] = group["params"]
            _, precisions = self._state(group)
            numel = sum(p.numel() for p in params)
            flat = self._noise[i]
            if flat is None or flat.numel() != numel or self._sums[i] is not None:
                # a new buffer when the kept one holds the pending noise * gradient
                flat = torch.empty(numel, device=params[0].device, dtype=params[0].dtype)
                if self.keep_noise_buffer and self._sums[i] is None:
                    self._noise[i] = flat
            noise.normal_(flat)  # one (parallel) draw for the whole group
            views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]
            scratch = self._scratch(params)
            for view, precision in zip(views, precisions):
                view.mul_(torch.rsqrt(precision, out=scratch[: view.numel()].view_as(view)))
            # p += eps / sqrt(ess * precision)
            torch._foreach_add_(params, views, alpha=group["ess"] ** -0.5)
            draws.append(views)
        return draws

    @torch.no_grad()
    def _restore(self, draws: list[list[Tensor]]) -> None:
        for group, views in zip(self.param_groups, draws):
            torch._foreach_sub_(group["params"], views, alpha=group["ess"] ** -0.5)

    @torch.no_grad()
    def _collect(self, draws: list[list[Tensor]]) -> None:
        """Fold the sample's gradient into the momentum and keep ``noise * gradient``."""
        first = self._samples == 0
        self._samples += 1
        for i, (group, views) in enumerate(zip(self.param_groups, draws)):
            params = group["params"]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            momenta, _ = self._state(group)
            weight = 1.0 - group["beta1"]
            if self.mc_samples == 1:
                torch._foreach_lerp_(momenta, grads, weight)
            else:
                if first:
                    torch._foreach_mul_(momenta, group["beta1"])
                torch._foreach_add_(momenta, grads, alpha=weight / self.mc_samples)
            sums = self._sums[i]
            if sums is None:
                torch._foreach_mul_(views, grads)  # the draw's buffer becomes the sum
                self._sums[i] = views
            else:
                torch._foreach_addcmul_(sums, views, grads)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Update the posterior from the samples taken since the last step.

        Args:
            closure: optional; zeroes the gradients, computes the loss, calls
                ``backward()`` and returns the loss. It is called ``mc_samples`` times,
                each inside a `sampled_params` block the optimizer opens.

        Returns:
            The closure's loss averaged over the samples, or ``None`` without a closure.
        """
        loss: Tensor | None = None
        if closure is not None:
            if self._samples:
                raise RuntimeError("IVON.step: samples were already taken with sampled_params; call step() alone")
            total: Tensor | None = None
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    value = closure()
                total = value.detach() if total is None else total + value.detach()
            assert total is not None
            loss = total / self.mc_samples
        if self._samples != self.mc_samples:
            raise RuntimeError(
                f"IVON.step: {self._samples} training sample(s) taken, mc_samples={self.mc_samples}: "
                "run the forward and backward inside `with optimizer.sampled_params(train=True):` first"
            )
        distributed = self.sync and dist.is_available() and dist.is_initialized()
        for i, group in enumerate(self.param_groups):
            noise_grads = self._sums[i]
            assert noise_grads is not None
            self._update(group, noise_grads, distributed)
        self._sums = [None] * len(self.param_groups)
        self._samples = 0
        return loss

    def _update(self, group: dict[str, Any], noise_grads: list[Tensor], distributed: bool) -> None:
        params: list[Tensor] = group["params"]
        momenta, precisions = self._state(group)
        if distributed:
            _average(momenta)  # each rank folded its own gradient into the common momentum
            _average(noise_grads)
        group["step"] += 1
        ess, wd, beta2 = group["ess"], group["weight_decay"], group["beta2"]
        scratch = self._scratch(params)
        # noise_grads holds sum_k eps_k * g_k / sqrt(precision); the Hessian estimate is
        # f = ess * precision * mean_k(noise_k * g_k) = (sqrt(ess) / K) * precision * noise_grads,
        # and with d = h - f the Riemannian-corrected average is
        # h' = h - (1 - beta2) * d + (1 - beta2)^2 / 2 * d^2 / precision.
        scale = -math.sqrt(ess) / self.mc_samples
        correction = 0.5 * (1.0 - beta2) ** 2
        for d, precision in zip(noise_grads, precisions):
            torch.addcmul(precision, precision, d, value=scale, out=d)  # d = precision - f
            if wd:
                d.sub_(wd)  # d = h - f
            r = scratch[: d.numel()].view_as(d)
            torch.addcdiv(_constant(-(1.0 - beta2), d), d, precision, value=correction, out=r)
            precision.addcmul_(d, r)  # h' + wd = precision + d * (correction * d / precision - (1 - beta2))
        debias = 1.0 - group["beta1"] ** group["step"] if self.debias else 1.0
        lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
        # m' = m - lr * clip((momentum / debias + wd * m) / precision), with the debiasing
        # folded into the scalars: numerator = momentum + wd * debias * m.
        numerators = momenta
        if wd:
            numerators = noise_grads  # free now: reused for the numerator
            for out, momentum, p in zip(noise_grads, momenta, params):
                torch.add(momentum, p, alpha=wd * debias, out=out)
        if math.isinf(group["clip_radius"]):
            torch._foreach_addcdiv_(params, numerators, precisions, value=-lr / debias)
        else:
            bound = group["clip_radius"] * debias
            for p, numerator, precision in zip(params, numerators, precisions):
                u = scratch[: p.numel()].view_as(p)
                torch.div(numerator, precision, out=u).clamp_(-bound, bound)
                p.add_(u, alpha=-lr / debias)

    # ------------------------------------------------------------------ the posterior
    def _scratch(self, params: list[Tensor]) -> Tensor:
        """A buffer the size of the group's largest tensor (for per-tensor temporaries)."""
        size = max(p.numel() for p in params)
        key = (params[0].device, params[0].dtype)
        scratch = self.__dict__.setdefault("_scratch_buffers", {}).get(key)
        if scratch is None or scratch.numel() < size:
            scratch = torch.empty(size, device=params[0].device, dtype=params[0].dtype)
            self.__dict__["_scratch_buffers"][key] = scratch
        return scratch

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("IVON: the tensor is not one of this optimizer's parameters")

    @torch.no_grad()
    def hessian(self, param: Tensor) -> Tensor:
        """The Hessian estimate ``h`` of one parameter (a new tensor of its shape)."""
        group = self._group_of(param)
        _, precisions = self._state(group)
        index = next(i for i, p in enumerate(group["params"]) if p is param)
        return precisions[index] - group["weight_decay"]

    @torch.no_grad()
    def posterior_std(self, param: Tensor) -> Tensor:
        """The posterior standard deviation ``1 / sqrt(ess * (h + weight_decay))`` of one parameter."""
        group = self._group_of(param)
        _, precisions = self._state(group)
        index = next(i for i, p in enumerate(group["params"]) if p is param)
        return torch.rsqrt(precisions[index] * group["ess"])

    @torch.no_grad()
    def set_posterior_std(self, param: Tensor, std: Tensor) -> None:
        """Set ``h`` so that the posterior standard deviation of ``param`` is ``std``.

        ``h = 1 / (ess * std^2) - weight_decay``; a ``std`` larger than the prior's
        ``1 / sqrt(ess * weight_decay)`` cannot be expressed with ``h >= 0``, so ``h`` is
        floored at ``1e-8`` (the standard deviation then is the prior's).

        Args:
            param: one of the optimizer's parameters.
            std: positive finite standard deviations, broadcastable to ``param``.
        """
        group = self._group_of(param)
        std = torch.as_tensor(std, dtype=param.dtype, device=param.device)
        if not bool(torch.isfinite(std).all()) or bool((std <= 0).any()):
            raise ValueError("IVON.set_posterior_std: std must be positive and finite")
        _, precisions = self._state(group)
        index = next(i for i, p in enumerate(group["params"]) if p is param)
        wd = group["weight_decay"]
        precision = (1.0 / (group["ess"] * std.square())).clamp_min(wd + 1e-8)
        precisions[index].copy_(precision.expand_as(param))


def _constant(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor (broadcast by torch's pointwise ops) on ``like``'s device and dtype."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _average(tensors: list[Tensor]) -> None:
    """All-reduce ``tensors`` in place to their mean over the ranks."""
    world = dist.get_world_size()
    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    for work in works:
        assert work is not None
        work.wait()
    torch._foreach_div_(tensors, float(world))
