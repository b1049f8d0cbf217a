"""The surrogate-class transformations of Exemplar-CNN, batched in torch on any device.

A surrogate class is one seed patch; its samples are random transformations of it
(Dosovitskiy et al., TPAMI 2016, Sec. 3.1; order as in the official code: geometric warp,
PCA colour, then HSV power/multiply/add and hue). Blur is the extra family of the
matching-oriented Exemplar-CNN-blur. Gamma, shading, shadow and noise model illumination
and sensor changes that survive the patch standardisation (a global gain and offset do
not); they are off by default. Every family has an identity setting, so each can be
switched off or scaled from the command line; a family at its identity draws no random
numbers, so switching the new ones on never changes what the others draw for a seed.

Images are RGB float tensors in [0, 1], shape (B, 3, H, W).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import kornia
import torch
import torch.nn.functional as F

from ..patches import normalize_patches

__all__ = [
    "sample_patches",
    "TransformConfig",
    "FAMILIES",
    "sample_parameters",
    "warp",
    "pca_colour",
    "hsv_jitter",
    "blur",
    "gamma",
    "shading",
    "shadow",
    "noise",
    "to_gray",
    "colour_pca_basis",
    "SurrogateSampler",
]


@dataclass(frozen=True)
class TransformConfig:
    """Ranges of the random transformations (paper defaults; see REFERENCE.md).

    Attributes:
        translation: max shift per axis, as a fraction of the patch side (uniform).
        scale: (min, max) zoom; > 1 shows a larger area (uniform).
        rotation: max absolute rotation in degrees (uniform).
        pca_colour: max factor f on each principal colour component, drawn uniformly from [1/f, f].
        hsv_power: max exponent p for S and V, drawn log-uniformly from [1/p, p].
        hsv_multiply: (min, max) factor for S and V (uniform).
        hsv_add: max absolute offset for S and V (uniform).
        hue: max absolute hue shift as a fraction of the colour circle (uniform).
        blur: max Gaussian sigma in output-patch pixels, drawn uniformly from [0, blur].
        gamma: max gamma g on all three channels, drawn log-uniformly from [1/g, g] (1: off).
        shading: max log-gain range across the patch of a smooth multiplicative illumination
            field (a gradient in a random direction plus a saddle term), drawn uniformly from
            [0, shading] (0: off).
        shadow: probability of a soft-edged shadow: a random line through the patch, the
            pixels on one side darkened by a factor drawn uniformly from [0.3, 0.8] (0: off).
        noise: max sensor noise level s: Gaussian read noise of sigma drawn uniformly from
            [0, s] plus shot noise of sigma k * sqrt(intensity), k drawn uniformly from
            [0, s]; intensity units in [0, 1] (0: off).
    """

    translation: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    rotation: float = 20.0
    pca_colour: float = 2.0
    hsv_power: float = 4.0
    hsv_multiply: tuple[float, float] = (0.7, 1.4)
    hsv_add: float = 0.1
    hue: float = 0.1
    blur: float = 1.5
    gamma: float = 1.0
    shading: float = 0.0
    shadow: float = 0.0
    noise: float = 0.0

    def without(self, *families: str) -> "TransformConfig":
        """A copy with the named families set to their identity."""
        unknown = set(families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown transformation families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
        return replace(self, **{name: _IDENTITY[name] for name in families})

    def to_dict(self) -> dict:
        return asdict(self)


_IDENTITY = {
    "translation": 0.0,
    "scale": (1.0, 1.0),
    "rotation": 0.0,
    "pca_colour": 1.0,
    "hsv_power": 1.0,
    "hsv_multiply": (1.0, 1.0),
    "hsv_add": 0.0,
    "hue": 0.0,
    "blur": 0.0,
    "gamma": 1.0,
    "shading": 0.0,
    "shadow": 0.0,
    "noise": 0.0,
}
#: Darkening factor range of a shadow (fraction of the light left).
SHADOW_FACTOR = (0.3, 0.8)
#: Shadow edge width range (logistic scale), fraction of the patch side.
SHADOW_SOFTNESS = (0.01, 0.25)
FAMILIES: tuple[str, ...] = tuple(f.name for f in fields(TransformConfig))


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def sample_parameters(n: int, config: TransformConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw ``n`` random transformations.

    Returns:
        dict of tensors on the generator's device: ``shift`` (n, 2) in fractions of the patch
        side, ``scale`` (n,), ``angle`` (n,) degrees, ``pca`` (n, 3) factors, ``power``,
        ``multiply``, ``add`` (n, 2) for (S, V), ``hue`` (n,) fraction of the circle,
        ``sigma`` (n,) output pixels; and for the families not at their identity only:
        ``gamma`` (n,), ``shading`` (n, 3) (log-gain range, direction in radians, saddle
        weight in [-1, 1]), ``shadow`` (n, 4) (factor, 1 for samples without a shadow;
        direction in radians; offset of the line from the centre and edge softness, both
        fractions of the patch side), ``noise`` (n, 2) (read sigma, shot coefficient).
    """
    dev = generator.device
    c = config

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return _uniform(n * math.prod(shape), lo, hi, generator, dev).reshape(n, *shape)

    log_p = math.log(c.hsv_power)
    params = {
        "shift": u(-c.translation, c.translation, 2),
        "scale": u(c.scale[0], c.scale[1]),
        "angle": u(-c.rotation, c.rotation),
        "pca": u(1.0 / c.pca_colour, c.pca_colour, 3),
        "power": torch.exp(u(-log_p, log_p, 2)),
        "multiply": u(c.hsv_multiply[0], c.hsv_multiply[1], 2),
        "add": u(-c.hsv_add, c.hsv_add, 2),
        "hue": u(-c.hue, c.hue),
        "sigma": u(0.0, c.blur),
    }
    if c.gamma != _IDENTITY["gamma"]:
        params["gamma"] = torch.exp(u(-math.log(c.gamma), math.log(c.gamma)))
    if c.shading != _IDENTITY["shading"]:
        params["shading"] = torch.cat([u(0.0, c.shading, 1), u(0.0, 2 * math.pi, 1), u(-1.0, 1.0, 1)], dim=1)
    if c.shadow != _IDENTITY["shadow"]:
        factor = torch.where(u(0.0, 1.0) < c.shadow, u(*SHADOW_FACTOR), torch.ones(n, device=dev))
        params["shadow"] = torch.stack([factor, u(0.0, 2 * math.pi), u(-0.4, 0.4), u(*SHADOW_SOFTNESS)], dim=1)
    if c.noise != _IDENTITY["noise"]:
        params["noise"] = u(0.0, c.noise, 2)
    return params


