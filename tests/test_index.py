"""Index builders: the seed snippets run as written, the exact file formats, the custom table format,
bad input (clear errors or counted skips) and atomic writes."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beit3cap.data.index import (DataError, make_coco_captioning_index, make_custom_index,
                                 make_nocaps_captioning_index, make_wts_index, read_index)
from beit3cap.data.synth import make_coco_tree, make_nocaps_tree, make_wts_tree
from beit3cap.tokenizer import encode

REPO = Path(__file__).resolve().parents[1]
KEYS = ["image_path", "text_segment", "image_id"]


def run_snippet(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def index_lines(path: Path) -> list[dict]:
    """Rows, checking the on-disk form: key order and json.dumps' default separators."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert list(row) == KEYS
        assert line == json.dumps(row, indent=None)
        rows.append(row)
    return rows


def gt_refs(path: Path) -> dict[int, list[str]]:
    gt = json.loads(path.read_text(encoding="utf-8"))
    refs: dict[int, list[str]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
    return refs


@pytest.fixture
def small_coco(tmp_path):
    return make_coco_tree(tmp_path / "coco", n_train=8, n_val=3, n_test=3, image_size=32, seed=1)


# ------------------------------------------------------------------------------------- seed snippets

COCO_SNIPPET = '''
from datasets import CaptioningDataset
from transformers import XLMRobertaTokenizer

tokenizer = XLMRobertaTokenizer("{spm}")

CaptioningDataset.make_coco_captioning_dataset_index(
    data_path="{data}",
    tokenizer=tokenizer,
)
'''

NOCAPS_SNIPPET = '''
from datasets import CaptioningDataset
from transformers import XLMRobertaTokenizer

tokenizer = XLMRobertaTokenizer("{spm}")

CaptioningDataset.make_nocaps_captioning_dataset_index(
    data_path="{data}",
)
'''

WTS_SNIPPET = '''
from datasets import CaptioningDataset, _make_captioning_coco_karpathy_dataset_index
from transformers import XLMRobertaTokenizer

tokenizer = XLMRobertaTokenizer("{spm}")

_make_captioning_coco_karpathy_dataset_index(
   data_path="{val_json}", 
   tokenizer=tokenizer,
   image_dir="{val_dir}",
   split_name="val",
   type=""
)
_make_captioning_coco_karpathy_dataset_index(
   data_path="{train_json}", 
   tokenizer=tokenizer,
   image_dir="{train_dir}",
   split_name="train",
   type=""
)
'''


TORCH_FREE_CHECK = """
import sys
import datasets, beit3cap.data.index, beit3cap.data.synth
assert "torch" not in sys.modules, "the shim, index or synth imported torch"
print("shim:", datasets.__file__)
"""


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, spm_path):
    """The COCO and NoCaps snippets, each as written (paths changed), in one interpreter started at the
    repository root where ``datasets.py`` shadows HuggingFace ``datasets``."""
    tmp = tmp_path_factory.mktemp("seed")
    coco = make_coco_tree(tmp / "coco", n_train=8, n_val=3, n_test=3, image_size=32, seed=1)
    nocaps = make_nocaps_tree(tmp / "nocaps", n_val=4, n_test=3, image_size=32)
    proc = run_snippet(TORCH_FREE_CHECK + COCO_SNIPPET.format(spm=spm_path, data=coco)
                       + NOCAPS_SNIPPET.format(spm=spm_path, data=nocaps), cwd=REPO)
    return coco, nocaps, proc.stdout


def test_shim_keeps_transformers_importable_and_index_torch_free(seed_run):
    assert f"shim: {REPO / 'datasets.py'}" in seed_run[2]  # and transformers imported fine after it


def test_coco_seed_snippet(seed_run, tokenizer):
    small_coco, _, stdout = seed_run
    assert "coco_captioning.train.jsonl: 40 rows" in stdout
    karpathy = json.loads((small_coco / "dataset_coco.json").read_text())["images"]
    assert {e["split"] for e in karpathy} == {"train", "restval", "val", "test"}
    train = index_lines(small_coco / "coco_captioning.train.jsonl")
    expected = [{"image_path": f"{e['filepath']}/{e['filename']}", "text_segment": encode(tokenizer, s["raw"]),
                 "image_id": e["cocoid"]}
                for e in karpathy if e["split"] in ("train", "restval") for s in e["sentences"]]
    assert train == expected and len(train) == 8 * 5
    for split in ("val", "test"):
        rows = index_lines(small_coco / f"coco_captioning.{split}.jsonl")
        entries = [e for e in karpathy if e["split"] == split]
        assert rows == [{"image_path": f"{e['filepath']}/{e['filename']}", "text_segment": None,
                         "image_id": e["cocoid"]} for e in entries]
        assert gt_refs(small_coco / f"coco_karpathy_{split}_gt.json") == {
            e["cocoid"]: [s["raw"] for s in e["sentences"]] for e in entries}


