"""Image distances for inversion losses and evaluation that work offline: what each one measures, honestly.

All take model-side images ``[N, 3, H, W]`` in [-1, 1] and return one distance per image ``[N]`` (0 = equal);
all are differentiable with respect to both inputs and have no trainable parameters.

* :class:`LaplacianPyramidDistance` needs no weights at all. It compares the two images' Laplacian pyramids
  (band-pass detail at 5 scales) after dividing each band by its local amplitude, a simplified NLPD (Laparra
  et al., 2016). It measures differences of edges, local contrast and texture at several scales, is blind to
  brightness shifts inside a band, and knows nothing about faces: it is a *structural* distance, not a learned
  perceptual one. It is the default when nothing better is present.
* :class:`FeatureDistance` over a :class:`DiscriminatorFeatures` extractor: LPIPS-style distances (unit-normalised
  channels, squared differences, spatial mean, averaged over layers) between the multi-scale activations of a
  StyleGAN2 discriminator. With a *trained* face discriminator (our GAN checkpoint holds one, as do rosinality's
  ``.pt`` training checkpoints) these features respond to face structure the discriminator learned; it was trained
  to tell real from generated faces, not to match human similarity judgements, so it is uncalibrated. With a random
  discriminator it is a random-feature distance (still structural, not semantic).
* :class:`LpipsVgg`: LPIPS v0.1 with the VGG-16 trunk (Zhang et al., 2018), the learned perceptual metric the
  StyleGAN2 projector and PTI use; calibrated on human 2AFC judgements. Its weights (torchvision's ImageNet VGG-16
  and the LPIPS linear layers) are download-only: they are loaded from the weights cache when the user put them
  there, never fetched.
* :func:`psnr` and :func:`ms_ssim` are the evaluation metrics (higher is better), not losses.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fluidsrv.models.stylegan2 import Discriminator, DiscriminatorConfig

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG-16 (IMAGENET1K_V1)
LPIPS_VGG_FILE = "lpips_vgg_v0.1.pth"  # the LPIPS v0.1 linear layers for VGG (lpips/weights/v0.1/vgg.pth)
LPIPS_VGG_ALIASES = (LPIPS_VGG_FILE, "vgg.pth")  # the lpips package ships the file as vgg.pth
LPIPS_MAX_SIDE = 256  # LPIPS sees images area-downsampled to at most this side (as the StyleGAN2 projector does)
GAN_CHECKPOINT_FORMAT = "fluidsrv-gan-checkpoint"  # fluidsrv.training.gan's checkpoint files hold D as "D.*"

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik (2003)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


class PerceptualError(ValueError):
    """A perceptual-distance weights file is missing, unreadable or does not match the network."""


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.ndim == 4 and a.shape[1] == 3, f"images must be [N, 3, H, W], got {tuple(a.shape)}"
    assert a.shape[1:] == b.shape[1:] and b.shape[0] in (1, a.shape[0]), f"{tuple(a.shape)} vs {tuple(b.shape)}"


class ImageDistance(nn.Module):
    """Base of the distances: ``forward(a, b) -> [N]``; frozen (no gradients to its own tensors)."""

    name = "distance"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return the distance of each image of ``a`` [N, 3, H, W] to ``b`` (same shape or batch 1): [N]."""
        raise NotImplementedError

    def freeze(self) -> ImageDistance:
        """Turn off gradients of every parameter and switch to eval mode; return self."""
        self.requires_grad_(False)
        return self.eval()


# ---------------------------------------------------------------------------------------------------------------
# Laplacian pyramid (no weights)
# ---------------------------------------------------------------------------------------------------------------


