"""BiSeNet face parsing: the network of the common ``79999_iter.pth`` checkpoint (19 CelebAMask-HQ classes).

The design follows "BiSeNet: Bilateral Segmentation Network for Real-time Semantic Segmentation" (Yu et al.,
2018) as trained for faces by zllrunning/face-parsing.PyTorch:

* the **context path** (``cp``) is a ResNet-18 (``cp.resnet``) giving features at /8, /16 and /32 of the
  input; a global average of the /32 map (``conv_avg``) and two **attention refinement modules**
  (``arm32``, ``arm16``: a 3×3 conv, then a channel gate from the globally pooled features) refine the /32
  and /16 maps, which are upsampled (nearest) and smoothed (``conv_head32``, ``conv_head16``) on the way
  down to /16 and /8;
* the **spatial path** of the paper is not a separate branch in this checkpoint: the ResNet's /8 features
  play its part (so there are no ``sp.*`` keys);
* the **feature fusion module** (``ffm``) concatenates the spatial (/8 ResNet) and context (/8) features,
  mixes them with a 1×1 conv and re-weights channels with a squeeze-and-excitation style gate;
* three **output heads** predict class logits: ``conv_out`` from the fused features (the prediction) and
  ``conv_out16`` / ``conv_out32`` from the context features (auxiliary training heads), all upsampled
  bilinearly (``align_corners=True``) to the input size.

The module's state dict has exactly the keys and shapes of that checkpoint, in the same order. Every
convolution is bias-free and followed by batch norm, except the 1×1 convs inside the gates and heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 19

CELEBAMASK_HQ_LABELS: tuple[str, ...] = (
    "background",  # 0
    "skin",  # 1
    "l_brow",  # 2
    "r_brow",  # 3
    "l_eye",  # 4
    "r_eye",  # 5
    "eye_g",  # 6  eyeglasses
    "l_ear",  # 7
    "r_ear",  # 8
    "ear_r",  # 9  earrings
    "nose",  # 10
    "mouth",  # 11 inner mouth
    "u_lip",  # 12
    "l_lip",  # 13
    "neck",  # 14
    "neck_l",  # 15 necklace
    "cloth",  # 16
    "hair",  # 17
    "hat",  # 18
)
"""The class of each output channel, in the CelebAMask-HQ label order the checkpoint was trained with."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 512  # the checkpoint was trained on 512² CelebAMask-HQ crops


class ConvBNReLU(nn.Module):
    """A bias-free convolution, batch norm and ReLU (``conv``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(bn(conv(x)))."""
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """A ResNet basic block: two 3×3 convs with a shortcut (a strided 1×1 conv when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return relu(shortcut(x) + residual(x))."""
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two basic blocks; the first one changes the width and applies the stride."""
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1))


class ResNet18(nn.Module):
    """The ResNet-18 trunk without its classifier; returns the /8, /16 and /32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (features /8 [N,128], /16 [N,256], /32 [N,512]) of images [N, 3, H, W]."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # [N, 64, H/4, W/4]
        x = self.layer1(x)  # [N, 64, H/4, W/4]
        feat8 = self.layer2(x)  # [N, 128, H/8, W/8]
        feat16 = self.layer3(feat8)  # [N, 256, H/16, W/16]
        feat32 = self.layer4(feat16)  # [N, 512, H/32, W/32]
        return feat8, feat16, feat32


class AttentionRefinement(nn.Module):
    """A 3×3 conv whose output channels are gated by a sigmoid of their global average."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the refined features [N, out, H, W]."""
        features = self.conv(x)  # [N, C, H, W]
        pooled = F.adaptive_avg_pool2d(features, 1)  # [N, C, 1, 1]
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(pooled)))  # [N, C, 1, 1]
        return features * gate


class ContextPath(nn.Module):
    """ResNet-18 plus global context and attention refinement, brought down to /8 and /16."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (ResNet /8 features [N,128], context at /8 [N,128], context at /16 [N,128])."""
        feat8, feat16, feat32 = self.resnet(x)
        global_context = self.conv_avg(F.adaptive_avg_pool2d(feat32, 1))  # [N, 128, 1, 1]

        context32 = self.arm32(feat32) + global_context  # [N, 128, H/32, W/32] (broadcast = nearest upsample)
        context32 = F.interpolate(context32, size=feat16.shape[2:], mode="nearest")  # [N, 128, H/16, W/16]
        context32 = self.conv_head32(context32)

        context16 = self.arm16(feat16) + context32  # [N, 128, H/16, W/16]
        context16 = F.interpolate(context16, size=feat8.shape[2:], mode="nearest")  # [N, 128, H/8, W/8]
        context16 = self.conv_head16(context16)
        return feat8, context16, context32


class FeatureFusion(nn.Module):
    """Fuse spatial and context features: a 1×1 conv, then ``x + x * gate(x)`` with a bottleneck gate."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, 1)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Return the fused features [N, out, H, W] of two maps of the same size."""
        features = self.convblk(torch.cat([spatial, context], dim=1))  # [N, C, H, W]
        pooled = F.adaptive_avg_pool2d(features, 1)  # [N, C, 1, 1]
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(pooled))))  # [N, C, 1, 1]
        return features + features * gate


class OutputHead(nn.Module):
    """A 3×3 ConvBNReLU then a 1×1 conv to class logits."""

    def __init__(self, in_channels: int, mid_channels: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels, 3)
        self.conv_out = nn.Conv2d(mid_channels, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, n_classes, H, W] at the resolution of ``x``."""
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parsing with the key layout of the ``79999_iter.pth`` checkpoint."""

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        assert n_classes >= 1, n_classes
        self.n_classes = n_classes
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, n_classes)
        self.conv_out16 = OutputHead(128, 64, n_classes)
        self.conv_out32 = OutputHead(128, 64, n_classes)

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (fused /8 [N,256], context /8 [N,128], context /16 [N,128]) of images [N, 3, H, W]."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(images.shape)}"
        spatial, context8, context16 = self.cp(images)
        fused = self.ffm(spatial, context8)  # [N, 256, H/8, W/8]
        return fused, context8, context16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return the class logits [N, n_classes, H, W] of images [N, 3, H, W] (see :func:`normalize`)."""
        fused, _, _ = self._features(images)
        return _upsample(self.conv_out(fused), images)

    def forward_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (logits, auxiliary logits from /8 context, from /16 context), each [N, n_classes, H, W]."""
        fused, context8, context16 = self._features(images)
        return (
            _upsample(self.conv_out(fused), images),
            _upsample(self.conv_out16(context8), images),
            _upsample(self.conv_out32(context16), images),
        )


def _upsample(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Resize logits [N, K, h, w] bilinearly (corners aligned, as trained) to the size of ``images``."""
    return F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=True)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map RGB images [N, 3, H, W] in [0, 1] to the ImageNet-normalised input BiSeNet expects."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