def test_nocaps_seed_snippet(seed_run):
    root = seed_run[1]
    val_info = json.loads((root / "nocaps_val_4500_captions.json").read_text())
    test_info = json.loads((root / "nocaps_test_image_info.json").read_text())
    assert index_lines(root / "nocaps.val.jsonl") == [
        {"image_path": f"val/{im['file_name']}", "text_segment": None, "image_id": im["id"]} for im in val_info["images"]]
    assert index_lines(root / "nocaps.test.jsonl") == [
        {"image_path": f"test/{im['file_name']}", "text_segment": None, "image_id": im["id"]}
        for im in test_info["images"]]
    refs = gt_refs(root / "nocaps_val_gt.json")
    assert sum(map(len, refs.values())) == len(val_info["annotations"]) == 4 * 10
    assert refs[val_info["images"][0]["id"]][0] == val_info["annotations"][0]["caption"]


def test_wts_seed_snippet_writes_to_cwd(tmp_path, spm_path, tokenizer):
    root = make_wts_tree(tmp_path / "wts", n_train=2, n_val=1, phases=3, image_size=32)
    cwd = tmp_path / "work"
    cwd.mkdir()
    train_json = root / "vehicle_caption/train/vehicle_caption_moving_datasets.json"
    val_json = root / "vehicle_caption/val/vehicle_caption_moving_datasets.json"
    run_snippet(WTS_SNIPPET.format(spm=spm_path, train_json=train_json, val_json=val_json,
                                   train_dir=root / "avg_normal_244_train", val_dir=root / "avg_normal_244_test"), cwd)
    assert sorted(p.name for p in cwd.iterdir()) == [
        "coco_captioning.train.jsonl", "coco_captioning.val.jsonl", "coco_karpathy_val_gt.json"]
    data = json.loads(train_json.read_text())
    expected_paths = [f"{root}/avg_normal_244_train/{Path(v).stem}phase{c['label']}.png"
                      for item in data.values() for c in item["caption"] for v in item["videos"]]
    train = index_lines(cwd / "coco_captioning.train.jsonl")
    assert [r["image_path"] for r in train] == expected_paths
    assert [r["image_id"] for r in train] == list(range(6))
    assert train[0]["text_segment"] == encode(tokenizer, next(iter(data.values()))["caption"][0]["caption"])
    val = index_lines(cwd / "coco_captioning.val.jsonl")
    assert [r["text_segment"] for r in val] == [None] * 3
    val_data = json.loads(val_json.read_text())
    assert list(gt_refs(cwd / "coco_karpathy_val_gt.json").values()) == [
        [c["caption"]] for item in val_data.values() for c in item["caption"]]


# ---------------------------------------------------------------------------------------------- WTS

def test_wts_fixes_of_the_fork(tmp_path, tokenizer, caplog):
    root = make_wts_tree(tmp_path / "wts", n_train=2, n_val=0, phases=2, image_size=32, ext=".jpg", prefix="avg")
    src = root / "vehicle_caption/train/vehicle_caption_moving_datasets.json"
    data = json.loads(src.read_text())
    first_key = next(iter(data))
    # a second entry naming the same video and phase: same image, so the same id
    data["again"] = {"caption": [{"caption": "a second description", "label": 0}], "videos": data[first_key]["videos"]}
    data["gone"] = {"caption": [{"caption": "no such image", "label": 9}], "videos": ["missing_video.mp4"]}
    src.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        summary = make_wts_index(src, tokenizer, root / "avg_normal_244_train", type="avg", out_dir=tmp_path)
    rows = index_lines(tmp_path / "coco_captioning.train.jsonl")
    assert len(rows) == 5 and all(r["image_path"].endswith(".jpg") for r in rows)
    same = [r["image_id"] for r in rows if r["image_path"] == rows[0]["image_path"]]
    assert same == [0, 0]
    assert len({r["image_id"] for r in rows}) == len({r["image_path"] for r in rows}) == 4
    assert summary.missing_images == 1 and "missing_videophase9" in caplog.text
    with pytest.raises(DataError, match="none of the"):
        make_wts_index(src, tokenizer, root / "avg_normal_244_train", type="", out_dir=tmp_path)


