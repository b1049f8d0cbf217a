"""The surrogate-class transformations of Exemplar-CNN, batched in torch on any device.

A surrogate class is one seed patch; its samples are random transformations of it
(Dosovitskiy et al., TPAMI 2016, Sec. 3.1; order as in the official code: geometric warp,
PCA colour, then HSV power/multiply/add and hue). Blur is the extra family of the
matching-oriented Exemplar-CNN-blur. Gamma, shading, shadow and noise model illumination
and sensor changes that survive the patch standardisation (a global gain and offset do
not); they are off by default. Every family has an identity setting, so each can be
switched off or scaled. Each family is one record of :data:`FAMILY_RECORDS` (setting,
check, help, draw); :class:`TransformConfig` is generated from them. The paper's families
always draw their parameters; the four others draw only when on, after the paper's, so
switching them on never changes what the paper's families draw for a seed.

Images are RGB float tensors in [0, 1], shape (B, 3, H, W).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, make_dataclass, replace
from typing import Callable, Union

import kornia
import torch
import torch.nn.functional as F

from ..checks import check, check_number
from ..patches import normalize_patches

__all__ = [
    "sample_patches",
    "Family",
    "FAMILY_RECORDS",
    "FAMILIES",
    "TransformConfig",
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


#: Darkening factor range of a shadow (fraction of the light left).
SHADOW_FACTOR = (0.3, 0.8)
#: Shadow edge width range (logistic scale), fraction of the patch side.
SHADOW_SOFTNESS = (0.01, 0.25)


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


#: A family's setting: one number, or a (min, max) range.
Setting = Union[float, tuple[float, float]]
#: ``u(lo, hi, *shape)``: (n, *shape) uniform draws from [lo, hi) of the batch's generator.
Uniform = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One family of random transformations: its setting, the setting's check and help, and its draw.

    Attributes:
        name: the :class:`TransformConfig` field that holds the setting.
        default: the paper's setting (off for the families the paper lacks).
        identity: the setting that leaves a patch unchanged (:meth:`TransformConfig.without`).
        low, high: inclusive bounds of a one-number setting; a (min, max) range needs
            0 < min <= max instead.
        metavar: the setting's letter in ``help``.
        help: what the setting means, with its units.
        param: the key of the family's parameters in :func:`sample_parameters`.
        draw: ``draw(u, setting)``, the family's parameters for a batch (see :data:`Uniform`).
        drawn_at_identity: the paper's families draw even at their identity, so a seed gives
            the same samples whichever of them is off; the others draw only when on.
        apply_rgb: the function applying the parameters to RGB patches after the colour
            families, for the families that are applied there (in this table's order).
    """

    name: str
    default: Setting
    identity: Setting
    low: float | None
    high: float | None
    metavar: str
    help: str
    param: str
    draw: Callable[[Uniform, Setting], torch.Tensor]
    drawn_at_identity: bool = True
    apply_rgb: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def is_range(self) -> bool:
        """Whether the setting is a (min, max) range."""
        return isinstance(self.default, tuple)

    def check(self, value: Setting) -> None:
        """Raise :class:`~exemplar_desc.checks.OptionError` (named by :attr:`name`) unless ``value`` is a valid setting."""
        if not self.is_range:
            check_number(self.name, value, low=self.low, high=self.high)
            return
        lo, hi = value
        check(all(math.isfinite(v) for v in (lo, hi)) and 0 < lo <= hi, self.name, f"{lo:g},{hi:g}", "expected MIN,MAX with 0 < MIN <= MAX")


def _draw_shadow(u: Uniform, probability: float) -> torch.Tensor:
    """(n, 4): factor (1 for the samples without a shadow), direction in radians, offset, softness."""
    has_shadow = u(0.0, 1.0) < probability
    factor = u(*SHADOW_FACTOR)
    factor = torch.where(has_shadow, factor, torch.ones_like(factor))
    return torch.stack([factor, u(0.0, 2 * math.pi), u(-0.4, 0.4), u(*SHADOW_SOFTNESS)], dim=1)


