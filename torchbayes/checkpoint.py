"""Safe checkpoints of Bayesian models that can rebuild the model from its base architecture.

A checkpoint is one file written by :func:`torch.save` holding ONLY tensors and plain
Python values (dicts, lists, strings, numbers), and it is always read back with
``torch.load(..., weights_only=True)``: loading never runs arbitrary pickled code, and a
file carrying any other object is refused with a :class:`CheckpointError`.

Why ``torch.save`` + ``weights_only`` rather than safetensors: it needs no dependency
beyond torch (safetensors would be one more), it stores the nested settings
(conversion arguments, per-layer estimators and priors) natively instead of as JSON
strings, and PyTorch's restricted unpickler gives the same guarantee that no code runs.
Neither format checks the integrity of the tensor bytes, so a SHA-256 digest of every
tensor is stored too and verified before the model is touched.

Besides ``model.state_dict()`` (posterior means and scales, prior buffers such as
MOPED's per-weight means) the file records what ``state_dict`` does not hold: the
class, estimator and prior hyperparameters of every Bayesian layer, and the arguments
given to :func:`torchbayes.conversion.dnn_to_bnn`, so :func:`rebuild` can recreate the
Bayesian model from the original deterministic architecture.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from torchbayes.conversion import ConversionReport, conversion_history
from torchbayes.nn.base import BayesianModule, canonical_estimator, iter_bayesian_modules
from torchbayes.priors import GaussianPrior, Prior, check_prior_sigma

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "rebuild",
]

#: Version of the file layout written by :func:`save_checkpoint`; readers refuse newer ones.
CHECKPOINT_FORMAT_VERSION = 1
_FORMAT_NAME = "torchbayes.checkpoint"
_PLAIN_SCALARS = (type(None), bool, int, float, str)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, unsafe or does not fit the model."""


# ------------------------------------------------------------------------------ writing
def _check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of tensors and plain values only (what weights_only loads)."""
    if isinstance(value, (*_PLAIN_SCALARS, Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(key).__name__}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} must contain only tensors, None, bool, int, float, str, lists, "
        f"tuples and dicts (so it loads with weights_only=True), got {type(value).__name__}"
    )


def _tensor_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prior_settings(prior: nn.Module) -> dict[str, Any]:
    # Plain attributes only: tensor hyperparameters (GaussianPrior's mu, sigma) are
    # buffers, already in state_dict. ``training`` is nn.Module bookkeeping, not a setting.
    hyper = {
        k: v
        for k, v in vars(prior).items()
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))
    }
    return {"class": type(prior).__name__, "hyperparameters": hyper}


def _layer_settings(module: BayesianModule) -> dict[str, Any]:
    return {
        "class": type(module).__name__,
        "estimator": module.estimator,
        "priors": {name: _prior_settings(prior) for name, _, _, prior in module.variational_parameters()},
    }


# Wrapper class name -> attribute holding the user's model. Matched by name so that
# torch._dynamo need not be imported here.
_WRAPPERS = {"OptimizedModule": "_orig_mod", "DistributedDataParallel": "module", "DataParallel": "module"}


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / DataParallel / torch.compile wrappers.

    Their state_dict keys carry a ``module.`` or ``_orig_mod.`` prefix; saving the inner
    model makes a checkpoint written on rank 0 of a DDP job load into a plain model anywhere.
    """
    while type(model).__name__ in _WRAPPERS and isinstance(
        getattr(model, _WRAPPERS[type(model).__name__], None), nn.Module
    ):
        model = getattr(model, _WRAPPERS[type(model).__name__])
    return model