# ------------------------------------------------------------------------------------------- custom

def _custom_tree(tmp_path: Path, n_images: int = 10) -> tuple[Path, list[dict]]:
    coco = make_coco_tree(tmp_path / "imgs", n_train=n_images, n_val=0, n_test=0, image_size=32)
    entries = json.loads((coco / "dataset_coco.json").read_text())["images"]
    rows = [{"image": f"{e['filepath']}/{e['filename']}", "caption": s["raw"]} for e in entries for s in e["sentences"][:2]]
    return coco, rows


def _write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("with_split", [False, True])
def test_custom_table(tmp_path, tokenizer, fmt, with_split):
    images, rows = _custom_tree(tmp_path)
    if with_split:
        for r in rows:
            n = int(r["image"][-8:-4])
            r["split"] = "test" if n <= 2 else "val" if n <= 4 else "train"
    table = _write_table(images / f"captions.{fmt}", rows)
    summary = make_custom_index(table, tokenizer, val_fraction=0.2, test_fraction=0.2, seed=3)
    out = {s: index_lines(images / f"coco_captioning.{s}.jsonl") for s in ("train", "val", "test")}
    counts = {s: len({r["image_id"] for r in out[s]}) for s in out}
    assert counts == {"train": 6, "val": 2, "test": 2}
    assert summary.images == counts and summary.captions == 12
    image_of = {}
    for split, split_rows in out.items():
        for r in split_rows:
            assert (images / r["image_path"]).is_file() and not Path(r["image_path"]).is_absolute()
            assert image_of.setdefault(r["image_path"], r["image_id"]) == r["image_id"]  # one id per image
            assert (r["text_segment"] is None) == (split != "train")
    assert len(set(image_of.values())) == len(image_of) == 10
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r["caption"])
    val_refs = gt_refs(images / "coco_karpathy_val_gt.json")
    assert val_refs == {r["image_id"]: by_image[r["image_path"]] for r in out["val"]}
    if with_split:
        assert {r["image_path"][-8:-4] for r in out["test"]} == {"0001", "0002"}
    else:  # the seeded split is reproducible and changes with the seed
        again = make_custom_index(table, tokenizer, data_path=tmp_path / "again", val_fraction=0.2,
                                  test_fraction=0.2, seed=3)
        assert again.images == summary.images
        other = make_custom_index(table, tokenizer, data_path=tmp_path / "other", val_fraction=0.2,
                                  test_fraction=0.2, seed=4)
        assert other.images == summary.images

        def test_ids(folder: Path) -> set[int]:
            return {r["image_id"] for r in index_lines(folder / "coco_captioning.test.jsonl")}
        assert test_ids(images) == test_ids(tmp_path / "again") != test_ids(tmp_path / "other")


def test_custom_counts_long_captions_but_stores_full_ids(tmp_path, tokenizer):
    images, rows = _custom_tree(tmp_path, n_images=3)
    long_caption = " ".join(["a big red circle on the left"] * 6)
    rows[0]["caption"] = long_caption
    for r in rows:
        r["split"] = "train"
    summary = make_custom_index(_write_table(images / "c.jsonl", rows), tokenizer, num_max_bpe_tokens=32)
    train = index_lines(images / "coco_captioning.train.jsonl")
    assert len(encode(tokenizer, long_caption)) > 30
    assert train[0]["text_segment"] == encode(tokenizer, long_caption)
    assert summary.truncated == sum(len(r["text_segment"]) > 30 for r in train) >= 1
    assert f"(truncated when training): {summary.truncated}" in str(summary)


