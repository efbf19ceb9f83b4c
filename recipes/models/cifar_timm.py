"""The paper's small-image CNNs as timm models, registered in timm's model registry.

Importing this module registers six architectures, so ``timm.create_model(name, num_classes=...,
in_chans=..., width=...)`` builds them like any other timm model:

============== ===================================================================================
name           architecture (Zhou et al. 2023, Section 4.1)
============== ===================================================================================
cifar_resnet18 timm ``ResNet`` (BasicBlock, [2, 2, 2, 2]) with a 3x3 stride-1 stem and no max-pool
cifar_resnet34 the same with [3, 4, 6, 3] blocks
cifar_vgg16    timm ``VGG`` with BatchNorm, a single linear classifier (no 4096-wide MLP)
cifar_vgg19    the same with the 19-layer configuration
wrn16_8        WideResNet-16-8 (Zagoruyko & Komodakis 2016), pre-activation blocks
wrn28_6        WideResNet-28-6
============== ===================================================================================

``width`` multiplies every channel count (paper's ablation: 0.5, 1, 1.5 of the 512-channel last
stage); counts are rounded to a multiple of 8 (``timm.layers.make_divisible``). The ImageNet
stems of timm's ``resnet18``/``vgg16`` shrink a 32-pixel image to 8 pixels before the first
block; these stems keep full resolution, as the CIFAR models of the authors' code do.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import ClassifierHead, make_divisible
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vgg import VGG
from timm.models.vgg import cfgs as VGG_CFGS
from torch import nn

__all__ = ["CifarResNet", "CifarVGG", "WideResNet", "wrn_blocks_per_stage", "wrn_widths",
           "PAPER_MODELS"]

#: Paper model name -> registered timm name (what ``--model`` resolves to in the recipe).
PAPER_MODELS = {
    "resnet18": "cifar_resnet18", "resnet34": "cifar_resnet34",
    "vgg16": "cifar_vgg16", "vgg19": "cifar_vgg19",
    "wrn16_8": "wrn16_8", "wrn28_6": "wrn28_6",
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No weights exist for these models; the cfg documents the expected input (CIFAR statistics).
    return {"url": "", "num_classes": 100, "input_size": (3, 32, 32), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5071, 0.4865, 0.4409),
            "std": (0.2673, 0.2564, 0.2762), "first_conv": "conv1", "classifier": "fc", **kwargs}


# Read by timm's @register_model at decoration time, so it must precede the entrypoints.
default_cfgs = {
    "cifar_resnet18": _cfg(), "cifar_resnet34": _cfg(),
    "cifar_vgg16": _cfg(first_conv="features.0", classifier="head.fc"),
    "cifar_vgg19": _cfg(first_conv="features.0", classifier="head.fc"),
    "wrn16_8": _cfg(first_conv="stem", classifier="head.fc"),
    "wrn28_6": _cfg(first_conv="stem", classifier="head.fc"),
}


def _scale(channels: int, width: float) -> int:
    if width <= 0:
        raise ValueError(f"width must be > 0 (paper: 0.5, 1, 1.5), got {width}")
    return int(make_divisible(channels * width, 8))


class CifarResNet(ResNet):
    """timm ``ResNet`` for small images: 3x3 stride-1 stem conv, no max-pool.

    Args:
        block, layers: as ``timm.models.resnet.ResNet`` (``BasicBlock``, blocks per stage).
        width: channel multiplier; stage widths are ``make_divisible((64, 128, 256, 512) · width)``.
        zero_init_last: timm's zero init of each block's last BN; off by default because the
            authors' CIFAR ResNets use the plain PyTorch init.
        **kwargs: any other ``ResNet`` argument (``num_classes``, ``in_chans``, ``drop_rate``...).
    """

    def __init__(self, block: type[nn.Module] = BasicBlock, layers: tuple[int, ...] = (2, 2, 2, 2),
                 width: float = 1.0, zero_init_last: bool = False, **kwargs: Any) -> None:
        channels = tuple(_scale(c, width) for c in (64, 128, 256, 512))
        # timm only sizes the stem from stem_width for the 'deep' stem (width 2·stem_width);
        # it is replaced below by one 3x3 conv, which makes the stage-1 input exactly channels[0].
        super().__init__(block, layers, channels=channels, stem_type="deep",
                         stem_width=channels[0] // 2, zero_init_last=zero_init_last, **kwargs)
        self.conv1 = nn.Conv2d(self.in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # The stem no longer downsamples (x2) and there is no max-pool (x2).
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // (2 if info["module"] == "act1" else 4))


class CifarVGG(VGG):
    """timm ``VGG`` with BatchNorm and one ``Linear(C, num_classes)`` after global pooling.

    The max-pools use ``ceil_mode`` so a 28-pixel image (Fashion-MNIST) ends at 1x1 like a
    32-pixel one, instead of collapsing to zero size at the fifth pool.

    Args:
        cfg: timm VGG configuration (channel counts and ``'M'`` for max-pool).
        width: channel multiplier applied to every conv.
        **kwargs: other ``VGG`` arguments (``num_classes``, ``in_chans``, ``drop_rate``...).
    """

    def __init__(self, cfg: list[Any], width: float = 1.0, num_classes: int = 1000,
                 global_pool: str = "avg", drop_rate: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("norm_layer", nn.BatchNorm2d)
        cfg = [v if v == "M" else _scale(v, width) for v in cfg]
        # A tiny mlp_ratio keeps timm from allocating the 4096-wide ImageNet head replaced below.
        super().__init__(cfg, num_classes=num_classes, global_pool=global_pool,
                         drop_rate=drop_rate, mlp_ratio=1 / 4096, **kwargs)
        for index, layer in enumerate(self.features):
            if isinstance(layer, nn.MaxPool2d):
                self.features[index] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pre_logits = nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                   drop_rate=drop_rate)
        self.head_hidden_size = self.num_features
        self._initialize_weights()


def wrn_blocks_per_stage(depth: int) -> int:
    """Blocks per stage of WRN-depth: ``depth = 6n + 4`` (3 stages of n two-conv blocks)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 16, 28, 40), got {depth}")
    return (depth - 4) // 6