def _binomial_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device, dtype=dtype) / 16.0  # [5]
    return (taps[:, None] * taps[None, :]).expand(3, 1, 5, 5)  # [3, 1, 5, 5], one filter per channel


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5×5 binomial low-pass of each channel, reflect-padded: [N, 3, H, W] -> same."""
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), _binomial_kernel(x.device, x.dtype), groups=3)


class LaplacianPyramidDistance(ImageDistance):
    """Weight-free multi-scale structural distance (simplified NLPD); see the module docstring for what it measures.

    Each band ``x − up(down(x))`` of each image is divided by ``sigma + local mean |band|`` (divisive
    normalisation, so a band counts by its relative, not absolute, contrast); the distance is the mean over bands
    of the RMS difference of the normalised bands, plus the RMS difference of the coarsest low-pass image.
    """

    name = "laplacian"

    def __init__(self, levels: int = 5, sigma: float = 0.05) -> None:
        super().__init__()
        assert levels >= 1 and sigma > 0
        self.levels = levels  # band-pass levels (fewer when the image is too small)
        self.sigma = sigma  # contrast floor of the divisive normalisation, in [-1, 1] units

    def _bands(self, x: torch.Tensor) -> list[torch.Tensor]:
        bands = []
        for _ in range(self.levels):
            if min(x.shape[-2:]) < 8:
                break
            low = _blur(x)[..., ::2, ::2]  # [N, 3, H/2, W/2]
            up = F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)  # [N, 3, H, W]
            band = x - up  # [N, 3, H, W]
            amplitude = _blur(band.abs())  # [N, 3, H, W] local mean absolute detail
            bands.append(band / (self.sigma + amplitude))
            x = low
        bands.append(x)  # the coarsest low-pass, compared as plain pixels
        return bands

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return the pyramid distance of each image of ``a`` to ``b``: [N]."""
        _check_pair(a, b)
        terms = [
            ((band_a - band_b).square().mean(dim=(1, 2, 3)) + 1e-12).sqrt()  # [N]
            for band_a, band_b in zip(self._bands(a), self._bands(b.expand_as(a)))
        ]
        return torch.stack(terms, dim=1).mean(dim=1)  # [N]


# ---------------------------------------------------------------------------------------------------------------
# LPIPS-style distances over feature maps
# ---------------------------------------------------------------------------------------------------------------