def test_custom_image_dir_and_explicit_ids(tmp_path, tokenizer):
    images, rows = _custom_tree(tmp_path, n_images=4)
    for k, r in enumerate(rows):
        r["image_id"] = 1000 + k // 2
        r["split"] = "val" if k < 2 else "train"
    (tmp_path / "elsewhere").mkdir()
    table = _write_table(tmp_path / "elsewhere" / "t.csv", rows)
    make_custom_index(table, tokenizer, image_dir=images, data_path=tmp_path / "out")
    val = index_lines(tmp_path / "out" / "coco_captioning.val.jsonl")
    assert [r["image_id"] for r in val] == [1000]
    assert Path(val[0]["image_path"]).is_absolute() and Path(val[0]["image_path"]).is_file()


# ---------------------------------------------------------------------------------------- bad input

def test_missing_image_error_or_counted_skip(small_coco, tokenizer, caplog):
    karpathy = json.loads((small_coco / "dataset_coco.json").read_text())["images"]
    victim = small_coco / karpathy[2]["filepath"] / karpathy[2]["filename"]
    victim.unlink()
    with pytest.raises(DataError, match=r"dataset_coco\.json: images\[2\]: image not found: .*" + victim.name):
        make_coco_captioning_index(small_coco, tokenizer)
    with caplog.at_level(logging.WARNING):
        summary = make_coco_captioning_index(small_coco, tokenizer, skip_bad=True)
    assert summary.missing_images == 1 and len(summary.skipped) == 1 and victim.name in caplog.text
    assert len(index_lines(small_coco / "coco_captioning.train.jsonl")) == 7 * 5
    assert "missing images: 1; items skipped: 1" in str(summary)


def test_truncated_or_garbage_images_need_check_images(small_coco, tokenizer):
    karpathy = json.loads((small_coco / "dataset_coco.json").read_text())["images"]
    val = [e for e in karpathy if e["split"] == "val"]
    truncated = small_coco / val[0]["filepath"] / val[0]["filename"]
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage = small_coco / val[1]["filepath"] / val[1]["filename"]
    garbage.write_bytes(b"this is not an image")
    make_coco_captioning_index(small_coco, tokenizer)  # by default only existence is checked
    with pytest.raises(DataError, match=f"unreadable image .*{truncated.name}"):
        make_coco_captioning_index(small_coco, tokenizer, check_images=True)
    summary = make_coco_captioning_index(small_coco, tokenizer, check_images=True, skip_bad=True)
    assert len(summary.skipped) == 2 and summary.missing_images == 0
    assert summary.images["val"] == 1


def test_malformed_json_names_file_and_line(small_coco, tokenizer):
    path = small_coco / "dataset_coco.json"
    path.write_text('{"images": [\n  {"split": "train",\n  oops}\n]}')
    with pytest.raises(DataError, match=r"dataset_coco\.json:3:3: malformed JSON"):
        make_coco_captioning_index(small_coco, tokenizer)


def test_malformed_jsonl_line_error_or_skip(tmp_path, tokenizer):
    images, rows = _custom_tree(tmp_path, n_images=4)
    table = _write_table(images / "t.jsonl", rows)
    lines = table.read_text().splitlines()
    lines[2] = '{"image": "x.jpg", "caption": '
    lines[4] = '["not", "an", "object"]'
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:3: malformed JSON"):
        make_custom_index(table, tokenizer)
    summary = make_custom_index(table, tokenizer, skip_bad=True)
    assert [s.split(": ")[0][-9:] for s in summary.skipped] == ["t.jsonl:3", "t.jsonl:5"]
    assert summary.captions + sum(map(len, gt_refs(images / "coco_karpathy_val_gt.json").values())) \
        + sum(map(len, gt_refs(images / "coco_karpathy_test_gt.json").values())) == len(rows) - 2


def test_empty_caption_error_or_skip(small_coco, tokenizer):
    path = small_coco / "dataset_coco.json"
    data = json.loads(path.read_text())
    data["images"][0]["sentences"][1]["raw"] = "  "
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[0\]: empty or non-text caption"):
        make_coco_captioning_index(small_coco, tokenizer)
    summary = make_coco_captioning_index(small_coco, tokenizer, skip_bad=True)
    assert len(summary.skipped) == 1 and summary.captions == 8 * 5 - 1


