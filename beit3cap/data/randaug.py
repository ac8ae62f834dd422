"""RandAugment as the official BEiT-3 captioning recipe applies it (spec §5.5), on PIL images.

The official version (inherited from ALBEF/BLIP) works on numpy arrays with OpenCV. Here every op is a
PIL/torchvision operation checked against that behaviour:

- AutoContrast, Equalize and Brightness give the same pixels as the official lookup tables.
- Sharpness uses the same 3x3 smoothing kernel (1s, centre 5, /13) and keeps the border, but CLIPS the
  blend to 0..255. The official op casts to uint8 without clipping, so bright edges wrapped round to
  dark values (spec §9 item 11); clipping is a deliberate fix.
- The geometric ops use OpenCV's conventions (pixel-index coordinates, shear about the top-left pixel,
  rotation about (W/2, H/2), positive angle = counter-clockwise, bilinear, constant grey fill blended into
  the edge pixels). Results agree with a float reference of those maps to within one grey level; OpenCV
  itself rounds coordinates to 1/32 pixel, so bit-identity with it is neither possible nor needed.

Randomness comes from torch's global generator, so seeding it per sample (as the datasets do) makes the
augmentation reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as F

MAX_LEVEL = 10
FILL = (128, 128, 128)

# Each op: (image, magnitude level, random sign +-1) -> image.
Op = Callable[[Image.Image, float, int], Image.Image]


def _warp(image: Image.Image, matrix: Sequence[Sequence[float]]) -> Image.Image:
    """Apply the forward 2x3 affine ``matrix`` (destination = matrix @ source, pixel-index coordinates)."""
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    lin = inverse[:2, :2]
    # PIL samples at pixel centres (index + 0.5) and PIL's bilinear filter does not blend the fill colour
    # into edge pixels. A 1-pixel frame of fill colour reproduces OpenCV's constant-border blending; the
    # offset below converts the index-space map into PIL's centre convention on the padded image.
    offset = inverse[:2, 2] + 1.0 + (np.eye(2) - lin) @ np.array([0.5, 0.5])
    coeffs = (lin[0, 0], lin[0, 1], offset[0], lin[1, 0], lin[1, 1], offset[1])
    padded = ImageOps.expand(image, border=1, fill=FILL)
    return padded.transform(image.size, Image.Transform.AFFINE, coeffs,
                            resample=Image.Resampling.BILINEAR, fillcolor=FILL)


def identity(image: Image.Image, level: float, sign: int) -> Image.Image:
    return image


def auto_contrast(image: Image.Image, level: float, sign: int) -> Image.Image:
    return F.autocontrast(image)


def equalize(image: Image.Image, level: float, sign: int) -> Image.Image:
    return F.equalize(image)


def _enhance_factor(level: float) -> float:
    # Brighten/sharpen only: the official recipe never draws a sign for these two (1.36 at level 7).
    return level / MAX_LEVEL * 1.8 + 0.1


def brightness(image: Image.Image, level: float, sign: int) -> Image.Image:
    return F.adjust_brightness(image, _enhance_factor(level))


def sharpness(image: Image.Image, level: float, sign: int) -> Image.Image:
    # On PIL images this is ImageEnhance.Sharpness: SMOOTH kernel, border kept, blend clipped to 0..255.
    return F.adjust_sharpness(image, _enhance_factor(level))


def shear_x(image: Image.Image, level: float, sign: int) -> Image.Image:
    s = sign * 0.3 * level / MAX_LEVEL
    return _warp(image, [[1.0, s, 0.0], [0.0, 1.0, 0.0]])


def shear_y(image: Image.Image, level: float, sign: int) -> Image.Image:
    s = sign * 0.3 * level / MAX_LEVEL
    return _warp(image, [[1.0, 0.0, 0.0], [s, 1.0, 0.0]])


def _translate_pixels(level: float) -> float:
    return 10.0 * level / MAX_LEVEL


def translate_x(image: Image.Image, level: float, sign: int) -> Image.Image:
    return _warp(image, [[1.0, 0.0, sign * _translate_pixels(level)], [0.0, 1.0, 0.0]])


def translate_y(image: Image.Image, level: float, sign: int) -> Image.Image:
    return _warp(image, [[1.0, 0.0, 0.0], [0.0, 1.0, sign * _translate_pixels(level)]])


def rotate(image: Image.Image, level: float, sign: int) -> Image.Image:
    theta = math.radians(sign * 30.0 * level / MAX_LEVEL)
    a, b = math.cos(theta), math.sin(theta)
    cx, cy = image.width / 2, image.height / 2
    return _warp(image, [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


OPS: dict[str, Op] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}
CAPTIONING_OPS = tuple(OPS)


class RandAugment:
    """Pick ``num_ops`` ops with replacement; apply each with probability ``prob`` at ``magnitude``/10.

    Takes and returns an RGB PIL image. Geometric ops get a random sign; Brightness and Sharpness don't.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 7, prob: float = 0.5,
                 ops: Sequence[str] = CAPTIONING_OPS) -> None:
        unknown = [name for name in ops if name not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; known: {list(OPS)}")
        if not ops:
            raise ValueError("RandAugment needs at least one op")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.prob = prob
        self.ops = tuple(ops)

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"RandAugment expects a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            raise ValueError(f"RandAugment expects an RGB image, got mode {image.mode}")
        for k in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if torch.rand(()).item() >= self.prob:
                continue
            sign = 1 if torch.rand(()).item() < 0.5 else -1
            image = OPS[self.ops[k]](image, self.magnitude, sign)
        return image

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"prob={self.prob}, ops={list(self.ops)})")