def wrn_widths(widen_factor: int, width: float = 1.0) -> tuple[int, int, int, int]:
    """Channels of WRN-d-k: stem 16, stages ``(16k, 32k, 64k)``, each times ``width``."""
    if widen_factor < 1:
        raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
    base = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    return tuple(_scale(c, width) for c in base)


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, 1x1 projection shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
                         if stride != 1 or in_chs != out_chs else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        # The projection sees the pre-activated input, as in the reference WRN.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-depth-k for small images, with timm's model interface.

    Args:
        depth: total depth ``6n + 4`` (16, 22, 28, 40...).
        widen_factor: k.
        width: extra channel multiplier (the recipe's ``--width``; 1 keeps WRN-d-k).
        num_classes, in_chans, global_pool, drop_rate: as for any timm model (``drop_rate`` is the
            dropout before the classifier).
        dropout: dropout inside each block (WRN paper: 0.3 on some data sets; default 0).
    """

    def __init__(self, depth: int = 16, widen_factor: int = 8, width: float = 1.0,
                 num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        n = wrn_blocks_per_stage(depth)
        widths = wrn_widths(widen_factor, width)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.feature_info = []
        in_chs = widths[0]
        for stage, (out_chs, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [WideBasic(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1,
                                dropout) for i in range(n)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": out_chs, "reduction": 2 ** (stage - 1),
                                      "module": f"layer{stage}"})
            in_chs = out_chs
        self.norm = nn.BatchNorm2d(in_chs)
        self.act = nn.ReLU(inplace=True)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _build(cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; create it with pretrained=False")
    return build_model_with_cfg(cls, variant, pretrained=False,
                                feature_cfg={"flatten_sequential": True}, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool)."""
    return _build(CifarResNet, "cifar_resnet18", pretrained, block=BasicBlock, layers=(2, 2, 2, 2),
                  **kwargs)


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-34 for 32x32 images (3x3 stem, no max-pool)."""
    return _build(CifarResNet, "cifar_resnet34", pretrained, block=BasicBlock, layers=(3, 4, 6, 3),
                  **kwargs)


@register_model
def cifar_vgg16(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-16 with BatchNorm and a single linear classifier."""
    return _build(CifarVGG, "cifar_vgg16", pretrained, cfg=VGG_CFGS["vgg16"], **kwargs)


@register_model
def cifar_vgg19(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-19 with BatchNorm and a single linear classifier."""
    return _build(CifarVGG, "cifar_vgg19", pretrained, cfg=VGG_CFGS["vgg19"], **kwargs)


@register_model
def wrn16_8(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-16-8 (paper: TinyImageNet)."""
    return _build(WideResNet, "wrn16_8", pretrained, depth=16, widen_factor=8, **kwargs)


@register_model
def wrn28_6(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-28-6 (paper: TinyImageNet)."""
    return _build(WideResNet, "wrn28_6", pretrained, depth=28, widen_factor=6, **kwargs)
