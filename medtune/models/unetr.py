"""The decoder half of MONAI's SwinUNETR over a ``swinunetr`` backbone, 2D or 3D.

MONAI's SwinUNETR is its Swin encoder (``swinViT``, medtune's ``swinunetr`` backbone)
plus UNETR blocks that read the input image and the encoder's five stages. The blocks
keep MONAI's names, so their state-dict keys are MONAI's too (``fs`` = feature size,
strides relative to the input, ``stages[i]`` has ``fs * 2**i`` channels at stride
``2**(i+1)``):

    ========== =================================== ============ ======
    block      reads                               channels     stride
    ========== =================================== ============ ======
    encoder1   the input image                     M -> fs      1
    encoder2   stages[0]                           fs           2
    encoder3   stages[1]                           2fs          4
    encoder4   stages[2]                           4fs          8
    encoder10  stages[4]                           16fs         32
    decoder5   encoder10, stages[3]                16fs -> 8fs  16
    decoder4   decoder5, encoder4                  8fs -> 4fs   8
    decoder3   decoder4, encoder3                  4fs -> 2fs   4
    decoder2   decoder3, encoder2                  2fs -> fs    2
    decoder1   decoder2, encoder1                  fs -> fs     1
    out        decoder1 (1x1 conv)                 fs -> K      1
    ========== =================================== ============ ======

:class:`UnetrTrunk` holds ``encoder1``-``encoder4``, ``encoder10``, ``decoder5`` and
``decoder4``: the part the official FreMAE (FreMIM) network pretrains together with the
encoder. :class:`UnetrDecoder` (decoder ``"unetr"`` of segmentation) is the whole
path, so a segmenter loads every trunk tensor of a FreMAE run and trains
``decoder3``-``decoder1`` and ``out`` from scratch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medtune.errors import ConfigError


def check_swinunetr_stages(in_channels: Sequence[int], in_strides: Sequence[int], what: str) -> int:
    """The feature size of a ``swinunetr`` backbone's stages; a :class:`ConfigError` for others."""
    channels, strides = tuple(in_channels), tuple(in_strides)
    feature_size = channels[0] if channels else 0
    if channels != tuple(feature_size * 2**i for i in range(5)) or strides != tuple(2 ** (i + 1) for i in range(5)):
        raise ConfigError(
            f"{what} needs a swinunetr backbone (five stages of feature_size * 1..16 channels at "
            f"strides 2..32, patch_size 2); got channels {channels}, strides {strides}"
        )
    return feature_size