def test_non_utf8_files(tmp_path, small_coco, tokenizer):
    images, rows = _custom_tree(tmp_path, n_images=3)
    table = _write_table(images / "t.csv", rows)
    lines = table.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"a", b"\xe9", 1)  # a Latin-1 byte
    table.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"t\.csv:4: not UTF-8"):
        make_custom_index(table, tokenizer)
    summary = make_custom_index(table, tokenizer, skip_bad=True)
    assert len(summary.skipped) == 1
    coco_json = small_coco / "dataset_coco.json"
    coco_json.write_bytes(b'{"images": [\n\n"\xff"]}')
    with pytest.raises(DataError, match=r"dataset_coco\.json:3: not UTF-8"):
        make_coco_captioning_index(small_coco, tokenizer)


def test_duplicate_image_ids(small_coco, tokenizer, tmp_path):
    path = small_coco / "dataset_coco.json"
    data = json.loads(path.read_text())
    data["images"][5]["cocoid"] = data["images"][1]["cocoid"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[5\]: duplicate image id .* images\[1\]"):
        make_coco_captioning_index(small_coco, tokenizer)
    summary = make_coco_captioning_index(small_coco, tokenizer, skip_bad=True)
    assert len(summary.skipped) == 1
    nocaps = make_nocaps_tree(tmp_path / "nc", n_val=3, n_test=2, image_size=32)
    info = json.loads((nocaps / "nocaps_test_image_info.json").read_text())
    info["images"][1]["id"] = info["images"][0]["id"]
    (nocaps / "nocaps_test_image_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"nocaps_test_image_info\.json: images\[1\]: duplicate image id"):
        make_nocaps_captioning_index(nocaps)
    images, rows = _custom_tree(tmp_path / "c", n_images=2)
    rows[0]["image_id"] = rows[2]["image_id"] = 7
    rows[1]["image_id"] = rows[3]["image_id"] = 7
    with pytest.raises(DataError, match=r"t\.jsonl:3: duplicate image id 7 \(first used at .*t\.jsonl:1\)"):
        make_custom_index(_write_table(images / "t.jsonl", rows), tokenizer)


def test_cli_reports_bad_input(tmp_path, tokenizer, spm_path, capsys):
    from beit3cap.cli import main

    images, rows = _custom_tree(tmp_path, n_images=3)
    table = _write_table(images / "t.jsonl", rows)
    table.write_text(table.read_text() + "{broken\n")
    assert main(["index", "custom", str(table), "--sentencepiece-model", str(spm_path)]) == 1
    assert f"{table}:7: malformed JSON" in capsys.readouterr().err
    assert main(["index", "custom", str(table), "--sentencepiece_model", str(spm_path), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "coco_captioning.train.jsonl" in out and "items skipped: 1" in out


# --------------------------------------------------------------------------------- atomic and reading

class _FailingTokenizer:
    """The real tokenizer, failing on its n-th caption: a crash in the middle of writing an index."""

    def __init__(self, tokenizer, fail_at: int):
        self._tok, self._left = tokenizer, fail_at

    def tokenize(self, text):
        self._left -= 1
        if self._left == 0:
            raise RuntimeError("simulated crash")
        return self._tok.tokenize(text)

    def convert_tokens_to_ids(self, tokens):
        return self._tok.convert_tokens_to_ids(tokens)


def test_crash_mid_write_keeps_old_file(small_coco, tokenizer):
    make_coco_captioning_index(small_coco, tokenizer)
    train = small_coco / "coco_captioning.train.jsonl"
    before = train.read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_coco_captioning_index(small_coco, _FailingTokenizer(tokenizer, fail_at=20))
    assert train.read_bytes() == before
    assert not [p for p in small_coco.iterdir() if p.name.endswith(".tmp")]


def test_read_index(coco_tree):
    rows = read_index(coco_tree / "coco_captioning.train.jsonl")
    assert len(rows) == 24 * 5 and all(r["text_segment"] for r in rows)
    assert len(read_index(coco_tree / "coco_captioning.val.jsonl")) == 8


def test_read_index_names_bad_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"image_path": "a.jpg", "text_segment": null, "image_id": 1}\n'
                    '{"image_path": "b.jpg", "text_segment": "text", "image_id": 2}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: expected"):
        read_index(path)


def test_csv_header_must_name_image_and_caption(tmp_path, tokenizer):
    table = tmp_path / "t.csv"
    table.write_text("file_name,text\na.jpg,a red circle\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.csv:1: the CSV header needs the columns image and caption"):
        make_custom_index(table, tokenizer)