def unit_normalise_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each feature vector [N, C, H, W] by its L2 norm over channels (LPIPS's ``normalize_tensor``)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class FeatureDistance(ImageDistance):
    """LPIPS-style distance: Σ or mean over layers of spatial means of (weighted) squared unit-feature differences.

    ``layer_weights`` (one ``[1, C, 1, 1]`` non-negative tensor per layer, LPIPS's linear layers) weight each
    channel's squared difference and the layers are summed, as in LPIPS; without them every channel counts
    equally and layers are averaged.
    """

    def __init__(
        self,
        extractor: nn.Module,
        name: str,
        layer_weights: Sequence[torch.Tensor] | None = None,
        max_side: int | None = None,
    ) -> None:
        super().__init__()
        self.extractor = extractor  # a module whose forward returns a list of feature maps
        self.name = name
        self.max_side = max_side  # area-downsample larger inputs to this side first
        self.layer_weights = nn.ParameterList(
            [nn.Parameter(weight.detach().clone(), requires_grad=False) for weight in layer_weights or []]
        )
        self.freeze()

    def _resized(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_side is None or max(x.shape[-2:]) <= self.max_side:
            return x
        factor = max(x.shape[-2:]) // self.max_side
        return F.avg_pool2d(x, kernel_size=factor)  # [N, 3, H/f, W/f]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return the feature distance of each image of ``a`` to ``b``: [N]."""
        _check_pair(a, b)
        batch = a.shape[0]
        both = torch.cat([self._resized(a), self._resized(b)], dim=0)  # [N + M, 3, h, w]
        terms = []
        for index, features in enumerate(self.extractor(both)):
            feats_a, feats_b = features[:batch], features[batch:]  # [N, C, h, w], [M, C, h, w]
            difference = (unit_normalise_channels(feats_a) - unit_normalise_channels(feats_b)).square()
            if self.layer_weights:
                difference = (difference * self.layer_weights[index]).sum(dim=1)  # [N, h, w]
            else:
                difference = difference.sum(dim=1)  # [N, h, w]
            terms.append(difference.mean(dim=(1, 2)))  # [N]
        stacked = torch.stack(terms, dim=1)  # [N, layers]
        return stacked.sum(dim=1) if self.layer_weights else stacked.mean(dim=1)


class DiscriminatorFeatures(nn.Module):
    """The activations of a StyleGAN2 discriminator after fromRGB and after each of its first residual blocks."""

    def __init__(self, discriminator: Discriminator, num_blocks: int = 4) -> None:
        super().__init__()
        self.discriminator = discriminator.eval().requires_grad_(False)
        available = len(discriminator.convs) - 1
        self.num_blocks = min(num_blocks, available)  # deeper blocks encode "real vs fake", not image content

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return feature maps at resolutions R, R/2, ..., R/2^num_blocks for images [N, 3, H, W]."""
        resolution = self.discriminator.config.resolution
        if images.shape[-1] != resolution or images.shape[-2] != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
        features = []
        x = images  # [N, 3, R, R]
        for block in list(self.discriminator.convs)[: self.num_blocks + 1]:
            x = block(x)  # [N, C, R / 2^k, R / 2^k]
            features.append(x)
        return features


def discriminator_distance(discriminator: Discriminator, num_blocks: int = 4) -> FeatureDistance:
    """Return the LPIPS-style distance over ``discriminator``'s multi-scale features (see the module docstring)."""
    return FeatureDistance(DiscriminatorFeatures(discriminator, num_blocks), name="discriminator")


_RESBLOCK_CONV2 = re.compile(r"^convs\.(\d+)\.conv2\.1\.weight$")


def infer_discriminator_config(state: Mapping[str, torch.Tensor]) -> DiscriminatorConfig:
    """Infer a :class:`DiscriminatorConfig` from a rosinality discriminator state dict's shapes."""
    if "convs.0.0.weight" not in state:
        raise PerceptualError("not a StyleGAN2 discriminator state dict: no convs.0.0.weight")
    blocks = sorted(int(m.group(1)) for key in state if (m := _RESBLOCK_CONV2.match(key)))
    if blocks != list(range(1, len(blocks) + 1)) or not blocks:
        raise PerceptualError(f"residual blocks are not numbered 1..N: {blocks}")
    resolution = 2 ** (len(blocks) + 2)
    channels = {resolution: int(state["convs.0.0.weight"].shape[0])}
    for block in blocks:
        channels[resolution // 2**block] = int(state[f"convs.{block}.conv2.1.weight"].shape[0])
    return DiscriminatorConfig(resolution=resolution, channels=channels)


def load_discriminator(path: str | Path, device: str | torch.device = "cpu") -> Discriminator:
    """Load a discriminator from our GAN training checkpoint (``D.*``) or a rosinality ``.pt`` (its ``d``)."""
    from safetensors import safe_open

    from fluidsrv.weights import CheckpointError, _read_torch, _sniff_format, check_state_dict

    path = Path(path)
    try:
        kind = _sniff_format(path)
    except CheckpointError as error:
        raise PerceptualError(str(error)) from error
    if kind == "safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            if metadata.get("format") != GAN_CHECKPOINT_FORMAT:
                raise PerceptualError(f"{path}: not a GAN training checkpoint (format {metadata.get('format')!r})")
            state = {key[2:]: handle.get_tensor(key).float() for key in handle.keys() if key.startswith("D.")}  # noqa: SIM118
        config = DiscriminatorConfig.from_dict(json.loads(metadata["train_config"])["discriminator"])
    else:
        checkpoint = _read_torch(path)
        if not isinstance(checkpoint, dict) or "d" not in checkpoint:
            raise PerceptualError(f"{path}: no discriminator ('d') in this torch checkpoint")
        state = {key: value.float() for key, value in checkpoint["d"].items()}
        config = infer_discriminator_config(state)
    discriminator = Discriminator(config)
    try:
        check_state_dict(discriminator, state, f"{path} discriminator")
    except CheckpointError as error:
        raise PerceptualError(str(error)) from error
    discriminator.load_state_dict(state, strict=True)
    return discriminator.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# LPIPS-VGG (weights from the cache only)
# ---------------------------------------------------------------------------------------------------------------

VGG_TAPS = (3, 8, 15, 22, 29)  # indices in vgg16.features of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


VGG16_LAYOUT = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512)


def _vgg16_trunk() -> nn.Sequential:
    """VGG-16's conv trunk up to relu5_3, indexed as torchvision's ``vgg16().features`` (its state-dict keys)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "pool":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(item, int)
        layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        channels = item
    assert len(layers) == VGG_TAPS[-1] + 1
    return nn.Sequential(*layers)


class VggFeatures(nn.Module):
    """VGG-16's convolutional trunk up to relu5_3, returning the five LPIPS taps; inputs in [-1, 1]."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_trunk()
        # LPIPS v0.1's ScalingLayer: [-1, 1] inputs -> ImageNet-normalised
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))  # [1, 3, 1, 1]
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))  # [1, 3, 1, 1]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the five relu taps for images [N, 3, H, W] in [-1, 1]."""
        x = (images - self.shift) / self.scale  # [N, 3, H, W]
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG_TAPS:
                taps.append(x)
        return taps