class UnetrTrunk(nn.Module):
    """``encoder1``-``encoder4``, ``encoder10``, ``decoder5``, ``decoder4`` of MONAI's SwinUNETR.

    Args:
        image_channels: ``M``, channels of the input image (``encoder1`` reads it).
        feature_size: ``fs``, the backbone's first-stage channels.
        spatial_dims: 2 or 3.
        norm_name: normalisation of the blocks (MONAI's SwinUNETR default: instance).

    ``forward_trunk(image, stages)`` -> ``[enc0, enc1, enc2, enc3, dec2]``: ``(B, fs, *S)``,
    ``(B, fs, *S/2)``, ``(B, 2fs, *S/4)``, ``(B, 4fs, *S/8)``, ``(B, 4fs, *S/8)``.
    """

    def __init__(self, image_channels: int, feature_size: int, spatial_dims: int, norm_name: str = "instance") -> None:
        super().__init__()
        from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock

        fs = feature_size

        def basic(cin: int, cout: int) -> nn.Module:
            return UnetrBasicBlock(spatial_dims, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        def up(cin: int, cout: int) -> nn.Module:
            return UnetrUpBlock(
                spatial_dims, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True
            )

        self.spatial_dims = spatial_dims
        self.feature_size = fs
        self.encoder1 = basic(image_channels, fs)
        self.encoder2 = basic(fs, fs)
        self.encoder3 = basic(2 * fs, 2 * fs)
        self.encoder4 = basic(4 * fs, 4 * fs)
        self.encoder10 = basic(16 * fs, 16 * fs)
        self.decoder5 = up(16 * fs, 8 * fs)
        self.decoder4 = up(8 * fs, 4 * fs)

    def forward_trunk(self, image: torch.Tensor, stages: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The trunk's maps, shallow to deep (see the class docstring)."""
        enc0 = self.encoder1(image)  # (B, fs, *S)
        enc1 = self.encoder2(stages[0])  # (B, fs, *S/2)
        enc2 = self.encoder3(stages[1])  # (B, 2fs, *S/4)
        enc3 = self.encoder4(stages[2])  # (B, 4fs, *S/8)
        dec4 = self.encoder10(stages[4])  # (B, 16fs, *S/32)
        dec3 = self.decoder5(dec4, stages[3])  # (B, 8fs, *S/16)
        dec2 = self.decoder4(dec3, enc3)  # (B, 4fs, *S/8)
        return [enc0, enc1, enc2, enc3, dec2]


class UnetrDecoder(UnetrTrunk):
    """MONAI SwinUNETR's whole decoder: the trunk, ``decoder3``-``decoder1`` and ``out``.

    ``forward(features, out_size, image)``: ``features`` the backbone's five stages,
    ``image`` ``(B, M, *S)`` the backbone's input -> logits ``(B, K, *S)``.
    """

    takes_image = True  # the segmenter passes the input image (encoder1 reads it)
    takes_pretrained_blocks = True  # a FreMAE run's UNETR blocks load into it
    head_modules = ("out",)  # what forward_head adds to forward_decoder

    def __init__(
        self, image_channels: int, feature_size: int, num_classes: int, spatial_dims: int, norm_name: str = "instance"
    ) -> None:
        super().__init__(image_channels, feature_size, spatial_dims, norm_name)
        from monai.networks.blocks import UnetOutBlock, UnetrUpBlock

        fs = feature_size

        def up(cin: int, cout: int) -> nn.Module:
            return UnetrUpBlock(
                spatial_dims, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True
            )

        self.decoder3 = up(4 * fs, 2 * fs)
        self.decoder2 = up(2 * fs, fs)
        self.decoder1 = up(fs, fs)
        self.out = UnetOutBlock(spatial_dims, fs, num_classes)

    @property
    def embedding_channels(self) -> int:
        return self.out.conv.conv.in_channels  # feature_size

    def forward_decoder(self, features: Sequence[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        """The last map before the classifier, ``(B, feature_size, *S)``."""
        if image is None:
            raise ConfigError("the unetr decoder reads the input image: call it as decoder(features, size, image)")
        enc0, enc1, enc2, _, dec2 = self.forward_trunk(image, features)
        dec1 = self.decoder3(dec2, enc2)  # (B, 2fs, *S/4)
        dec0 = self.decoder2(dec1, enc1)  # (B, fs, *S/2)
        return self.decoder1(dec0, enc0)  # (B, fs, *S)

    def forward_head(self, decoded: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        if tuple(decoded.shape[2:]) != tuple(out_size):
            raise ConfigError(f"unetr decoder: image size {tuple(decoded.shape[2:])} differs from {tuple(out_size)}")
        return self.out(decoded)  # (B, K, *S)

    def forward(
        self, features: Sequence[torch.Tensor], out_size: Sequence[int], image: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.forward_head(self.forward_decoder(features, image), out_size)


def build_unetr_decoder(
    in_channels: Sequence[int],
    in_strides: Sequence[int],
    num_classes: int,
    spatial_dims: int = 2,
    *,
    image_channels: int,
    norm_name: str = "instance",
) -> UnetrDecoder:
    """Decoder ``"unetr"``: MONAI SwinUNETR's decoder over a ``swinunetr`` backbone."""
    feature_size = check_swinunetr_stages(in_channels, in_strides, "decoder 'unetr'")
    return UnetrDecoder(image_channels, feature_size, num_classes, spatial_dims, norm_name)


build_unetr_decoder.takes_image = True  # type: ignore[attr-defined]  # create_decoder passes image_channels

__all__ = ["UnetrTrunk", "UnetrDecoder", "build_unetr_decoder", "check_swinunetr_stages"]
