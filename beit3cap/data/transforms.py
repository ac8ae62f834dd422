"""Image loading and the official training/evaluation transforms (spec §5.5).

Training: RandomResizedCrop(S, scale 0.5-1, ratio 3/4-4/3) -> RandomHorizontalFlip(0.5) (optional)
-> RandAugment (optional) -> tensor in [0, 1] -> Normalize(0.5, 0.5), i.e. pixels in [-1, 1].
Evaluation: square bicubic resize to S x S (aspect ratio not kept, no crop), same normalisation.

All ops run on PIL images, as in the official code, so resizing is PIL's (antialiased) bicubic.
Randomness comes from torch's global generator; the datasets seed it per sample.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from .randaug import RandAugment

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

INTERPOLATIONS = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
    "lanczos": v2.InterpolationMode.LANCZOS,
    "box": v2.InterpolationMode.BOX,
    "hamming": v2.InterpolationMode.HAMMING,
}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageLoadError(RuntimeError):
    """An image file is missing, unreadable or corrupt."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels are laid over white (a bare ``convert("RGB")`` shows whatever colour they happen
    to store, often black). 16-bit greyscale is scaled to 8 bits (PIL would clip everything above 255 to
    white). ``I`` is treated as 16-bit too, since that is how older Pillow opened 16-bit PNGs.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file, apply its EXIF orientation and return it as 8-bit RGB.

    Raises ImageLoadError naming the file if it is missing, not an image, truncated or otherwise corrupt.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now so a truncated file fails here, not inside a transform
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError as e:
        raise ImageLoadError(f"image not found: {path}") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL reports unreadable/corrupt files as OSError (incl. UnidentifiedImageError), ValueError or
        # SyntaxError depending on the codec.
        raise ImageLoadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), v2.ToPureTensor()]


def build_transform(is_train: bool, input_size: int, randaug: bool = False, hflip: bool = True,
                    train_interpolation: str = "bicubic",
                    crop_scale: tuple[float, float] = (0.5, 1.0)) -> v2.Compose:
    """The official image pipeline; takes an RGB PIL image, returns a float tensor [3, S, S] in [-1, 1].

    ``hflip`` (training only) defaults to on for COCO parity; turn it off when captions talk about left
    and right (e.g. WTS), since a flip makes them wrong. ``train_interpolation`` is the resize filter of
    the random crop: bicubic (default), bilinear, nearest, lanczos, box, hamming, or "random" (bilinear or
    bicubic per image, like timm). ``crop_scale`` is the random crop's area range (official 0.5-1); (1, 1)
    keeps the whole image, for captions that count objects or name where they are.
    """
    if input_size < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
    if not is_train:
        resize = v2.Resize((input_size, input_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return v2.Compose([resize, *_to_normalized_tensor()])

    def crop(mode: v2.InterpolationMode) -> v2.RandomResizedCrop:
        return v2.RandomResizedCrop(input_size, scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3),
                                    interpolation=mode, antialias=True)

    if train_interpolation == "random":
        steps: list = [v2.RandomChoice([crop(v2.InterpolationMode.BILINEAR), crop(v2.InterpolationMode.BICUBIC)])]
    elif train_interpolation in INTERPOLATIONS:
        steps = [crop(INTERPOLATIONS[train_interpolation])]
    else:
        raise ValueError(f"unknown train_interpolation {train_interpolation!r}; "
                         f"choose one of {[*INTERPOLATIONS, 'random']}")
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if randaug:
        steps.append(RandAugment(num_ops=2, magnitude=7, prob=0.5))
    return v2.Compose([*steps, *_to_normalized_tensor()])
