"""Generated datasets: seed layouts, determinism, and captions that say what the pixels show."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3cap.data.synth import (BACKGROUNDS, COLOURS, SHAPES, draw_scene, make_coco_tree, make_nocaps_tree,
                                 make_wts_tree, random_scene, scene_captions, synth_captions)

REPO = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_coco_layout(tmp_path):
    root = make_coco_tree(tmp_path, n_train=8, n_val=2, n_test=3, image_size=32, seed=0)
    data = json.loads((root / "dataset_coco.json").read_text())
    splits = [e["split"] for e in data["images"]]
    assert {s: splits.count(s) for s in set(splits)} == {"train": 6, "restval": 2, "val": 2, "test": 3}
    assert len({e["cocoid"] for e in data["images"]}) == 13
    sentids = [s["sentid"] for e in data["images"] for s in e["sentences"]]
    assert len(sentids) == len(set(sentids)) == 13 * 5
    for e in data["images"]:
        assert e["filepath"] == ("train2014" if e["split"] == "train" else "val2014")
        assert re.fullmatch(rf"COCO_{e['filepath']}_{e['cocoid']:012d}\.jpg", e["filename"])
        with Image.open(root / e["filepath"] / e["filename"]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
        assert [s["tokens"] for s in e["sentences"]] == [s["raw"].split() for s in e["sentences"]]
    assert len(list(root.rglob("*.jpg"))) == 13


def test_same_seed_same_bytes_in_another_process(tmp_path):
    make_coco_tree(tmp_path / "a", n_train=4, n_val=2, n_test=2, image_size=32, seed=5)
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "beit3cap", "synth", "coco", "--out", str(tmp_path / "b"), "--n-train", "4",
                    "--n-val", "2", "--n-test", "2", "--image-size", "32", "--seed", "5"], check=True, env=env,
                   capture_output=True)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a == b and len(a) == 9
    make_coco_tree(tmp_path / "c", n_train=4, n_val=2, n_test=2, image_size=32, seed=6)
    c = snapshot(tmp_path / "c")
    assert c.keys() == a.keys() and c["dataset_coco.json"] != a["dataset_coco.json"]
    assert sum(c[k] != a[k] for k in a if k.endswith(".jpg")) >= 6


def test_nocaps_and_wts_are_deterministic(tmp_path):
    for name in ("a", "b"):
        make_nocaps_tree(tmp_path / name / "nocaps", n_val=3, n_test=2, image_size=32, seed=2)
        make_wts_tree(tmp_path / name / "wts", n_train=2, n_val=1, phases=2, image_size=32, seed=2, ext=".jpg")
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_an_image_does_not_depend_on_split_sizes(tmp_path):
    make_coco_tree(tmp_path / "small", n_train=4, n_val=0, n_test=0, image_size=32)
    make_coco_tree(tmp_path / "large", n_train=12, n_val=3, n_test=3, image_size=32)
    name = "train2014/COCO_train2014_000000000001.jpg"
    assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "large" / name).read_bytes()


def test_nocaps_layout(tmp_path):
    root = make_nocaps_tree(tmp_path, n_val=4, n_test=3, image_size=48, n_train=4)
    val = json.loads((root / "nocaps_val_4500_captions.json").read_text())
    test = json.loads((root / "nocaps_test_image_info.json").read_text())
    assert "annotations" not in test
    ids = [im["id"] for im in val["images"] + test["images"]]
    assert len(ids) == len(set(ids)) == 7
    for split, info in (("val", val), ("test", test)):
        for im in info["images"]:
            assert re.fullmatch(r"[0-9a-f]{16}\.jpg", im["file_name"])
            assert Image.open(root / split / im["file_name"]).size == (48, 48)
    per_image = [sum(a["image_id"] == im["id"] for a in val["annotations"]) for im in val["images"]]
    assert per_image == [10] * 4
    assert len({a["id"] for a in val["annotations"]}) == 40
    # NoCaps trains on COCO: the COCO training tree is in the same root
    karpathy = json.loads((root / "dataset_coco.json").read_text())["images"]
    assert {e["split"] for e in karpathy} <= {"train", "restval"} and len(karpathy) == 4


@pytest.mark.parametrize("ext,prefix", [(".png", ""), (".jpg", "avg")])
def test_wts_layout(tmp_path, ext, prefix):
    root = make_wts_tree(tmp_path, n_train=3, n_val=2, phases=4, image_size=32, ext=ext, prefix=prefix,
                         kind="pedestrian", caption_types=("moving", "weather"))
    for split, image_dir in (("train", "avg_normal_244_train"), ("val", "avg_normal_244_test")):
        for ctype in ("moving", "weather"):
            data = json.loads((root / f"pedestrian_caption/{split}/pedestrian_caption_{ctype}_datasets.json").read_text())
            assert len(data) == (3 if split == "train" else 2)
            for value in data.values():
                assert list(value) == ["caption", "videos"] and len(value["videos"]) == 1
                assert value["videos"][0].endswith(".mp4")
                assert [c["label"] for c in value["caption"]] == [0, 1, 2, 3]
                stem = value["videos"][0][:-4]
                for c in value["caption"]:
                    assert isinstance(c["caption"], str) and len(c["caption"].split()) >= 12
                    assert (root / image_dir / f"{prefix}{stem}phase{c['label']}{ext}").is_file()
    assert len(list((root / "avg_normal_244_train").iterdir())) == 12


# ------------------------------------------------------------------------- captions follow the pixels

def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Pixel coordinates of each 8-connected component."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, pixels = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            pixels.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _shape_parts(scene, size: int, rng: random.Random) -> tuple[np.ndarray, list[np.ndarray]]:
    pixels = np.asarray(draw_scene(scene, size, rng)).astype(int)
    mask = np.abs(pixels - np.array(BACKGROUNDS[scene.background])).sum(-1) > 90
    return pixels[mask], _components(mask)


def test_pixels_show_what_the_captions_say():
    """Count, colour, position and size are measurable at 64 px; shape is checked at 128 px, where the
    small shapes are big enough for simple geometry (fill of the bounding box, centre of mass)."""
    size = 64
    for i in range(80):
        rng = random.Random(i)
        scene = random_scene(rng)
        state = rng.getstate()
        shape_pixels, parts = _shape_parts(scene, size, rng)
        assert len(parts) == scene.count, (i, scene)
        palette = np.array(list(COLOURS.values()))
        nearest = np.abs(shape_pixels[:, None] - palette[None]).sum(-1).argmin(1)
        votes = np.bincount(nearest, minlength=len(palette))
        assert list(COLOURS)[votes.argmax()] == scene.colour, (i, scene, votes)
        cy, cx = np.concatenate(parts).mean(0) / size
        region = {"left": cx < 0.35, "right": cx > 0.65, "top": cy < 0.35, "bottom": cy > 0.65,
                  "middle": 0.35 < cx < 0.65 and 0.35 < cy < 0.65}
        assert region[scene.position], (i, scene, cx, cy)
        area = np.mean([len(p) for p in parts]) / size**2
        assert (area < 0.021) if scene.size == "small" else (area > 0.021), (i, scene, area)

        rng.setstate(state)
        _, parts = _shape_parts(scene, 128, rng)
        for part in parts:
            height, width = np.ptp(part, axis=0) + 1
            fill = len(part) / (height * width)
            centre = (part[:, 0].mean() - part[:, 0].min() + 0.5) / height  # triangles are bottom-heavy
            shape_ok = {"circle": 0.7 < fill < 0.86 and centre < 0.55, "square": fill > 0.9,
                        "triangle": centre > 0.6, "cross": fill < 0.68 and centre < 0.55}
            assert [k for k, ok in shape_ok.items() if ok] == [scene.shape], (i, scene, fill, centre)


def test_captions_name_every_attribute():
    plural = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
    where = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "middle": ("middle", "center")}
    counts = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
    for i in range(50):
        rng = random.Random(i)
        scene = random_scene(rng)
        captions = scene_captions(scene, rng)
        assert len(captions) == 5 and len(set(captions)) == 5
        for c in captions:
            words = c.split()
            assert 7 <= len(words) <= 14, c
            assert scene.colour in words
            assert (scene.shape if scene.count == 1 else plural[scene.shape]) in words
            assert any(w in words for w in counts[scene.count])
            assert any(w in words for w in (where[scene.position] if scene.position == "middle"
                                            else (where[scene.position],)))
        assert sum(scene.background in c.split() for c in captions) >= 3


def test_synth_captions_cover_the_vocabulary():
    words = {w for c in synth_captions(300) for w in c.split()}
    assert set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) <= words
    assert {"circles", "crosses", "left", "right", "top", "bottom", "middle", "center", "small", "little",
            "large", "big", "one", "two", "three"} <= words
    assert synth_captions(20, seed=1) == synth_captions(20, seed=1) != synth_captions(20, seed=2)


def test_synth_and_spm_commands(tmp_path, capsys):
    from beit3cap.cli import main
    from beit3cap.tokenizer import encode, load_tokenizer

    assert main(["synth", "wts", "--out", str(tmp_path / "wts"), "--n-train", "2", "--n-val", "1",
                 "--image-size", "32", "--phases", "2", "--ext", ".jpg"]) == 0
    assert len(list((tmp_path / "wts/avg_normal_244_train").glob("*.jpg"))) == 4
    assert main(["synth", "nocaps", "--out", str(tmp_path / "nc"), "--n-val", "2", "--n-test", "1",
                 "--image-size", "32"]) == 0
    assert main(["spm", str(tmp_path / "nc/nocaps_val_4500_captions.json"),
                 str(tmp_path / "wts/vehicle_caption/train/vehicle_caption_moving_datasets.json"),
                 "--output", str(tmp_path / "m.spm"), "--vocab-size", "100"]) == 0
    assert "pieces from 24 captions" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "m.spm")
    assert 3 not in encode(tok, "two red circles on the left")
    (tmp_path / "bad.json").write_text("{nope")
    assert main(["spm", str(tmp_path / "bad.json"), "--output", str(tmp_path / "x.spm")]) == 1
    assert "bad.json: cannot read captions (malformed JSON" in capsys.readouterr().err