class _RecordingWriter:
    """The file object given to ``torch.save``: writes through and keeps the first
    exception a write raised (OSError, KeyboardInterrupt...)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model``'s weights and Bayesian settings to ``path`` (atomically).

    Args:
        model: any module (a Bayesian model, or a plain one: then only weights are saved);
            DistributedDataParallel and ``torch.compile`` wrappers are unwrapped. The
            conversions :func:`~torchbayes.conversion.dnn_to_bnn` applied to it (its
            :func:`~torchbayes.conversion.conversion_history`) are stored for :func:`rebuild`.
        path: destination file; it is replaced only once the new file is fully written,
            so a failed save leaves an existing checkpoint intact. A symlink is written
            through (its target is replaced; the link stays).
        extra: anything else to keep (epoch, metrics, an optimizer's ``state_dict()``);
            tensors and plain values only.

    Raises:
        TypeError: ``model`` is not a module, or ``extra`` holds objects that could not
            be loaded safely (nothing is written then).

    Example:
        >>> bnn = dnn_to_bnn(resnet18(), {"prior_mu": 0.0, "prior_sigma": 0.1, ...})
        >>> save_checkpoint(bnn, "model.pt", extra={"epoch": 10})
        >>> bnn2 = rebuild("model.pt", resnet18())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        _check_plain(extra, "extra")
    model = _unwrap(model)
    # state_dict() keeps storage sharing; clone views so only each tensor's own bytes are saved.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torchbayes import __version__

    payload = {
        "format": _FORMAT_NAME,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "torchbayes_version": __version__,
        "state_dict": state,
        "sha256": _tensor_digest(state),
        "layers": {name: _layer_settings(m) for name, m in iter_bayesian_modules(model)},
        "conversions": [report.to_dict() for report in conversion_history(model)],
        "extra": None if extra is None else dict(extra),
    }
    # A symlink is written through: the link stays and the file it points to is replaced.
    path = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(payload, writer)  # type: ignore[arg-type]  # a file object: write + flush
            except RuntimeError:
                # torch's C++ writer replaces an error of our write() (a full disk, Ctrl-C)
                # by "unexpected pos"; raise the real one.
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint without touching any model.

    Args:
        path: a file written by :func:`save_checkpoint`.

    Returns:
        The checkpoint as a dict with keys ``"state_dict"``, ``"layers"``,
        ``"conversions"``, ``"extra"``, ``"format_version"``, ``"torchbayes_version"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or corrupted (unreadable archive or digest
            mismatch), holds objects other than tensors and plain values (refused, never
            unpickled), is not a torchbayes checkpoint, or has a newer format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(
            f"{path!r} is not a readable checkpoint (truncated or corrupted file, or not one written by torch.save)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path!r} holds objects other than tensors and plain values ({_unpickler_reason(exc)}); "
            "refusing to unpickle them, as torchbayes only loads checkpoints with weights_only=True"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, io.UnsupportedOperation) as exc:
        raise CheckpointError(
            f"{path!r} is not a readable checkpoint (truncated or corrupted file?): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT_NAME:
        raise CheckpointError(
            f"{path!r} is not a torchbayes checkpoint (written by save_checkpoint); "
            "for a plain state_dict use model.load_state_dict(torch.load(path, "
            "weights_only=True))"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint format version {version!r}; this torchbayes "
            f"reads versions <= {CHECKPOINT_FORMAT_VERSION} (upgrade torchbayes)"
        )
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r}: the state_dict entry is missing or malformed")
    layers = payload.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("class"), str)
        and isinstance(v.get("priors"), dict)
        and all(isinstance(p, dict) and isinstance(p.get("hyperparameters"), dict) for p in v["priors"].values())
        for v in layers.values()
    ):
        raise CheckpointError(f"{path!r}: the layers entry is missing or malformed")
    if _tensor_digest(state) != payload.get("sha256"):
        raise CheckpointError(
            f"{path!r} is corrupted: its tensors do not match the SHA-256 digest stored when it was saved"
        )
    return payload


def _check_prior_settings(prior: nn.Module, saved: Mapping[str, Any], where: str) -> None:
    """Raise CheckpointError unless ``saved`` prior hyperparameters are ones ``prior`` has, of the
    same types, with values its constructor accepts (they are set with ``setattr`` on load)."""
    current = _prior_settings(prior)["hyperparameters"]
    for key, value in saved.items():
        if key not in current:
            raise CheckpointError(f"{where}: unknown setting {str(key)[:50]!r} (known: {sorted(current)})")
        expected = type(current[key])
        if not (type(value) is expected or (expected is float and type(value) is int)):
            raise CheckpointError(f"{where}: setting {key!r} must be a {expected.__name__}, got {type(value).__name__}")
    try:
        type(prior)(**{**current, **saved})
    except TypeError:  # a prior class whose constructor does not take its attributes: types checked only
        pass
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _unpickler_reason(exc: BaseException) -> str:
    """The one-line reason in torch's long weights_only error (without its advice to load unsafely)."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global| Please use|\n|$)", str(exc), re.S)
    reason = match.group(1) if match else "unsupported content"
    return " ".join(reason.split())[:200]


