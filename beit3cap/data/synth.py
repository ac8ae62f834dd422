"""Generated captioning datasets in the exact on-disk layouts of the seed documents (COCO Karpathy,
NoCaps, WTS), so every index builder and training path can run without downloading anything.

Each image is a scene of 1-3 identical coloured shapes grouped at one place on a plain background;
its captions name exactly what is drawn (count, size, colour, shape, position, background), with varied
wording across references, so a small model can learn them from the pixels. The grammar is small and
regular on purpose: a CPU-trained demo must reach a high CIDEr in minutes.

Everything is deterministic: each image and its captions come from a ``random.Random`` seeded by
(seed, split, index), so the same seed writes byte-identical files and a larger ``n`` only appends.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..fileio import atomic_write_json

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 230),
    "yellow": (240, 215, 30), "purple": (145, 45, 185), "orange": (250, 135, 15),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15),
                                                 "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.13, "large": 0.24}  # shape diameter as a fraction of the image side
# Group anchor (centre, as fractions of the side) and the axis the shapes are lined up along.
POSITIONS: dict[str, tuple[float, float, str]] = {
    "left": (0.2, 0.5, "y"), "right": (0.8, 0.5, "y"), "top": (0.5, 0.2, "x"),
    "bottom": (0.5, 0.8, "x"), "middle": (0.5, 0.5, "x"),
}

_COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left side"), "right": ("on the right", "at the right side"),
    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
    "middle": ("in the middle", "in the center"),
}
_TEMPLATES = (
    "{count} {size} {colour} {shape} {where} on a {bg} background",
    "there {be} {count} {size} {colour} {shape} {where} of the image",
    "a {bg} picture with {count} {size} {colour} {shape} {where}",
    "{count} {colour} {shape} of {size} size {where}",
    "a {bg} image showing {count} {size} {colour} {shape} {where}",
)
_SUPERSAMPLE = 4  # draw large, then downscale: clean edges even at 32 px


@dataclass(frozen=True)
class Scene:
    count: int
    size: str
    colour: str
    shape: str
    position: str
    background: str


def random_scene(rng: random.Random) -> Scene:
    return Scene(count=rng.randint(1, 3), size=rng.choice(list(SIZES)), colour=rng.choice(list(COLOURS)),
                 shape=rng.choice(SHAPES), position=rng.choice(list(POSITIONS)),
                 background=rng.choice(list(BACKGROUNDS)))


def _plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return shape + ("es" if shape.endswith("s") else "s")


def scene_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` references for one scene, cycling through the templates with random synonyms."""
    out = []
    for i in range(n):
        template = _TEMPLATES[i % len(_TEMPLATES)]
        out.append(template.format(
            count=rng.choice(_COUNT_WORDS[scene.count]), size=rng.choice(_SIZE_WORDS[scene.size]),
            colour=scene.colour, shape=_plural(scene.shape, scene.count),
            where=rng.choice(_POSITION_PHRASES[scene.position]), bg=scene.background,
            be="is" if scene.count == 1 else "are"))
    return out


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.94, cy + r * 0.8), (cx - r * 0.94, cy + r * 0.8)]
    # cross: a plus sign with arms one third of the diameter thick
    t = r / 3
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t)]


def draw_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    diameter = SIZES[scene.size]
    spacing = diameter * 1.25  # centres further apart than a diameter: shapes never touch
    ax, ay, axis = POSITIONS[scene.position]
    shift_along = rng.uniform(-0.03, 0.03)
    for k in range(scene.count):
        offset = (k - (scene.count - 1) / 2) * spacing + shift_along
        across = rng.uniform(-0.03, 0.03)
        cx, cy = (ax + offset, ay + across) if axis == "x" else (ax + across, ay + offset)
        cx, cy, r = cx * big, cy * big, diameter * big / 2
        fill = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif scene.shape == "square":
            s = r * 0.85  # a square of the same diameter looks bigger than the circle; even them out
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        else:
            draw.polygon(_shape_polygon(scene.shape, cx, cy, r), fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _item_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"beit3cap-synth/{seed}/{split}/{index}")


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, "JPEG", quality=95)
    else:
        img.save(path, "PNG")


def _scene_item(seed: int, split: str, index: int, image_size: int, n_captions: int
                ) -> tuple[Scene, Image.Image, list[str]]:
    rng = _item_rng(seed, split, index)
    scene = random_scene(rng)
    return scene, draw_scene(scene, image_size, rng), scene_captions(scene, rng, n_captions)


def synth_captions(n_scenes: int = 2000, seed: int = 0) -> list[str]:
    """Captions in the synthetic grammar (every template, synonym and WTS sentence), e.g. to train a
    sentencepiece model before any tree exists."""
    out = []
    for i in range(n_scenes):
        rng = _item_rng(seed, "corpus", i)
        scene = random_scene(rng)
        out += scene_captions(scene, rng)
        out.append(_wts_caption(scene, rng))
    return out


# ---------------------------------------------------------------------------------------------- COCO

