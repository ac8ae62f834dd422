"""Image loading, the official train/eval transforms and RandAugment, on real PIL images and files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from beit3cap.data import randaug
from beit3cap.data.randaug import RandAugment
from beit3cap.data.transforms import ImageLoadError, build_transform, load_rgb_image


def _pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a.astype(np.uint8))


def _halves(size: int = 64) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((size, size, 3), np.uint8)
    a[:, : size // 2, 0] = 255
    a[:, size // 2:, 2] = 255
    return _pil(a)


def _centroid(image: Image.Image) -> tuple[float, float]:
    """Centroid of the red content; grey fill and black background have equal channels and cancel."""
    rgb = np.asarray(image).astype(np.float64)
    a = (rgb[..., 0] - rgb[..., 1]).clip(0)
    ys, xs = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    return float((a * xs).sum() / a.sum()), float((a * ys).sum() / a.sum())


def _dot(w: int, h: int, x: int, y: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[y, x] = (250, 0, 0)
    return _pil(a)


# ----------------------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("randaug_on", [False, True])
def test_train_transform_output(randaug_on):
    t = build_transform(True, 48, randaug=randaug_on)
    rng = np.random.default_rng(0)
    for k in range(10):
        torch.manual_seed(k)
        out = t(_pil(rng.integers(0, 256, (70, 90, 3))))
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 48, 48)
        assert out.min() >= -1.0 and out.max() <= 1.0


def test_hflip_off_never_flips_and_on_does():
    # A crop covers >= 50 % of the area with aspect 3/4..4/3, so it is at least 0.61 of the side wide and
    # always straddles the middle: unflipped, its left column is red and its right column blue.
    def flipped(hflip: bool, seed: int) -> bool:
        torch.manual_seed(seed)
        out = build_transform(True, 32, hflip=hflip)(_halves())
        left_red, right_red = out[0, :, 0].mean() > 0, out[0, :, -1].mean() > 0
        assert left_red != right_red
        return bool(right_red)

    assert not any(flipped(False, s) for s in range(40))
    assert any(flipped(True, s) for s in range(40))


def test_eval_transform_is_deterministic_square_bicubic_resize():
    rng = np.random.default_rng(1)
    img = _pil(rng.integers(0, 256, (37, 81, 3)))
    t = build_transform(False, 24)
    expected = torch.from_numpy(np.array(img.resize((24, 24), Image.Resampling.BICUBIC))).permute(2, 0, 1)
    expected = expected.float() / 255 * 2 - 1
    out = t(img)
    assert torch.allclose(out, expected, atol=1e-6)
    torch.manual_seed(5)
    assert torch.equal(t(img), out)


def test_train_interpolation_choices():
    img = _halves()
    for name in ["bicubic", "bilinear", "nearest", "random"]:
        assert build_transform(True, 16, train_interpolation=name)(img).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="train_interpolation"):
        build_transform(True, 16, train_interpolation="cubic")


# ----------------------------------------------------------------------------------------- RandAugment ops

def test_sharpness_clips_instead_of_wrapping():
    a = np.zeros((9, 9, 3), np.uint8)
    a[4, 4] = 255          # bright dot on black: the unclipped blend is 98 + 1.36 * 157 = 311.5
    a[1, 6] = (200, 30, 255)
    a[6:, :3] = 240
    out = np.asarray(randaug.sharpness(_pil(a), 7, 1)).astype(np.int64)

    # Reference from the spec: 3x3 kernel (1s, centre 5) / 13, rounded; interior blended with 1.36 and
    # clipped; border pixels unchanged.
    k = np.ones((3, 3))
    k[1, 1] = 5
    padded = a.astype(np.float64)
    smooth = sum(k[dy, dx] * padded[dy:dy + 7, dx:dx + 7] for dy in range(3) for dx in range(3))
    deg = np.rint(smooth / 13).astype(np.float32)
    blend = deg + np.float32(1.36) * (a[1:-1, 1:-1].astype(np.float32) - deg)
    expected = a.astype(np.int64)
    expected[1:-1, 1:-1] = blend.clip(0, 255).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert out[4, 4, 0] == 255
    assert blend[3, 3, 0] > 255 and blend.astype(np.int64).astype(np.uint8)[3, 3, 0] < 100  # would wrap


def test_brightness_table():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = np.asarray(randaug.brightness(_pil(a), 7, -1))  # no sign for brightness: always brighter
    expected = (np.arange(256) * 1.36).clip(0, 255).astype(np.uint8).reshape(16, 16)
    assert np.array_equal(out[..., 1], expected)


def test_autocontrast_and_equalize():
    rng = np.random.default_rng(2)
    a = rng.integers(50, 151, (20, 20, 3))
    a[0, 0] = (50, 60, 70)
    a[0, 1] = (150, 140, 130)
    out = np.asarray(randaug.auto_contrast(_pil(a), 7, 1))
    assert out.reshape(-1, 3).min(0).tolist() == [0, 0, 0] and out.reshape(-1, 3).max(0).tolist() == [255] * 3

    # Equalize reference: lut[i] = (step // 2 + sum(hist[:i])) // step, step = (nonzero bins but last) // 255.
    ch = a[..., 0]
    hist = np.bincount(ch.ravel(), minlength=256)
    nz = hist[hist > 0]
    step = int(nz[:-1].sum()) // 255
    lut = np.clip((step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step, 0, 255)
    assert np.array_equal(np.asarray(randaug.equalize(_pil(a), 7, 1))[..., 0], lut[ch])


@pytest.mark.parametrize("op,sign,delta", [(randaug.translate_x, 1, (7, 0)), (randaug.translate_x, -1, (-7, 0)),
                                           (randaug.translate_y, 1, (0, 7)), (randaug.translate_y, -1, (0, -7))])
def test_translate_moves_by_exactly_7_pixels(op, sign, delta):
    out = np.asarray(op(_dot(30, 20, 12, 9), 7, sign))
    moved = np.zeros((20, 30), bool)
    moved[9 + delta[1], 12 + delta[0]] = True
    assert np.array_equal(out[..., 0] - out[..., 1] == 250, moved)
    strip = out[:, :7] if delta[0] > 0 else out[:, -7:] if delta[0] < 0 else out[:7] if delta[1] > 0 else out[-7:]
    assert (strip == 128).all()  # grey fill in the vacated strip


def test_shear_is_about_the_top_left_corner():
    s = 0.3 * 7 / 10
    img = _dot(40, 30, 6, 20)
    cx, cy = _centroid(randaug.shear_x(img, 7, 1))
    assert cx == pytest.approx(6 + s * 20, abs=0.05) and cy == pytest.approx(20, abs=1e-9)
    cx, cy = _centroid(randaug.shear_y(_dot(40, 30, 20, 10), 7, -1))
    assert cx == pytest.approx(20, abs=1e-9) and cy == pytest.approx(10 - s * 20, abs=0.05)
    # The first row (y = 0) does not move under ShearX: the shear is about the origin, not the centre.
    a = np.random.default_rng(3).integers(0, 256, (30, 40, 3))
    assert np.array_equal(np.asarray(randaug.shear_x(_pil(a), 7, 1))[0], a[0])


def test_rotate_is_counter_clockwise_about_the_centre():
    w, h = 40, 30
    a = np.zeros((h, w, 3), np.uint8)
    a[14:17, 29:32, 0] = 200  # a 3x3 blob centred on (30, 15) = centre + (10, 0)
    cx, cy = _centroid(randaug.rotate(_pil(a), 7, 1))
    t = math.radians(21)
    assert cx == pytest.approx(w / 2 + 10 * math.cos(t), abs=0.15)
    assert cy == pytest.approx(h / 2 - 10 * math.sin(t), abs=0.15)
    corner = np.asarray(randaug.rotate(_pil(np.full((h, w, 3), 255)), 7, -1))[0, 0]
    assert corner.tolist() == [128, 128, 128]


def test_randaugment_samples_two_ops_with_replacement_each_with_prob_half():
    aug = RandAugment(ops=["TranslateX"])
    torch.manual_seed(0)
    shifts = []
    for _ in range(400):
        x, _ = _centroid(aug(_dot(60, 5, 30, 2)))
        shifts.append(round(x - 30))
    counts = {d: shifts.count(d) / len(shifts) for d in set(shifts)}
    assert set(counts) <= {-14, -7, 0, 7, 14}
    # Two independent draws, each applied with p = 0.5 and sign +-1: P(0) = 3/8, P(+-7) = 1/4, P(+-14) = 1/16.
    assert counts[0] == pytest.approx(3 / 8, abs=0.08)
    assert counts[7] == pytest.approx(1 / 4, abs=0.08) and counts[-7] == pytest.approx(1 / 4, abs=0.08)
    assert counts[14] == pytest.approx(1 / 16, abs=0.04) and counts[-14] == pytest.approx(1 / 16, abs=0.04)


def test_randaugment_is_reproducible_and_validates_input():
    aug = RandAugment()
    img = _pil(np.random.default_rng(4).integers(0, 256, (24, 24, 3)))
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append([np.asarray(aug(img)) for _ in range(8)])
    assert all(np.array_equal(x, y) for x, y in zip(*outs))
    assert any(not np.array_equal(x, np.asarray(img)) for x in outs[0])
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        RandAugment(ops=["Solarize"])
    with pytest.raises(ValueError, match="RGB"):
        aug(img.convert("L"))
    with pytest.raises(TypeError):
        aug(F.to_image(img))


# ----------------------------------------------------------------------------------------- image loading

def test_image_modes_load_as_rgb(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _pil(grey).convert("L").save(tmp_path / "l.png")
    assert np.array_equal(np.asarray(load_rgb_image(tmp_path / "l.png")), np.repeat(grey[..., None], 3, 2))

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (10, 20, 30, 255)  # opaque top half, fully transparent (black) bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_rgb_image(tmp_path / "rgba.png"))
    assert (out[:4] == (10, 20, 30)).all() and (out[4:] == 255).all()

    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((2, 3), 1)
    pal.save(tmp_path / "p.png")
    out = np.asarray(load_rgb_image(tmp_path / "p.png"))
    assert out[3, 2].tolist() == [200, 100, 50] and out[0, 0].tolist() == [0, 0, 0]
    pal.save(tmp_path / "pt.png", transparency=0)
    assert np.asarray(load_rgb_image(tmp_path / "pt.png"))[0, 0].tolist() == [255, 255, 255]

    sixteen = np.array([[0, 257 * 100, 32768, 65535]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert np.asarray(load_rgb_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 100, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:6, :6] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _pil(a).save(tmp_path / "rot.jpg", quality=95, exif=exif)
    out = load_rgb_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # width and height swapped
    arr = np.asarray(out).astype(int)
    assert arr[:6, -6:, 0].mean() > 200 and arr[:6, :6, 0].mean() < 50  # now at the top-right


def test_bad_image_files_raise_clear_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="not found.*missing.jpg"):
        load_rgb_image(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="junk.jpg"):
        load_rgb_image(tmp_path / "junk.jpg")
    _pil(np.random.default_rng(5).integers(0, 256, (64, 64, 3))).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_rgb_image(tmp_path / "cut.jpg")
