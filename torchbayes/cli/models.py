"""Architectures the command-line tool can train, by name.

``mlp`` and ``lenet`` are the reference's MNIST examples, sized from the input shape;
any other name is looked up among torchvision's classification models (built with
``weights=None``) and adapted to the data: its first convolution takes the data's
channels and inputs smaller than 32 pixels are upsampled to 32 first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BUILTIN_MODELS", "build_model", "LeNet5"]

#: Architectures defined here; any torchvision classification model name works too.
BUILTIN_MODELS: tuple[str, ...] = ("mlp", "lenet")

#: Smallest side torchvision's ImageNet architectures are fed (smaller inputs are upsampled).
_TORCHVISION_MIN_SIDE = 32


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) for ``(C, H, W)`` inputs, with ReLU and max pooling.

    The second convolution is padded when the input is too small for the classic
    layout (e.g. 8x8 digits), so any input of side >= 4 works.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: number of outputs (logits).
        dropout: probability of the ``nn.Dropout`` before each fully connected layer
            but the first (0: none, the classic network; MC dropout's architecture otherwise).

    Shape:
        - Input: ``(B, C, H, W)``. Output: ``(B, num_classes)``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        channels, height, width = input_shape
        if min(height, width) < 4:  # two 2x2 poolings after padded 5x5 convolutions
            raise ValueError(f"lenet needs images of at least 4x4 pixels, got {height}x{width}")
        pad2 = 2 if min(height, width) // 2 < 12 else 0  # keep >= 1 pixel after pooling
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.device("meta"):  # size of the flattened features, without computing anything
            flat = self.features(torch.empty(1, *input_shape)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120),
            nn.ReLU(),
            *_dropout(dropout),
            nn.Linear(120, 84),
            nn.ReLU(),
            *_dropout(dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _dropout(p: float) -> list[nn.Module]:
    # No module at all for p = 0, so the classic networks keep their state_dict keys.
    return [nn.Dropout(p)] if p > 0 else []


def _mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (400, 400), dropout: float = 0.0
) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), *_dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    channels, height, width = input_shape
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != channels:

        def pair(size: tuple[int, ...]) -> tuple[int, int]:  # Conv2d stores its sizes as 2-tuples
            return size[0], size[1]

        padding = first_conv.padding if isinstance(first_conv.padding, str) else pair(first_conv.padding)
        _replace_module(
            model,
            first_conv,
            nn.Conv2d(
                channels,
                first_conv.out_channels,
                pair(first_conv.kernel_size),
                stride=pair(first_conv.stride),
                padding=padding,
                dilation=pair(first_conv.dilation),
                groups=1,
                bias=first_conv.bias is not None,
                padding_mode=first_conv.padding_mode,
            ),
        )
    if min(height, width) < _TORCHVISION_MIN_SIDE:
        model = nn.Sequential(nn.Upsample(size=(_TORCHVISION_MIN_SIDE,) * 2, mode="bilinear"), model)
    return model


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)
                return


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, dropout: float = 0.0, hidden: tuple[int, ...] = ()
) -> nn.Module:
    """A deterministic classifier ``name`` for inputs of ``input_shape``.

    Args:
        name: ``"mlp"`` (784-400-400-10 for MNIST: two hidden layers of 400), ``"lenet"``
            (:class:`LeNet5`), or any torchvision classification model name
            (``"resnet18"``, ``"mobilenet_v3_small"``, ...), built without pretrained weights.
        input_shape: ``(C, H, W)`` of one input, or ``(D,)`` (a table's columns) for ``mlp``.
        num_classes: number of classes (logits).
        dropout: for ``mlp`` and ``lenet``, the probability of an ``nn.Dropout`` before
            each fully connected layer after the first (MC dropout's architecture; 0:
            none). torchvision models keep their own dropout (if any) and ignore it.
        hidden: for ``mlp``, the hidden widths (empty: 400, 400).

    Returns:
        An ``nn.Module`` mapping ``(B, C, H, W)`` to ``(B, num_classes)`` logits. It is
        checked with a forward pass of two inputs in train and eval mode.

    Raises:
        ValueError: unknown name, or an architecture that cannot take such inputs.

    Example:
        >>> model = build_model("resnet18", (1, 28, 28), 10)
    """
    if len(input_shape) != 3 and not (name == "mlp" and len(input_shape) == 1):
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if name == "mlp":
        model = _mlp(input_shape, num_classes, hidden or (400, 400), dropout=dropout)
    elif name == "lenet":
        model = LeNet5(input_shape, num_classes, dropout)
    else:
        try:
            names = _torchvision_names()
        except ImportError as e:
            raise ValueError(
                f"model must be one of {BUILTIN_MODELS}, got {name!r} "
                "(torchvision models need: pip install 'torchbayes[vision]')"
            ) from e
        if name not in names:
            raise ValueError(
                f"model must be one of {BUILTIN_MODELS} or a torchvision classification "
                f"model such as resnet18, got {name!r}"
            )
        model = _torchvision(name, input_shape, num_classes)
    _check_runs(model, name, input_shape, num_classes)
    return model


def _check_runs(model: nn.Module, name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    was_training = model.training
    try:
        for training in (True, False):
            model.train(training)
            try:
                with torch.no_grad():
                    out = model(torch.rand(2, *input_shape))
            except Exception as e:  # torchvision models fail in many ways on unsuited inputs
                raise ValueError(f"model {name!r} cannot take inputs of shape {tuple(input_shape)}: {e}") from e
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                raise ValueError(
                    f"model {name!r} does not return (batch, {num_classes}) logits "
                    f"for inputs of shape {tuple(input_shape)}"
                )
    finally:
        model.train(was_training)