def _validate_against(model: nn.Module, payload: dict[str, Any], path: str) -> None:
    """Raise CheckpointError unless the checkpoint fits ``model`` exactly; changes nothing."""
    # Layer and prior classes first: the most telling message when architectures differ.
    modules = dict(model.named_modules())
    for name, saved in payload.get("layers", {}).items():
        module = modules.get(name)
        if module is None or type(module).__name__ != saved["class"]:
            found = "nothing" if module is None else type(module).__name__
            raise CheckpointError(
                f"{path!r} does not fit the model: layer {name!r} is a "
                f"{saved['class']} in the checkpoint but {found} in the model"
            )
        try:
            canonical_estimator(saved["estimator"])
        except ValueError as exc:
            raise CheckpointError(f"{path!r}: layer {name!r}: {exc}") from None
        for pname, prior in saved["priors"].items():
            have = type(getattr(module, f"{pname}_prior")).__name__
            if have != prior["class"]:
                raise CheckpointError(
                    f"{path!r} does not fit the model: {name}.{pname}_prior is a "
                    f"{prior['class']} in the checkpoint but {have} in the model"
                )
            _check_prior_settings(
                getattr(module, f"{pname}_prior"), prior["hyperparameters"], f"{path!r}: {name}.{pname}_prior"
            )
    state = payload["state_dict"]
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise CheckpointError(
            f"{path!r} does not fit the model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}"
        )
    priors = {id(p) for _, m in iter_bayesian_modules(model) for *_, p in m.variational_parameters()}
    adopts_shape = {
        f"{prefix}.{buf}"
        for prefix, mod in model.named_modules()
        if id(mod) in priors
        for buf, _ in mod.named_buffers(recurse=False)
    }
    gaussian_priors = {
        f"{prefix}." for prefix, mod in model.named_modules() if id(mod) in priors and isinstance(mod, GaussianPrior)
    }
    for key, tensor in state.items():
        prefix, _, buffer = key.rpartition(".")
        if prefix + "." in gaussian_priors and buffer in ("mu", "sigma"):
            try:  # read from the file, so checked as the constructor checks its arguments
                if buffer == "sigma":
                    check_prior_sigma(tensor, f"{key} (a prior sigma)")
                elif not bool(torch.isfinite(tensor).all()):
                    raise ValueError(f"{key} (a prior mean) must be finite, got non-finite values")
            except ValueError as exc:
                raise CheckpointError(f"{path!r}: {exc}") from None
        # Prior buffers may legitimately change shape (scalar -> per-weight MOPED prior).
        if tensor.shape != current[key].shape and key not in adopts_shape:
            raise CheckpointError(
                f"{path!r} does not fit the model: {key!r} has shape "
                f"{tuple(tensor.shape)} in the checkpoint, {tuple(current[key].shape)} in the model"
            )


