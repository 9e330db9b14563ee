"""BatchNorm folded into the convolution before it: the same inference with fewer layers.

In eval mode a BatchNorm is an affine map per channel, so when it directly follows a
convolution it can be merged into that convolution's weight and bias, and replaced by
``nn.Identity``. The model then computes the same maps (up to float32 rounding) with one
pass over each feature map less per folded pair: for cellkit's ResNet + DeepLabV3+ models,
every BatchNorm follows a convolution, so all of them go.

Which BatchNorm follows which convolution is read from the model's structure, not guessed
from names: ``torch.fx`` cannot trace these models (the input checks and the padding of
[`MultiDecoderModel`][cellkit.models.MultiDecoderModel] and the feature count check of the
decoder depend on the input), so [`fold_batchnorm`][] folds the pairs it knows to be
adjacent:

* in an ``nn.Sequential`` (one whose ``forward`` is ``nn.Sequential``'s own), a
  ``Conv2d`` child followed by a ``BatchNorm2d`` child (the decoder's conv-BN-ReLU blocks,
  the encoder's ``downsample`` branches);
* in the encoder's stem and residual blocks
  ([`ResNetEncoder`][cellkit.models.encoders.ResNetEncoder],
  [`BasicBlock`][cellkit.models.encoders.BasicBlock],
  [`Bottleneck`][cellkit.models.encoders.Bottleneck]), whose ``forward`` applies ``bnN``
  to ``convN``'s output and to nothing else;
* in any module whose class declares the pairs itself, as ``conv_bn_pairs = (("conv1",
  "bn1"), ...)``: a promise that its ``forward`` applies each BatchNorm directly to that
  convolution's output (the way for a plug-in encoder to be folded).

Anything else is left as it is; [`remaining_batchnorm`][] lists what is left.

Examples:
    >>> import cellkit
    >>> model = cellkit.build_model(cellkit.presets.ours(size="cpu"))
    >>> folded = fold_batchnorm(model)
    >>> remaining_batchnorm(folded), len(remaining_batchnorm(model)) > 0
    ([], True)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cellkit.models.encoders import BasicBlock, Bottleneck, ResNetEncoder

__all__ = ["fold_batchnorm", "remaining_batchnorm"]

# Classes whose forward applies each BatchNorm directly (and only) to the named conv's output.
_KNOWN_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    ResNetEncoder: (("conv1", "bn1"),),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}

_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm that follows a conv folded into it.

    For a convolution with weight ``w`` (``(out, in / groups, kh, kw)``) and bias ``b`` (0
    when it has none) followed by a BatchNorm with running mean ``mean``, running variance
    ``var``, ``eps``, scale ``g`` and shift ``beta`` (1 and 0 when not affine), eval mode
    computes ``g * (conv(x) - mean) / sqrt(var + eps) + beta``, which is a convolution
    with:

    ```text
    w' = w * g / sqrt(var + eps)              (per output channel)
    b' = (b - mean) * g / sqrt(var + eps) + beta
    ```

    The new weight and bias are computed in float64 and stored in the convolution's dtype
    (and memory format), and the BatchNorm becomes ``nn.Identity``. The copy is for
    inference: it has no BatchNorm left to train. A BatchNorm without running statistics
    (``track_running_stats=False``, which normalises with each batch's own) or whose
    channels differ from its convolution's is left as it is. See the module's docstring
    for how the pairs are found.

    Args:
        model: any ``nn.Module``; it is not modified (neither weights nor mode).

    Returns:
        The folded deep copy, in eval mode, on the model's device.

    Raises:
        TypeError: when ``model`` is not an ``nn.Module``.

    Examples:
        >>> conv_bn = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False),
        ...                         nn.BatchNorm2d(4), nn.ReLU())
        >>> folded = fold_batchnorm(conv_bn)
        >>> [type(m).__name__ for m in folded], folded[0].bias is not None
        (['Conv2d', 'Identity', 'ReLU'], True)
        >>> x = torch.randn(1, 3, 8, 8)
        >>> bool(torch.allclose(folded(x), conv_bn.eval()(x), atol=1e-6))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fold_batchnorm expects an nn.Module (a cellkit model), got {type(model).__name__}; "
            "pass fold_bn=False for a model that is not a torch module."
        )
    folded = copy.deepcopy(model).eval()
    done: set[int] = set()  # ids of the convs folded already (a module may be shared)
    for module in list(folded.modules()):
        for conv_name, bn_name in _pairs_of(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if id(conv) in done or not _fold_pair(conv, bn):
                continue
            done.add(id(conv))
            if isinstance(module, nn.Sequential):
                module[int(bn_name)] = nn.Identity()
            else:
                setattr(module, bn_name, nn.Identity())
    return folded


def remaining_batchnorm(model: nn.Module) -> list[str]:
    """The qualified names of the BatchNorm layers in ``model`` (those left after folding).

    Examples:
        >>> remaining_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        ['1']
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _pairs_of(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv attribute, batchnorm attribute)`` pairs that ``module``'s forward applies in a row."""
    cls = type(module)
    if isinstance(module, nn.Sequential):
        if cls.forward is not nn.Sequential.forward:
            return []  # a subclass with its own forward may not run its children in order
        names = list(module._modules)
        children = list(module._modules.values())
        return [
            (names[i], names[i + 1])
            for i in range(len(children) - 1)
            if isinstance(children[i], nn.Conv2d) and isinstance(children[i + 1], _BATCHNORMS)
        ]
    declared = getattr(cls, "conv_bn_pairs", None)
    if declared is None:
        known = (pairs for base, pairs in _KNOWN_PAIRS.items()
                 if isinstance(module, base) and cls.forward is base.forward)
        declared = next(known, ())
    return [
        (c, b)
        for c, b in declared
        if isinstance(getattr(module, c, None), nn.Conv2d)
        and isinstance(getattr(module, b, None), _BATCHNORMS)
    ]


def _fold_pair(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Fold ``bn`` into ``conv`` in place; False (and nothing changed) when it cannot be folded."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return False
    if bn.num_features != conv.out_channels:
        return False
    weight = conv.weight
    with torch.no_grad():
        # float64 on the CPU: exact enough, and on any device (some lack float64).
        w = weight.detach().cpu().double()
        b = torch.zeros(conv.out_channels, dtype=torch.float64)
        if conv.bias is not None:
            b = conv.bias.detach().cpu().double()
        mean, var = bn.running_mean.detach().cpu().double(), bn.running_var.detach().cpu().double()
        gamma = bn.weight.detach().cpu().double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.detach().cpu().double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        new_w = (w * scale.view(-1, *([1] * (w.ndim - 1)))).to(device=weight.device, dtype=weight.dtype)
        new_b = ((b - mean) * scale + beta).to(device=weight.device, dtype=weight.dtype)
        weight.copy_(new_w)  # in place: keeps the parameter, its memory format and its device
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b, requires_grad=weight.requires_grad)
        else:
            conv.bias.copy_(new_b)
    return True