def make_coco_tree(root: str | os.PathLike, *, n_train: int = 200, n_val: int = 50, n_test: int = 50,
                   image_size: int = 64, seed: int = 0, n_captions: int = 5) -> Path:
    """Write ``train2014/``, ``val2014/`` and a Karpathy ``dataset_coco.json`` under ``root``.

    Every fourth training image is a ``restval`` image from ``val2014/`` (as in the real split), so
    ``n_train`` counts train + restval. Val and test images live in ``val2014/``.
    """
    root = Path(root)
    plan = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)] \
        + [("test", i) for i in range(n_test)]
    images, sentid = [], 0
    for imgid, (split, i) in enumerate(plan):
        cocoid = imgid + 1  # COCO ids start at 1
        karpathy_split = "restval" if split == "train" and i % 4 == 3 else split
        folder = "train2014" if karpathy_split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        _, img, captions = _scene_item(seed, split, i, image_size, n_captions)
        _save(img, root / folder / filename)
        sentences = [{"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": sentid + k}
                     for k, c in enumerate(captions)]
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                       "imgid": imgid, "split": karpathy_split, "sentences": sentences, "cocoid": cocoid})
        sentid += len(sentences)
    (root / "train2014").mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return root


# -------------------------------------------------------------------------------------------- NoCaps

def make_nocaps_tree(root: str | os.PathLike, *, n_val: int = 50, n_test: int = 50, image_size: int = 64,
                     seed: int = 0, n_captions: int = 10, n_train: int = 0) -> Path:
    """Write ``val/``, ``test/``, ``nocaps_val_4500_captions.json`` and ``nocaps_test_image_info.json``.

    NoCaps trains on COCO (spec §5.2): with ``n_train > 0`` a COCO tree (train + restval only) is
    written into the same root so ``--task nocaps`` runs end to end.
    """
    root = Path(root)
    domains = ("in-domain", "near-domain", "out-domain")
    val_images, annotations, test_images = [], [], []
    for split, n, images in (("val", n_val, val_images), ("test", n_test, test_images)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = _item_rng(seed, f"nocaps-{split}", i)
            open_images_id = f"{rng.getrandbits(64):016x}"
            _, img, captions = _scene_item(seed, f"nocaps-{split}", i, image_size, n_captions)
            _save(img, root / split / f"{open_images_id}.jpg")
            image_id = i if split == "val" else 4500 + i  # distinct id ranges, like the real sets
            images.append({"id": image_id, "file_name": f"{open_images_id}.jpg", "open_images_id": open_images_id,
                           "height": image_size, "width": image_size, "domain": domains[i % 3]})
            if split == "val":
                annotations += [{"image_id": image_id, "id": len(annotations) + k, "caption": c}
                                for k, c in enumerate(captions)]
    info = {"description": "beit3cap generated NoCaps-style data"}
    atomic_write_json(root / "nocaps_val_4500_captions.json",
                      {"licenses": [], "info": info, "images": val_images, "annotations": annotations})
    atomic_write_json(root / "nocaps_test_image_info.json",
                      {"licenses": [], "info": info, "images": test_images})
    if n_train > 0:
        make_coco_tree(root, n_train=n_train, n_val=0, n_test=0, image_size=image_size, seed=seed)
    return root


# ----------------------------------------------------------------------------------------------- WTS

WTS_CAPTION_TYPES = ("moving", "pedestrian_description", "position", "road", "weather")


def _wts_caption(scene: Scene, rng: random.Random) -> str:
    """A longer, single description in the spirit of the WTS phase captions."""
    where = rng.choice(_POSITION_PHRASES[scene.position])
    return (f"the scene shows {_COUNT_WORDS[scene.count][0]} {_SIZE_WORDS[scene.size][0]} {scene.colour} "
            f"{_plural(scene.shape, scene.count)} {where} of the frame on a {scene.background} background")


def make_wts_tree(root: str | os.PathLike, *, n_train: int = 20, n_val: int = 5, phases: int = 5,
                  image_size: int = 64, seed: int = 0, ext: str = ".png", prefix: str = "",
                  kind: str = "vehicle", caption_types: tuple[str, ...] = ("moving",)) -> Path:
    """Write a WTS-style tree: ``avg_normal_244_{train,test}/<prefix><video>phase<label><ext>`` and
    ``<kind>_caption/{train,val}/<kind>_caption_<type>_datasets.json`` per caption type.

    ``n_train``/``n_val`` count videos; each video has ``phases`` phase images, one caption each (the
    same images serve every caption type). ``ext`` is ``.png`` (what the fork's code looks for) or
    ``.jpg`` (what its README shows).
    """
    root = Path(root)
    for split, n, image_dir in (("train", n_train, "avg_normal_244_train"), ("val", n_val, "avg_normal_244_test")):
        per_type: dict[str, dict] = {t: {} for t in caption_types}
        for v in range(n):
            video = f"2023{v // 20 + 7:02d}07_{v % 20:02d}_SY{v % 7}_T1_Camera{v % 4 + 1}_{split}{v}"
            for t in caption_types:
                per_type[t][video] = {"caption": [], "videos": [f"{video}.mp4"]}
            for label in range(phases):
                scene, img, _ = _scene_item(seed, f"wts-{split}", v * phases + label, image_size, 0)
                _save(img, root / image_dir / f"{prefix}{video}phase{label}{ext}")
                for t in caption_types:  # same scene, independently worded per caption type
                    rng = _item_rng(seed, f"wts-{split}-{t}", v * phases + label)
                    per_type[t][video]["caption"].append({"caption": _wts_caption(scene, rng), "label": label})
        (root / image_dir).mkdir(parents=True, exist_ok=True)
        for t, data in per_type.items():
            atomic_write_json(root / f"{kind}_caption" / split / f"{kind}_caption_{t}_datasets.json", data)
    return root


