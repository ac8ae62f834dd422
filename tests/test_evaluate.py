"""Prediction files, ground-truth files, prediction checks and `beit3cap score`, on real files."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from beit3cap.evaluate import (GroundTruthError, PredictionError, check_predictions, evaluate_predictions,
                               find_ground_truth, load_ground_truth, load_predictions, merge_prediction_shards,
                               score_predictions_file, write_predictions, write_result)
from beit3cap.metrics import evaluate_captions
from beit3cap.metrics.java import pycocoevalcap_dir

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="java is not installed (apt-get install default-jre-headless)")

REPO = Path(__file__).resolve().parents[1]
NATIVE = ("Bleu", "ROUGE_L", "CIDEr")
WORDS = "a the dog cat man woman red blue bus car street grass sitting running on in near with".split()


def write_gt_file(path: Path, refs: dict[int, list[str]]) -> Path:
    anns = [{"image_id": i, "id": n, "caption": c}
            for n, (i, c) in enumerate(((i, c) for i, caps in refs.items() for c in caps), start=1)]
    path.write_text(json.dumps({"images": [{"id": i} for i in refs], "annotations": anns}))
    return path


def generated_refs(n: int, seed: int = 0) -> dict[int, list[str]]:
    rng = random.Random(seed)
    return {100 + i: [" ".join(rng.choices(WORDS, k=rng.randint(4, 10))) for _ in range(5)] for i in range(n)}


def preds_for(refs: dict[int, list[str]], ids) -> list[dict]:
    return [{"image_id": i, "caption": refs[i][0].upper() + " ."} for i in ids]


# ------------------------------------------------------------------------------------------ ground truth

def test_load_ground_truth_coco_format(tmp_path, caplog):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({
        "images": [{"id": 3}, {"id": 1}, {"id": 2}],
        "annotations": [{"image_id": 1, "id": 1, "caption": "a dog"}, {"image_id": 3, "id": 2, "caption": "a cat"},
                        {"image_id": 1, "id": 3, "caption": "one dog"}, {"image_id": 9, "id": 4, "caption": "x"}]}))
    with caplog.at_level(logging.WARNING):
        refs = load_ground_truth(path)
    assert refs == {3: ["a cat"], 1: ["a dog", "one dog"]}  # order of "images"; image 2 has no caption
    assert list(refs) == [3, 1]
    assert "missing from 'images': 9" in caplog.text and "have no caption and cannot be scored: 2" in caplog.text

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{"image_id": 5, "caption": "x"}, {"image_id": 5, "caption": "y"}]))
    assert load_ground_truth(bare) == {5: ["x", "y"]}


def test_load_ground_truth_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"annotations": [\n{"image_id": 1, "caption": "ok"},\n{"image_id": "2", "caption": "no"}]}')
    with pytest.raises(GroundTruthError, match=rf"{bad}: annotations\[1\] needs an integer 'image_id'"):
        load_ground_truth(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [\n{"image_id": 1,\n "caption": "x",}]}')
    with pytest.raises(GroundTruthError, match=rf"{broken}:3: not valid JSON"):
        load_ground_truth(broken)
    with pytest.raises(GroundTruthError, match="'annotations' list"):
        load_ground_truth(write_json(tmp_path / "x.json", {"images": []}))


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_load_ground_truth_reads_captions_val2014(tmp_path):
    jar = pycocoevalcap_dir() / "spice" / "spice-1.0.jar"
    path = tmp_path / "captions_val2014.json"
    path.write_bytes(zipfile.ZipFile(jar).read("coco/annotations/captions_val2014.json"))
    refs = load_ground_truth(path)
    assert len(refs) == 40504 and sum(map(len, refs.values())) == 202654


def test_find_ground_truth_order_and_errors(tmp_path):
    out_dir, data = tmp_path / "out", tmp_path / "data"
    out_dir.mkdir()
    data.mkdir()
    (data / "coco_karpathy_val_gt.json").write_text("{}")
    assert find_ground_truth("coco_captioning_val", out_dir, data) == data / "coco_karpathy_val_gt.json"
    (out_dir / "coco_karpathy_val_gt.json").write_text("{}")
    assert find_ground_truth("coco_captioning_val", out_dir, data) == out_dir / "coco_karpathy_val_gt.json"
    (data / "coco_karpathy_moving_gt.json").write_text("{}")  # the WTS fork's split names
    assert find_ground_truth("coco_captioning_moving", None, data) == data / "coco_karpathy_moving_gt.json"

    with pytest.raises(FileNotFoundError) as err:
        find_ground_truth("nocaps_val", out_dir, data)
    message = str(err.value)
    assert str(out_dir / "nocaps_val_gt.json") in message and str(data / "nocaps_val_gt.json") in message
    assert "beit3cap index nocaps" in message and "addf400/files" in message
    assert find_ground_truth("coco_captioning_test", out_dir, data, required=False) is None
    with pytest.raises(FileNotFoundError, match="EvalAI"):
        find_ground_truth("nocaps_test", out_dir, data)
    with pytest.raises(ValueError, match="unknown split key"):
        find_ground_truth("vqa_val", out_dir, data)


# ------------------------------------------------------------------------------------------ predictions

def test_check_predictions_lists_missing_duplicate_and_unknown_ids():
    gt_ids = list(range(1000, 1050))
    preds = [{"image_id": i, "caption": "x"} for i in gt_ids[25:]] + [{"image_id": 1030, "caption": "y"}]
    with pytest.raises(PredictionError) as err:
        check_predictions(preds, gt_ids, source="submit.json")
    message = str(err.value)
    assert message.startswith("submit.json: 25 of 50 ground-truth images have no prediction: 1000, 1001,")
    assert "1019, ... (25 in total)" in message and "1020" not in message
    assert "1 images have more than one prediction: 1030" in message

    with pytest.raises(PredictionError, match=r"2 predicted images are not in the ground truth: 7, 8"):
        check_predictions([{"image_id": i, "caption": "x"} for i in gt_ids + [8, 7]], gt_ids)
    with pytest.raises(PredictionError, match=r"entry 1 needs an integer image_id and a string caption"):
        check_predictions([{"image_id": 1000, "caption": "x"}, {"image_id": "1001", "caption": "x"}], gt_ids)
    with pytest.raises(PredictionError, match="no prediction matches"):
        check_predictions([{"image_id": 5, "caption": "x"}], gt_ids, allow_partial=True)


def test_check_predictions_allow_partial_keeps_shared_images(caplog):
    preds = [{"image_id": 3, "caption": "first"}, {"image_id": 3, "caption": "second"},
             {"image_id": 1, "caption": "one"}, {"image_id": 99, "caption": "unknown"}]
    with caplog.at_level(logging.WARNING):
        kept = check_predictions(preds, [1, 2, 3], allow_partial=True)
    assert kept == {1: "one", 3: "first"} and list(kept) == [1, 3]  # ground-truth order
    assert "Scoring the 2 shared images only" in caplog.text and "CIDEr-D's idf" in caplog.text


def test_write_load_and_merge_prediction_files(tmp_path):
    preds = [{"image_id": 7, "caption": "a dog"}, {"image_id": 3, "caption": "ein Hund, naïve “quoted”"}]
    path = write_predictions(tmp_path / "submit_coco_captioning_test.json", preds)
    assert load_predictions(path) == preds
    assert json.loads(path.read_text()) == preds
    assert write_predictions(tmp_path / "dict.json", {7: "a dog"}).read_text().count("image_id") == 1
    assert load_predictions(write_predictions(tmp_path / "empty.json", [])) == []
    with pytest.raises(PredictionError, match="more than one caption for image ids 7"):
        write_predictions(tmp_path / "dup.json", preds + [{"image_id": 7, "caption": "again"}])
    assert not (tmp_path / "dup.json").exists()

    shards = [write_predictions(tmp_path / f"submit_{r}_x.json", part) for r, part in enumerate([
        [{"image_id": 1, "caption": "rank0 first"}, {"image_id": 2, "caption": "rank0"}],
        [{"image_id": 3, "caption": "rank1"}, {"image_id": 1, "caption": "rank1 padding duplicate"}]])]
    merged = merge_prediction_shards(shards, tmp_path / "submit_x.json", delete=True)
    assert merged == [{"image_id": 1, "caption": "rank0 first"}, {"image_id": 2, "caption": "rank0"},
                      {"image_id": 3, "caption": "rank1"}]
    assert load_predictions(tmp_path / "submit_x.json") == merged
    assert not any(p.exists() for p in shards)


def test_write_result_is_one_json_line(tmp_path):
    scores = {"Bleu_4": 0.41, "CIDEr": 1.434, "SPICE": None}
    path = write_result(tmp_path / "coco_captioning_result.json", scores)
    text = path.read_text()
    assert text.count("\n") == 1 and text.endswith("\n") and json.loads(text) == scores


# ------------------------------------------------------------------------------------------ scoring

@needs_java
def test_score_predictions_file_full_and_partial(tmp_path):
    refs = generated_refs(30)
    gt = write_gt_file(tmp_path / "coco_karpathy_test_gt.json", refs)
    full = write_predictions(tmp_path / "full.json", preds_for(refs, refs))
    partial = write_predictions(tmp_path / "partial.json", preds_for(refs, list(refs)[:20]))

    full_scores = score_predictions_file(full, gt, metrics=NATIVE)
    assert full_scores == evaluate_captions(refs, {p["image_id"]: p["caption"] for p in load_predictions(full)},
                                            NATIVE).corpus
    assert full_scores["Bleu_1"] == pytest.approx(1.0)  # the caption is a reference, up to case and "."
    with pytest.raises(PredictionError, match="10 of 30 ground-truth images have no prediction"):
        score_predictions_file(partial, gt, metrics=NATIVE)

    subset = {i: refs[i] for i in list(refs)[:20]}
    partial_scores = score_predictions_file(partial, gt, allow_partial=True, metrics=NATIVE)
    assert partial_scores == evaluate_predictions(load_predictions(partial), subset, metrics=NATIVE).corpus
    # CIDEr-D's idf comes from the scored images' references: a subset scores differently.
    subset_of_full = evaluate_captions(refs, {p["image_id"]: p["caption"] for p in load_predictions(full)}, NATIVE)
    per_image = dict(zip(subset_of_full.image_ids, subset_of_full.per_image["CIDEr"]))
    assert partial_scores["CIDEr"] != pytest.approx(np.mean([per_image[i] for i in subset]))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beit3cap", "score", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


@needs_java
def test_score_cli_on_the_coco_demo(tmp_path, coco_demo_results):
    gt = tmp_path / "captions_val2014.json"
    gt.write_bytes(zipfile.ZipFile(pycocoevalcap_dir() / "spice" / "spice-1.0.jar")
                   .read("coco/annotations/captions_val2014.json"))
    out, rows = tmp_path / "result.json", tmp_path / "per_image.jsonl"

    refused = run_cli(str(coco_demo_results), "--gt", str(gt), "--metrics", "CIDEr")
    assert refused.returncode == 2 and "39504 of 40504 ground-truth images have no prediction" in refused.stderr

    done = run_cli(str(coco_demo_results), "--gt", str(gt), "--metrics", "Bleu,ROUGE_L", "CIDEr", "--allow-partial",
                   "--out", str(out), "--per-image", str(rows))
    assert done.returncode == 0, done.stderr
    assert "1000 images scored" in done.stdout and "CIDEr    0.5998" in done.stdout
    result = json.loads(out.read_text())
    assert list(result) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert [round(result[k], 3) for k in ("Bleu_4", "ROUGE_L", "CIDEr")] == [0.191, 0.396, 0.6]
    lines = rows.read_text().splitlines()
    assert len(lines) == 1000 and set(json.loads(lines[0])) == {"image_id", *result}


def test_score_cli_without_java_says_how_to_install_it(tmp_path):
    refs = generated_refs(3)
    gt = write_gt_file(tmp_path / "gt.json", refs)
    preds = write_predictions(tmp_path / "p.json", preds_for(refs, refs))
    env = {**os.environ, "PATH": str(tmp_path)}  # no java on PATH
    done = run_cli(str(preds), "--gt", str(gt), "--metrics", "Bleu", env=env)
    assert done.returncode == 1 and "default-jre-headless" in done.stderr
