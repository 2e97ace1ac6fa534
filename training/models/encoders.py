"""3D image encoders that turn a volume into tokens, built from MONAI networks.

Every encoder wraps exactly the MONAI sub-module a downstream model uses (``UNETR.vit``,
``SwinUNETR.swinViT``, a feature-only ``ResNet``), so the pretrained weights load with
``strict=True`` into that model; see ``training/export.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import ResNet, ViT
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn


@dataclass
class ViTConfig:
    """MONAI ViT as UNETR builds its ``vit`` (UNETR fixes patch 16 and 12 layers)."""

    img_size: int = 128
    in_channels: int = 1
    patch_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    proj_type: str = "conv"
    qkv_bias: bool = False
    dropout_rate: float = 0.0


@dataclass
class SwinConfig:
    """MONAI SwinTransformer as SwinUNETR builds its ``swinViT``."""

    img_size: int = 128
    in_channels: int = 1
    feature_size: int = 48
    patch_size: int = 2
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dropout_path_rate: float = 0.0
    use_v2: bool = False
    use_checkpoint: bool = False


@dataclass
class CNNConfig:
    """A feature-only MONAI ResNet (ResNet-10 layout by default, no avgpool/fc head)."""

    img_size: int = 128
    in_channels: int = 1
    block: str = "basic"
    layers: tuple[int, ...] = (1, 1, 1, 1)
    block_inplanes: tuple[int, ...] = (64, 128, 256, 512)
    conv1_t_size: int = 7
    conv1_t_stride: int = 2


EncoderConfig = ViTConfig | SwinConfig | CNNConfig


class Encoder3D(nn.Module):
    """Base class: ``forward(x: (B, in_channels, D, H, W)) -> tokens (B, N, C)``.

    Subclasses set ``out_dim`` (C), ``num_tokens`` (N for a cubic ``img_size`` input) and
    ``monai_module`` (the sub-module whose state dict is exported).
    """

    out_dim: int
    num_tokens: int
    config: Any

    @property
    def monai_module(self) -> nn.Module:
        raise NotImplementedError

    def monai_target(self) -> dict[str, Any]:
        """How to rebuild the exported module in MONAI: class path, kwargs, attribute."""
        raise NotImplementedError


class ViTEncoder(Encoder3D):
    """Tokens are the final (layer-normed) ViT patch tokens; N = (img/patch)^3, C = hidden."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.vit = ViT(
            in_channels=config.in_channels,
            img_size=(config.img_size,) * 3,
            patch_size=(config.patch_size,) * 3,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            proj_type=config.proj_type,
            classification=False,
            dropout_rate=config.dropout_rate,
            spatial_dims=3,
            qkv_bias=config.qkv_bias,
        )
        self.out_dim = config.hidden_size
        self.num_tokens = (config.img_size // config.patch_size) ** 3

    @property
    def monai_module(self) -> nn.Module:
        return self.vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(x)
        return tokens

    def monai_target(self) -> dict[str, Any]:
        c = self.config
        # UNETR hard-codes patch 16 and 12 layers; any other ViT is exported as a bare ViT.
        if c.patch_size == 16 and c.num_layers == 12:
            kwargs = dict(
                in_channels=c.in_channels, out_channels=1, img_size=[c.img_size] * 3,
                hidden_size=c.hidden_size, mlp_dim=c.mlp_dim, num_heads=c.num_heads,
                proj_type=c.proj_type, qkv_bias=c.qkv_bias, spatial_dims=3,
            )
            return {"class": "monai.networks.nets.UNETR", "kwargs": kwargs, "attribute": "vit"}
        kwargs = dict(
            in_channels=c.in_channels, img_size=[c.img_size] * 3, patch_size=[c.patch_size] * 3,
            hidden_size=c.hidden_size, mlp_dim=c.mlp_dim, num_layers=c.num_layers,
            num_heads=c.num_heads, proj_type=c.proj_type, classification=False,
            spatial_dims=3, qkv_bias=c.qkv_bias,
        )
        return {"class": "monai.networks.nets.ViT", "kwargs": kwargs, "attribute": None}


class SwinEncoder(Encoder3D):
    """Tokens are the last stage's normalised feature map flattened.

    N = (img / (patch * 16))^3 (4^3 = 64 at 128^3), C = 16 * feature_size (768 for 48).
    """

    def __init__(self, config: SwinConfig):
        super().__init__()
        if config.feature_size % 12 != 0:
            raise ValueError("SwinUNETR needs feature_size divisible by 12")
        if config.img_size % (config.patch_size**5) != 0:
            raise ValueError(f"img_size must be divisible by patch_size**5 = {config.patch_size**5}")
        self.config = config
        self.swinViT = SwinTransformer(
            in_chans=config.in_channels,
            embed_dim=config.feature_size,
            window_size=(config.window_size,) * 3,
            patch_size=(config.patch_size,) * 3,
            depths=tuple(config.depths),
            num_heads=tuple(config.num_heads),
            mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias,
            drop_rate=config.drop_rate,
            attn_drop_rate=config.attn_drop_rate,
            drop_path_rate=config.dropout_path_rate,
            use_checkpoint=config.use_checkpoint,
            spatial_dims=3,
            use_v2=config.use_v2,
        )
        self.out_dim = 16 * config.feature_size
        self.num_tokens = (config.img_size // (config.patch_size * 16)) ** 3

    @property
    def monai_module(self) -> nn.Module:
        return self.swinViT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize=True is what SwinUNETR passes, so downstream sees the same features.
        last = self.swinViT(x, True)[-1]
        return last.flatten(2).transpose(1, 2)

    def monai_target(self) -> dict[str, Any]:
        c = self.config
        kwargs = dict(
            in_channels=c.in_channels, out_channels=1, patch_size=c.patch_size,
            depths=list(c.depths), num_heads=list(c.num_heads), window_size=c.window_size,
            qkv_bias=c.qkv_bias, mlp_ratio=c.mlp_ratio, feature_size=c.feature_size,
            spatial_dims=3, use_v2=c.use_v2,
        )
        return {"class": "monai.networks.nets.SwinUNETR", "kwargs": kwargs, "attribute": "swinViT"}


def _halve(n: int, stride: int) -> int:
    # Odd kernel, padding k // 2: out = ceil(n / stride).
    return math.ceil(n / stride)


class CNNEncoder(Encoder3D):
    """Last ResNet stage flattened; N = (img / (conv1_stride * 16))^3, C = last width * expansion."""

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        self.resnet = ResNet(**self._kwargs())
        expansion = 1 if config.block == "basic" else 4
        self.out_dim = config.block_inplanes[-1] * expansion
        side = _halve(config.img_size, config.conv1_t_stride)
        for _ in range(4):  # maxpool, layer2, layer3, layer4
            side = _halve(side, 2)
        self.num_tokens = side**3

    def _kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(
            block=c.block, layers=list(c.layers), block_inplanes=list(c.block_inplanes),
            spatial_dims=3, n_input_channels=c.in_channels, conv1_t_size=c.conv1_t_size,
            conv1_t_stride=c.conv1_t_stride, feed_forward=False,
        )

    @property
    def monai_module(self) -> nn.Module:
        return self.resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.act(r.bn1(r.conv1(x)))
        if not r.no_max_pool:
            x = r.maxpool(x)
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return x.flatten(2).transpose(1, 2)

    def monai_target(self) -> dict[str, Any]:
        return {"class": "monai.networks.nets.ResNet", "kwargs": self._kwargs(), "attribute": None}


_REGISTRY: dict[str, tuple[type, type[Encoder3D]]] = {
    "vit": (ViTConfig, ViTEncoder),
    "swin": (SwinConfig, SwinEncoder),
    "cnn": (CNNConfig, CNNEncoder),
}

ENCODERS = tuple(_REGISTRY)


def encoder_config(name: str, img_size: int = 128, in_channels: int = 1, **kwargs: Any) -> EncoderConfig:
    """The config dataclass for encoder ``name``; unknown kwargs raise TypeError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; choose from {ENCODERS}")
    return _REGISTRY[name][0](img_size=img_size, in_channels=in_channels, **kwargs)


def build_encoder(name: str, img_size: int = 128, in_channels: int = 1, **kwargs: Any) -> Encoder3D:
    """Build encoder ``name`` ("vit" | "swin" | "cnn"); kwargs override its config fields."""
    return build_encoder_from_config(encoder_config(name, img_size, in_channels, **kwargs))


def build_encoder_from_config(config: EncoderConfig) -> Encoder3D:
    """Build an encoder from one of the config dataclasses."""
    for cfg_cls, enc_cls in _REGISTRY.values():
        if type(config) is cfg_cls:
            return enc_cls(config)
    raise TypeError(f"not an encoder config: {type(config).__name__}")


def encoder_name(config: EncoderConfig) -> str:
    """Registry name of a config dataclass."""
    for name, (cfg_cls, _) in _REGISTRY.items():
        if type(config) is cfg_cls:
            return name
    raise TypeError(f"not an encoder config: {type(config).__name__}")