#: The transformation families, in the order they draw their parameters (a seed's samples
#: depend on it). Adding a family is one record here and its function above.
FAMILY_RECORDS: tuple[Family, ...] = (
    Family("translation", 0.2, 0.0, 0, None, "T", "max shift per axis, fraction of the patch side, drawn uniformly from [-T, T]",
           "shift", lambda u, t: u(-t, t, 2)),
    Family("scale", (0.7, 1.4), (1.0, 1.0), None, None, "MIN,MAX", "zoom drawn uniformly from [MIN, MAX]; > 1 shows a larger area",
           "scale", lambda u, r: u(r[0], r[1])),
    Family("rotation", 20.0, 0.0, 0, None, "DEGREES", "max absolute rotation in degrees, drawn uniformly",
           "angle", lambda u, d: u(-d, d)),
    Family("pca_colour", 2.0, 1.0, 1, None, "F", "factor on each principal colour component, drawn uniformly from [1/F, F]",
           "pca", lambda u, f: u(1.0 / f, f, 3)),
    Family("hsv_power", 4.0, 1.0, 1, None, "P", "exponent on saturation and value, drawn log-uniformly from [1/P, P]",
           "power", lambda u, p: torch.exp(u(-math.log(p), math.log(p), 2))),
    Family("hsv_multiply", (0.7, 1.4), (1.0, 1.0), None, None, "MIN,MAX", "factor on saturation and value, drawn uniformly from [MIN, MAX]",
           "multiply", lambda u, r: u(r[0], r[1], 2)),
    Family("hsv_add", 0.1, 0.0, 0, None, "A", "offset on saturation and value, drawn uniformly from [-A, A]",
           "add", lambda u, a: u(-a, a, 2)),
    Family("hue", 0.1, 0.0, 0, None, "H", "hue shift, fraction of the colour circle, drawn uniformly from [-H, H]",
           "hue", lambda u, h: u(-h, h)),
    Family("blur", 1.5, 0.0, 0, None, "SIGMA", "Gaussian blur sigma in patch pixels, drawn uniformly from [0, SIGMA]",
           "sigma", lambda u, s: u(0.0, s)),
    Family("gamma", 1.0, 1.0, 1, None, "G", "gamma on all three channels, drawn log-uniformly from [1/G, G]",
           "gamma", lambda u, g: torch.exp(u(-math.log(g), math.log(g))), drawn_at_identity=False, apply_rgb=gamma),
    Family("shading", 0.0, 0.0, 0, None, "S",
           "log-gain range across the patch of a smooth illumination field (a gradient in a random direction plus a "
           "saddle term), drawn uniformly from [0, S] (e.g. 0.7)",
           "shading", lambda u, s: torch.cat([u(0.0, s, 1), u(0.0, 2 * math.pi, 1), u(-1.0, 1.0, 1)], dim=1),
           drawn_at_identity=False, apply_rgb=shading),
    Family("shadow", 0.0, 0.0, 0, 1, "P",
           "probability of a soft-edged shadow: the pixels beyond a random line darkened by a factor drawn uniformly "
           "from [0.3, 0.8]",
           "shadow", _draw_shadow, drawn_at_identity=False, apply_rgb=shadow),
    Family("noise", 0.0, 0.0, 0, 1, "S",
           "sensor noise: read noise of sigma drawn uniformly from [0, S] plus shot noise of sigma k * sqrt(intensity), "
           "k drawn uniformly from [0, S]; intensities in [0, 1] (e.g. 0.02)",
           "noise", lambda u, s: u(0.0, s, 2), drawn_at_identity=False),
)
FAMILIES: tuple[str, ...] = tuple(family.name for family in FAMILY_RECORDS)
_BY_NAME = {family.name: family for family in FAMILY_RECORDS}


def _without(self, *families: str) -> "TransformConfig":
    """A copy with the named families set to their identity."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown transformation families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    return replace(self, **{name: _BY_NAME[name].identity for name in families})


def _to_dict(self) -> dict:
    """The settings by family name (ranges as tuples), as the checkpoint and the model card record them."""
    return asdict(self)


_DOC = "Ranges of the random transformations, one field per family of :data:`FAMILY_RECORDS` (the paper's by default).\n\n"
_DOC += "    Attributes:\n" + "".join(
    f"        {f.name} ({f.metavar}): {f.help}. Default {f.default}; identity {f.identity}.\n" for f in FAMILY_RECORDS
)
#: The transformation settings: a frozen dataclass generated from :data:`FAMILY_RECORDS`,
#: with ``without(*families)`` and ``to_dict()``.
TransformConfig = make_dataclass(
    "TransformConfig",
    [(f.name, tuple[float, float] if f.is_range else float, f.default) for f in FAMILY_RECORDS],
    frozen=True,
    namespace={"__doc__": _DOC, "__module__": __name__, "without": _without, "to_dict": _to_dict},
)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def sample_parameters(n: int, config: TransformConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw ``n`` random transformations, family by family in :data:`FAMILY_RECORDS`' order.

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

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return _uniform(n * math.prod(shape), lo, hi, generator, dev).reshape(n, *shape)

    params = {}
    for family in FAMILY_RECORDS:
        setting = getattr(config, family.name)
        if family.drawn_at_identity or setting != family.identity:
            params[family.param] = family.draw(u, setting)
    return params


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
        for family in FAMILY_RECORDS:
            if family.apply_rgb is not None and family.param in params:
                images = family.apply_rgb(images, params[family.param])
        grey = blur(to_gray(images), params["sigma"], self.config.blur)
        return noise(grey, params["noise"], generator) if "noise" in params else grey


def sample_patches(sampler: SurrogateSampler, class_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Transformed samples of the given classes, standardised as the network sees them.

    Returns:
        (B, 1, P, P) float32 grey patches, zero mean and unit variance each, on the sampler's device.
    """
    return normalize_patches(sampler.sample(class_ids, generator))
