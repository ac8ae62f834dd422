"""Captioning real image files of every awkward kind, through the Python API and the CLI.

A tiny model with random weights is saved as a checkpoint in the official layout; its EOS row is pushed
down so captions are never empty. A folder holds JPEG/PNG/BMP files in modes L, RGBA, P (with
transparency), I;16, an EXIF-rotated JPEG, a 4000x3000 JPEG, a corrupt JPEG and a text file.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit3cap.captioner import Captioner, find_images, load_image
from beit3cap.data.transforms import ImageLoadError
from beit3cap.generate import generate
from beit3cap.model import EOS_ID, create_model
from beit3cap.tokenizer import decode, load_tokenizer

MODEL = "beit3_tiny_patch16_32"
GOOD = ["rgb.jpg", "gray.png", "rgba.png", "palette.png", "sixteen.png", "rotated.jpg", "big.jpg",
        "nested/deeper/small.bmp"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_vocab):
    torch.manual_seed(0)
    model = create_model(MODEL, vocab_size=tiny_vocab)
    with torch.no_grad():
        model.mlm_head.weight.mul_(20.0)
        model.mlm_head.bias[EOS_ID] = -100.0
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "args": {"model": MODEL, "vocab_size": tiny_vocab}}, path)
    return path


def _gradient(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rgb = Image.fromarray(_gradient(60, 40))
    rgb.save(root / "rgb.jpg", quality=90)
    rgb.convert("L").save(root / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(60)[None, :] < 30, 0, 255).repeat(40, 0).astype(np.uint8)))
    rgba.save(root / "rgba.png")
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)).save(root / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(root / "rotated.jpg", exif=exif)
    Image.fromarray(np.kron(_gradient(40, 30), np.ones((100, 100, 1), dtype=np.uint8))).save(root / "big.jpg")
    (root / "nested" / "deeper").mkdir(parents=True)
    rgb.resize((20, 20)).save(root / "nested" / "deeper" / "small.bmp")
    data = (root / "rgb.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(data[:200] + bytes(range(256)) * 4)
    (root / "notes.txt").write_text("not an image\n")
    return root


# ----------------------------------------------------------------------------------------------------
# Loading


def test_every_mode_loads_as_8bit_rgb(image_dir):
    for name in GOOD:
        img = load_image(image_dir / name)
        assert img.mode == "RGB", name
    assert load_image(image_dir / "rotated.jpg").size == (40, 60)  # EXIF orientation applied
    assert load_image(image_dir / "big.jpg").size == (4000, 3000)
    rgba = np.asarray(load_image(image_dir / "rgba.png"))
    assert (rgba[:, :30] == 255).all()  # transparent half laid over white
    sixteen = np.asarray(load_image(image_dir / "sixteen.png"))[..., 0].astype(int)
    assert 100 < sixteen.max() <= 255 and len(np.unique(sixteen)) > 50  # scaled, not clipped to white


def test_corrupt_missing_and_oversized_files_are_named(image_dir, monkeypatch):
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        load_image(image_dir / "corrupt.jpg")
    with pytest.raises(ImageLoadError, match="missing.png: no such file"):
        load_image(image_dir / "missing.png")
    with pytest.raises(ImageLoadError, match="notes.txt: cannot read image"):
        load_image(image_dir / "notes.txt")
    with pytest.raises(ImageLoadError, match="big.jpg: 4000x3000 is 12 megapixels, above the limit of 5"):
        load_image(image_dir / "big.jpg", max_pixels=5_000_000)
    # PIL's own decompression-bomb limit does not apply to our reads, and stays as it was.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(image_dir / "big.jpg")
    assert load_image(image_dir / "big.jpg").size == (4000, 3000)
    assert Image.MAX_IMAGE_PIXELS == 1_000_000


def test_huge_jpegs_are_decoded_at_reduced_scale(image_dir):
    img = load_image(image_dir / "big.jpg", input_size=32, draft_above=1_000_000)
    assert 4 * 32 <= min(img.size) and img.size[0] < 4000
    assert load_image(image_dir / "rgb.jpg", input_size=32, draft_above=1_000).size == (60, 40)  # already small


def test_find_images_expands_folders_globs_and_reports_misses(image_dir):
    paths, problems = find_images([image_dir, str(image_dir / "*.jpg"), image_dir / "notes.txt",
                                   image_dir / "nope.png", str(image_dir / "*.gif")])
    names = [p.relative_to(image_dir).as_posix() for p in paths]
    assert sorted(names) == sorted(GOOD + ["corrupt.jpg", "notes.txt"])  # the folder finds no .txt; naming it does
    assert len(names) == len(set(names))
    assert [r.error.split(": ", 1)[1] for r in problems] == ["no such file or folder",
                                                             "no image files match this pattern"]


# ----------------------------------------------------------------------------------------------------
# Python API


def test_captioner_captions_every_good_file_and_reports_the_corrupt_one(checkpoint, spm_path, image_dir):
    captioner = Captioner.from_checkpoint(checkpoint, spm_path, num_beams=2, max_len=8, forbid_special=True)
    files = [image_dir / n for n in GOOD] + [image_dir / "corrupt.jpg"]
    results = captioner.caption_files(files, batch_size=3)
    assert [r.source for r in results] == [os.fspath(f) for f in files]
    for r in results[:-1]:
        assert r.error is None and isinstance(r.caption, str) and r.caption.strip(), r
        assert r.score is not None and r.score < 0
    assert results[-1].caption is None and "corrupt.jpg" in results[-1].error
    # Batch composition does not change captions, and they are exactly what generate + decode give.
    one_by_one = captioner.caption_files(files[:4], batch_size=1)
    assert [r.caption for r in one_by_one] == [r.caption for r in results[:4]]
    tensor = captioner.transform(load_image(files[0]))[None]
    ids = generate(captioner.model, tensor, num_beams=2, max_len=8, mask_token_id=captioner.tokenizer.mask_token_id,
                   forbid_ids=captioner._generate_kwargs({"forbid_special": True})["forbid_ids"])
    assert decode(captioner.tokenizer, ids[0]) == results[0].caption


def test_caption_accepts_pil_images_and_raises_on_bad_files(checkpoint, spm_path, image_dir, tokenizer):
    from beit3cap.checkpoint import model_from_checkpoint
    model, _ = model_from_checkpoint(checkpoint)
    captioner = Captioner(model, tokenizer, input_size=32, max_len=6, strategy="greedy")
    pil = Image.open(image_dir / "rgb.jpg")
    caps = captioner.caption([pil, image_dir / "rgb.jpg"])
    assert len(caps) == 2 and caps[0] == caps[1]
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        captioner.caption([image_dir / "rgb.jpg", image_dir / "corrupt.jpg"])
    with pytest.raises(ValueError, match="input_size 224"):
        Captioner(model, tokenizer, input_size=224)
    sampled = [captioner.caption([pil], strategy="sample", seed=s, temperature=2.0)[0] for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]


# ----------------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m beit3cap caption ...`` in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "beit3cap", "caption", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def _in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command run in this process (saves a child's start-up time)."""
    from beit3cap.cli import main
    code = main(["caption", *map(str, args)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_cli_prints_captions_and_reports_errors(checkpoint, spm_path, image_dir, tmp_path, capsys):
    common = ["--checkpoint", checkpoint, "--sentencepiece_model", spm_path, "--num_beams", "2", "--max_len", "8",
              "--forbid_special", "--batch_size", "4"]
    run = _cli(image_dir, *common)
    assert run.returncode == 1, run.stderr  # the corrupt file failed
    lines = dict(line.split("\t") for line in run.stdout.splitlines())
    assert sorted(Path(p).relative_to(image_dir).as_posix() for p in lines) == sorted(GOOD)
    assert all(c.strip() for c in lines.values())
    assert "corrupt.jpg: cannot read image" in run.stderr

    out = tmp_path / "caps.jsonl"
    run = _in_process(capsys, image_dir / "*.png", image_dir / "rotated.jpg", "--output", out, *common)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["gray.png", "palette.png", "rgba.png", "sixteen.png",
                                                     "rotated.jpg"]
    assert all(r["caption"] and r["error"] is None for r in rows)
    assert {Path(k).name: v for k, v in lines.items()}["rotated.jpg"] == rows[-1]["caption"]

    out = tmp_path / "caps.csv"
    run = _in_process(capsys, image_dir / "corrupt.jpg", image_dir / "gray.png", image_dir / "absent.jpg",
                      "--output", out, *common)
    assert run.returncode == 1
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == {"corrupt.jpg", "gray.png", "absent.jpg"}
    assert by_name["gray.png"]["caption"] and not by_name["gray.png"]["error"]
    assert "no such file" in by_name["absent.jpg"]["error"] and "cannot read" in by_name["corrupt.jpg"]["error"]


def test_cli_ends_quietly_when_the_reader_stops(checkpoint, spm_path, image_dir):
    """`beit3cap caption dir | head -1`: the first caption arrives, then no traceback and no error message."""
    proc = subprocess.Popen([sys.executable, "-m", "beit3cap", "caption", str(image_dir), "--checkpoint",
                             str(checkpoint), "--sentencepiece_model", str(spm_path), "--batch_size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1
    assert "\t" in first
    assert "Broken pipe" not in stderr and "Traceback" not in stderr


def test_cli_bad_inputs_exit_2(checkpoint, spm_path, image_dir, tmp_path, capsys):
    run = _in_process(capsys, image_dir / "gray.png", "--checkpoint", tmp_path / "none.pth",
                      "--sentencepiece_model", spm_path)
    assert run.returncode == 2 and "none.pth" in run.stderr
    run = _in_process(capsys, tmp_path / "nothing-here", "--checkpoint", checkpoint, "--sentencepiece_model", spm_path)
    assert run.returncode == 1 and "nothing-here: no such file or folder" in run.stderr
    with pytest.raises(SystemExit) as exit_info:
        _in_process(capsys, image_dir / "gray.png", "--checkpoint", checkpoint, "--sentencepiece_model", spm_path,
                    "--output", tmp_path / "x.txt")
    assert exit_info.value.code == 2 and ".jsonl or .csv" in capsys.readouterr().err