def _apply(model: nn.Module, payload: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    model.load_state_dict(payload["state_dict"], strict=True)
    for name, saved in payload.get("layers", {}).items():
        module = modules[name]
        module.estimator = saved["estimator"]
        for pname, prior in saved["priors"].items():
            for attr, value in prior["hyperparameters"].items():
                setattr(getattr(module, f"{pname}_prior"), attr, value)


def _snapshot(
    model: nn.Module,
) -> tuple[dict[str, Tensor], list[tuple[BayesianModule, str]], list[tuple[Prior, dict[str, Any]]]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = [m for _, m in iter_bayesian_modules(model)]
    priors = [(p, _prior_settings(p)["hyperparameters"]) for m in modules for *_, p in m.variational_parameters()]
    return state, [(m, m.estimator) for m in modules], priors


def _restore(model: nn.Module, snapshot: tuple[Any, Any, Any]) -> None:
    state, estimators, priors = snapshot
    model.load_state_dict(state)
    for module, estimator in estimators:
        module.estimator = estimator
    for prior, hyper in priors:
        for attr, value in hyper.items():
            setattr(prior, attr, value)


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module) -> dict[str, Any]:
    """Load a checkpoint into an existing model of the same architecture.

    Restores the weights (``strict``: every key must match) and each Bayesian layer's
    estimator and prior hyperparameters. The file is read and verified in full, and its
    keys, shapes and layer classes checked against ``model``, before anything is copied:
    on any error ``model`` is left exactly as it was.

    Args:
        path: a file written by :func:`save_checkpoint` (on any rank or device; tensors
            are loaded to the CPU, then copied into the model's own devices).
        model: the module to load into (DDP and ``torch.compile`` wrappers are unwrapped).

    Returns:
        The checkpoint's ``extra`` dict (empty if none was saved).

    Raises:
        CheckpointError: see :func:`read_checkpoint`, or the checkpoint does not fit ``model``.

    Example:
        >>> extra = load_checkpoint("model.pt", bnn)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    payload = read_checkpoint(path)
    _validate_against(model, payload, os.fspath(path))
    # Validation makes a failure here unlikely; restore the snapshot if it happens anyway.
    snapshot = _snapshot(model)
    try:
        _apply(model, payload)
    except Exception as exc:
        _restore(model, snapshot)
        raise CheckpointError(f"loading {os.fspath(path)!r} failed; the model was restored: {exc}") from exc
    return payload["extra"] or {}


def rebuild(path: str | os.PathLike[str], base_model: nn.Module) -> nn.Module:
    """Recreate a Bayesian model from its deterministic architecture and a checkpoint.

    Replays, on a copy of ``base_model``, every :func:`~torchbayes.conversion.dnn_to_bnn`
    call recorded in the checkpoint (same settings, same layers), then loads the weights,
    estimators and priors as :func:`load_checkpoint` does. ``base_model`` is never modified.

    Args:
        path: a checkpoint of a model made Bayesian with ``dnn_to_bnn``.
        base_model: a freshly built instance of the deterministic architecture that was
            converted (its weights do not matter: all are overwritten).

    Returns:
        The Bayesian model.

    Raises:
        CheckpointError: the checkpoint is invalid, records no conversion, or does not
            fit the converted architecture.

    Example:
        >>> bnn = rebuild("model.pt", torchvision.models.resnet18(num_classes=10))
    """
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"rebuild: base_model must be an nn.Module, got {type(base_model).__name__}")
    payload = read_checkpoint(path)
    reports = payload.get("conversions") or []
    if not reports:
        raise CheckpointError(
            f"{os.fspath(path)!r} records no dnn_to_bnn conversion; build the "
            "Bayesian model yourself and use load_checkpoint"
        )
    model = copy.deepcopy(base_model)
    try:
        for report in reports:
            model = ConversionReport.from_dict(report).reapply(model)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{os.fspath(path)!r}: replaying its conversion on {type(base_model).__name__} failed: {exc}"
        ) from exc
    _validate_against(model, payload, os.fspath(path))
    _apply(model, payload)
    return model