class LpipsVgg(FeatureDistance):
    """LPIPS v0.1 (VGG-16 trunk): the human-calibrated perceptual distance; see the module docstring."""

    def __init__(self, vgg_state: Mapping[str, torch.Tensor], lin_state: Mapping[str, torch.Tensor]) -> None:
        extractor = VggFeatures()
        wanted = {f"features.{key}": value for key, value in extractor.features.state_dict().items()}
        missing = [key for key in wanted if key not in vgg_state]
        if missing:
            raise PerceptualError(f"the VGG-16 weights lack {missing[:4]} (expected torchvision's vgg16 state dict)")
        extractor.features.load_state_dict({key[len("features.") :]: vgg_state[key].float() for key in wanted})
        weights = []
        for index, channels in enumerate(LPIPS_CHANNELS):
            candidates = (f"lin{index}.model.1.weight", f"lin{index}.model.0.weight")  # with / without dropout
            key = next((k for k in candidates if k in lin_state), None)
            if key is None or tuple(lin_state[key].shape) != (1, channels, 1, 1):
                raise PerceptualError(f"the LPIPS weights lack lin{index}.model.1.weight [1, {channels}, 1, 1]")
            weights.append(lin_state[key].float().reshape(1, channels, 1, 1))
        super().__init__(extractor, name="lpips-vgg", layer_weights=weights, max_side=LPIPS_MAX_SIDE)

    @classmethod
    def from_files(cls, vgg_path: Path, lin_path: Path) -> LpipsVgg:
        """Load torchvision's ``vgg16-397923af.pth`` and LPIPS's ``vgg.pth`` with ``torch.load(weights_only=True)``."""
        states = []
        for path in (vgg_path, lin_path):
            try:
                states.append(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as error:  # unpickling / zip errors of a corrupt or unsafe file
                raise PerceptualError(f"{path}: cannot read it with torch.load(weights_only=True): {error}") from error
        return cls(states[0], states[1])


def lpips_files(cache_dir: Path) -> tuple[Path, Path] | None:
    """Return the (VGG-16, LPIPS linear layers) files in ``cache_dir`` when both are there, else None."""
    vgg = cache_dir / VGG16_FILE
    lins = [cache_dir / name for name in LPIPS_VGG_ALIASES if (cache_dir / name).is_file()]
    return (vgg, lins[0]) if vgg.is_file() and lins else None


def load_lpips(cache_dir: Path, device: str | torch.device = "cpu") -> LpipsVgg | None:
    """Return LPIPS-VGG from the weights cache, or None when its files are not there (never downloads)."""
    files = lpips_files(cache_dir)
    if files is None:
        return None
    return LpipsVgg.from_files(*files).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Picking the distance an inversion uses
# ---------------------------------------------------------------------------------------------------------------


class WeightedSum(ImageDistance):
    """Σ weight · distance over a few distances (e.g. the offline distance plus LPIPS when present)."""

    def __init__(self, terms: Sequence[tuple[float, ImageDistance]]) -> None:
        super().__init__()
        assert terms, "a weighted sum needs at least one term"
        self.weights = [float(weight) for weight, _ in terms]
        self.terms = nn.ModuleList([distance for _, distance in terms])
        self.name = " + ".join(f"{weight:g}·{distance.name}" for weight, distance in terms)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Return the weighted sum of the terms' distances: [N]."""
        total = self.weights[0] * self.terms[0](a, b)  # [N]
        for weight, distance in zip(self.weights[1:], list(self.terms)[1:]):
            total = total + weight * distance(a, b)
        return total


def offline_distance(discriminator: str | Path | None = None, device: str | torch.device = "cpu") -> ImageDistance:
    """Return the feature distance of the discriminator in ``discriminator`` (a checkpoint), else the pyramid."""
    if discriminator is not None:
        return discriminator_distance(load_discriminator(discriminator, device)).to(device)
    return LaplacianPyramidDistance().to(device)


def inversion_distance(
    cache_dir: Path | None = None,
    discriminator: str | Path | None = None,
    use_lpips: bool = True,
    lpips_weight: float = 1.0,
    device: str | torch.device = "cpu",
) -> ImageDistance:
    """Return the perceptual term of an inversion loss: the offline distance, plus LPIPS-VGG when it is cached.

    ``discriminator`` (a GAN checkpoint with D) picks the discriminator-feature distance over the weight-free
    pyramid; LPIPS is added (× ``lpips_weight``) when ``use_lpips`` and both its files are in ``cache_dir``.
    """
    offline = offline_distance(discriminator, device)
    lpips = load_lpips(cache_dir, device) if use_lpips and cache_dir is not None else None
    if lpips is None:
        return offline
    log.info("LPIPS-VGG found in %s: added to the inversion loss", cache_dir)
    return WeightedSum([(1.0, offline), (lpips_weight, lpips)]).to(device)


def finetune_distance(cache_dir: Path, device: str | torch.device = "cpu") -> ImageDistance:
    """Return the pivotal tuning's perceptual distance: LPIPS-VGG (as in PTI) when both its files are in
    ``cache_dir``, else the offline distance; an unreadable LPIPS file is logged and the offline one used."""
    try:
        lpips = load_lpips(cache_dir, device)
    except PerceptualError as error:
        log.warning("LPIPS-VGG in %s cannot be used (%s): fine-tuning with the offline distance", cache_dir, error)
        lpips = None
    if lpips is None:
        return offline_distance(device=device)
    log.info("LPIPS-VGG found in %s: the fine-tune's perceptual distance", cache_dir)
    return lpips.freeze()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation metrics (higher is better)
# ---------------------------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2): [N]."""
    _check_pair(a, b)
    mse = (a.float() - b.float()).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)  # [N]
    return 10.0 * torch.log10(4.0 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2  # [size]
    taps = torch.exp(-coords.square() / (2 * sigma**2))
    return (taps / taps.sum()).float()  # [size]


def _filter(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of each channel: [N, C, H, W] -> [N, C, H-k+1, W-k+1]."""
    channels, size = x.shape[1], taps.numel()
    x = F.conv2d(x, taps.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)


def ssim_components(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (SSIM, contrast-structure) per image [N], with a Gaussian ``window`` (valid filtering)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    taps = _gaussian_window(window, sigma, a.device)
    mu_a, mu_b = _filter(a, taps), _filter(b, taps)  # [N, 3, h, w]
    var_a = _filter(a * a, taps) - mu_a.square()
    var_b = _filter(b * b, taps) - mu_b.square()
    cov = _filter(a * b, taps) - mu_a * mu_b
    contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)  # [N, 3, h, w]
    luminance = (2 * mu_a * mu_b + c1) / (mu_a.square() + mu_b.square() + c1)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3)), contrast_structure.mean(dim=(1, 2, 3))


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al., 2003) of images in [-1, 1]: [N], 1 for identical images.

    Five scales with the standard weights, an 11-tap σ = 1.5 Gaussian and 2×2 average-pool downsampling. At scales
    smaller than the window (128² images reach 8² at the fifth scale) the window shrinks to the largest odd size
    that fits (same σ), so small faces can be scored; negative contrast-structure terms are clamped to 0 before
    the weighted geometric mean, as common implementations do.
    """
    _check_pair(a, b)
    a, b = a.float(), b.float().expand_as(a)
    assert min(a.shape[-2:]) >= 2 ** (len(MS_SSIM_WEIGHTS) - 1) * 3, f"images too small for MS-SSIM: {a.shape}"
    weights = torch.tensor(MS_SSIM_WEIGHTS, device=a.device)
    values = []
    for scale in range(len(MS_SSIM_WEIGHTS)):
        side = min(a.shape[-2:])
        window = min(SSIM_WINDOW, side if side % 2 else side - 1)
        ssim, contrast_structure = ssim_components(a, b, data_range, window)
        last = scale == len(MS_SSIM_WEIGHTS) - 1
        values.append((ssim if last else contrast_structure).clamp_min(0.0))  # [N]
        if not last:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack(values, dim=1)  # [N, 5]
    return torch.prod(stacked ** weights[None, :], dim=1)  # [N]