def warp(context: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sample a rotated, scaled, shifted ``patch_size`` patch from the centre of each context crop.

    Args:
        context: (B, C, S, S) float crops centred on the seeds (S > patch_size leaves room).
        shift: (B, 2) fractions of the patch side (x, y); scale: (B,) (> 1 samples a larger area);
            angle: (B,) degrees; the sampling frame turns clockwise on screen, as with OpenCV's
            KeyPoint.angle, so the content appears turned counter-clockwise.

    Returns:
        (B, C, P, P) float patches; zero parameters give the central crop exactly.
    """
    b, _, side, _ = context.shape
    theta_rad = torch.deg2rad(angle)
    cos, sin = torch.cos(theta_rad), torch.sin(theta_rad)
    ratio = scale * patch_size / side  # patch extent in normalised context coordinates
    mat = torch.stack(
        [
            torch.stack([ratio * cos, -ratio * sin, 2 * shift[:, 0] * patch_size / side], dim=1),
            torch.stack([ratio * sin, ratio * cos, 2 * shift[:, 1] * patch_size / side], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(mat, [b, context.shape[1], patch_size, patch_size], align_corners=False)
    return F.grid_sample(context, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def colour_pca_basis(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (3,) and principal colour components (3, 3; columns) of (M, 3) RGB pixels."""
    mean = pixels.mean(0)
    _, eigvec = torch.linalg.eigh(torch.cov((pixels - mean).T))
    return mean, eigvec.flip(1)


def pca_colour(images: torch.Tensor, factors: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Multiply each pixel's projection on each principal colour component by a per-image factor.

    Args:
        images: (B, 3, H, W) RGB; factors: (B, 3); mean: (3,); basis: (3, 3) components as columns.

    Returns:
        (B, 3, H, W), clamped to [0, 1]; factors of 1 return the input.
    """
    centred = images - mean[None, :, None, None]
    coords = torch.einsum("bchw,ck->bkhw", centred, basis) * factors[:, :, None, None]
    return (torch.einsum("bkhw,ck->bchw", coords, basis) + mean[None, :, None, None]).clamp(0, 1)


def hsv_jitter(images: torch.Tensor, power: torch.Tensor, multiply: torch.Tensor, add: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Raise S and V to a power, multiply, add, and shift the hue.

    Args:
        images: (B, 3, H, W) RGB in [0, 1]; power, multiply, add: (B, 2) for (S, V); hue: (B,) fraction of the circle.

    Returns:
        (B, 3, H, W) RGB in [0, 1].
    """
    hsv = kornia.color.rgb_to_hsv(images)
    h, sv = hsv[:, :1], hsv[:, 1:].clamp(0, 1)
    sv = (sv.pow(power[:, :, None, None]) * multiply[:, :, None, None] + add[:, :, None, None]).clamp(0, 1)
    h = torch.remainder(h + 2 * math.pi * hue[:, None, None, None], 2 * math.pi)
    return kornia.color.hsv_to_rgb(torch.cat([h, sv], dim=1)).clamp(0, 1)


def blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Gaussian blur with a per-image sigma (B,) in pixels; sigma 0 returns the input."""
    if max_sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * max_sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    s = sigma.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (x[None] / s) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K), a delta where sigma ~ 0
    b, c, h, w = images.shape
    flat = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    kx = kernel.repeat_interleave(c, 0)[:, None, None, :]
    ky = kernel.repeat_interleave(c, 0)[:, None, :, None]
    flat = F.conv2d(F.conv2d(flat, kx, groups=b * c), ky, groups=b * c)
    return flat.reshape(b, c, h, w)


def gamma(images: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Raise every channel to a per-image power.

    Args:
        images: (B, C, H, W) in [0, 1]; exponent: (B,) > 0 (1 returns the input).

    Returns:
        (B, C, H, W) in [0, 1].
    """
    return images.pow(exponent[:, None, None, None])


def _patch_coordinates(size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(size, size) x and y of the pixel centres, fractions of the side from the centre in (-0.5, 0.5); y points down."""
    t = (torch.arange(size, device=device, dtype=dtype) + 0.5) / size - 0.5
    return t[None, :].expand(size, size), t[:, None].expand(size, size)


def shading(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Multiply by a smooth illumination field exp(L(x, y)), L = gain * (normalised a*x + b*y + c*x*y).

    The field's gradient (a, b) = (cos d, sin d) points in direction d; c = 2 * saddle bends
    it. L is centred and scaled so that over the patch it spans exactly [-gain/2, gain/2].

    Args:
        images: (B, C, H, W) in [0, 1], H == W.
        params: (B, 3): log-gain range (0 returns the input), direction d in radians, saddle in [-1, 1].

    Returns:
        (B, C, H, W), clamped to [0, 1].
    """
    x, y = _patch_coordinates(images.shape[-1], images.device, images.dtype)
    gain, direction, saddle = params[:, 0, None, None], params[:, 1, None, None], params[:, 2, None, None]
    field = torch.cos(direction) * x + torch.sin(direction) * y + 2 * saddle * x * y  # (B, H, W)
    high, low = field.amax(dim=(1, 2), keepdim=True), field.amin(dim=(1, 2), keepdim=True)
    log_gain = gain * (field - (high + low) / 2) / (high - low).clamp_min(1e-6)
    return (images * torch.exp(log_gain)[:, None]).clamp(0, 1)


def shadow(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Darken the pixels beyond a soft-edged line by a per-image factor.

    The line's normal points in direction d; the pixels with x cos d + y sin d > offset are
    in shadow, with a logistic edge of scale ``softness`` (fractions of the patch side).

    Args:
        images: (B, C, H, W) in [0, 1], H == W.
        params: (B, 4): factor (light left in the shadow; 1 returns the input), d in radians, offset, softness.

    Returns:
        (B, C, H, W) in [0, 1].
    """
    x, y = _patch_coordinates(images.shape[-1], images.device, images.dtype)
    factor, direction, offset, softness = (params[:, i, None, None] for i in range(4))
    inside = torch.sigmoid((torch.cos(direction) * x + torch.sin(direction) * y - offset) / softness)
    return images * (1 - (1 - factor) * inside)[:, None]


def noise(images: torch.Tensor, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add sensor noise: Gaussian of sigma sqrt(read^2 + shot^2 * intensity) per pixel.

    Args:
        images: (B, C, H, W) intensities in [0, 1], on the generator's device.
        params: (B, 2): read sigma and shot coefficient, intensity units (zeros return the input).

    Returns:
        (B, C, H, W), clamped to [0, 1] (the sensor clips).
    """
    read, shot = params[:, 0, None, None, None], params[:, 1, None, None, None]
    sigma = torch.sqrt(read.square() + shot.square() * images)
    draws = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + sigma * draws).clamp(0, 1)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma (ITU-R BT.601 weights, as cv2.COLOR_BGR2GRAY)."""
    return kornia.color.rgb_to_grayscale(images)


class SurrogateSampler:
    """Draws transformed samples of surrogate classes from their seed context crops.

    Args:
        contexts: (N, 3, S, S) uint8 RGB crops centred on the N seed patches.
        config: transformation ranges.
        patch_size: side P of the generated samples.
        device: where the crops live and the samples are made.
    """

    def __init__(self, contexts: torch.Tensor, config: TransformConfig, patch_size: int = 32, device: str | torch.device = "cpu") -> None:
        if contexts.ndim != 4 or contexts.shape[1] != 3 or contexts.dtype != torch.uint8:
            raise ValueError(f"contexts must be (N, 3, S, S) uint8, got {tuple(contexts.shape)} {contexts.dtype}")
        self.contexts = contexts.to(device)
        self.config = config
        self.patch_size = patch_size
        self.device = torch.device(device)
        sample = self.contexts[:: max(1, len(contexts) // 512)].float().div(255).permute(0, 2, 3, 1).reshape(-1, 3)
        self.colour_mean, self.colour_basis = colour_pca_basis(sample)

    @property
    def num_classes(self) -> int:
        return len(self.contexts)

    def sample(self, class_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Transformed grey samples (B, 1, P, P) float in [0, 1] for class indices (B,).

        Order: warp, PCA colour, HSV, gamma, shading, shadow (on RGB), grey, blur, then the
        sensor noise, which the optics do not blur.
        """
        params = sample_parameters(len(class_ids), self.config, generator)
        images = self.contexts[class_ids.to(self.device)].float().div_(255)
        images = warp(images, params["shift"], params["scale"], params["angle"], self.patch_size)
        images = pca_colour(images, params["pca"], self.colour_mean, self.colour_basis)
        images = hsv_jitter(images, params["power"], params["multiply"], params["add"], params["hue"])
        for family, apply in (("gamma", gamma), ("shading", shading), ("shadow", shadow)):
            if family in params:
                images = apply(images, params[family])
        grey = blur(to_gray(images), params["sigma"], self.config.blur)
        return noise(grey, params["noise"], generator) if "noise" in params else grey


def sample_patches(sampler: SurrogateSampler, class_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Transformed samples of the given classes, standardised as the network sees them.

    Returns:
        (B, 1, P, P) float32 grey patches, zero mean and unit variance each, on the sampler's device.
    """
    return normalize_patches(sampler.sample(class_ids, generator))
