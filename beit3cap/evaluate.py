"""Prediction files, ground-truth files and scoring a run (spec §7.2-7.3), without the official traps.

- Prediction files are COCO results lists ``[{"image_id": int, "caption": str}, ...]`` with one entry per
  image (``submit_{suffix}.json``); distributed shards merge keeping the first caption of each image.
- Ground truth is a COCO annotation file (``coco_karpathy_{val,test}_gt.json``, ``nocaps_val_gt.json``,
  ``captions_val2014.json``), looked up in the output dir, then the data path; nothing is downloaded.
- Scoring checks the predictions against the ground truth first: a missing, duplicated or unknown image
  id is an error that lists the ids (pycocoevalcap dies on a bare AssertionError instead), unless
  ``allow_partial`` asks to score the images both sides share.
- Results are one JSON line (``coco_captioning_result.json``, ``{task}_result_val_e{epoch}.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from beit3cap.fileio import atomic_write
from beit3cap.metrics import METRICS, CaptionScores, evaluate_captions
from beit3cap.metrics.scorer import preview_ids

log = logging.getLogger(__name__)

GT_URLS = {
    "coco_karpathy_val_gt.json":
        "https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_val_gt.json",
    "coco_karpathy_test_gt.json":
        "https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_test_gt.json",
    "nocaps_val_gt.json": "https://github.com/addf400/files/releases/download/beit3/nocaps_val_gt.json",
}

Predictions = Sequence[Mapping[str, Any]] | Mapping[int, str]


class PredictionError(ValueError):
    """Predictions that do not match the ground truth (missing, duplicate or unknown image ids)."""


class GroundTruthError(ValueError):
    """A ground-truth file that is not a usable COCO annotation file; the message names the file."""


def _read_json(path: Path, error: type[Exception]) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ ground truth

def ground_truth_name(split_key: str) -> str:
    """Official file name of a split's ground truth: coco_captioning_val -> coco_karpathy_val_gt.json,
    nocaps_val -> nocaps_val_gt.json (the WTS fork's coco_captioning_<name> splits follow the same rule)."""
    if split_key == "nocaps_test":
        raise FileNotFoundError("NoCaps test captions are not public: submit submit_nocaps_test.json to the "
                                "EvalAI server (challenge 355) to score it")
    for task, stem in (("coco_captioning_", "coco_karpathy_"), ("nocaps_", "nocaps_")):
        if split_key.startswith(task) and len(split_key) > len(task):
            return f"{stem}{split_key[len(task):]}_gt.json"
    raise ValueError(f"unknown split key {split_key!r}; expected coco_captioning_<split> or nocaps_<split>")


def find_ground_truth(split_key: str, output_dir: str | os.PathLike | None,
                      data_path: str | os.PathLike | None, required: bool = True) -> Path | None:
    """The ground-truth file of ``split_key`` from ``output_dir`` (where the official code downloads it),
    else ``data_path`` (where ``beit3cap index`` writes it). Missing: FileNotFoundError saying where it
    looked and how to get the file, or None when ``required`` is False."""
    name = ground_truth_name(split_key)
    places = [Path(d) / name for d in (output_dir, data_path) if d]
    for path in places:
        if path.is_file():
            return path
    if not required:
        return None
    looked = ", ".join(map(str, places)) or "nowhere (no output dir or data path given)"
    kind = "coco" if name.startswith("coco") else "nocaps"
    url = GT_URLS.get(name)
    raise FileNotFoundError(
        f"ground truth {name} for {split_key} not found; looked in: {looked}. Build it from the dataset's "
        f"annotations with `beit3cap index {kind} --data-path DATA ...` (the index builders write {name} "
        f"into DATA)" + (f", or download it from {url} into the output dir" if url else ""))


def load_ground_truth(path: str | os.PathLike) -> dict[int, list[str]]:
    """image id -> reference captions, from a COCO annotation file (``{"images": [...], "annotations":
    [...]}``; a bare list of annotations also works). Image order follows ``images`` when present."""
    path = Path(path)
    data = _read_json(path, GroundTruthError)
    anns = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(anns, list):
        raise GroundTruthError(f"{path}: expected a COCO annotation file with an 'annotations' list")
    refs: dict[int, list[str]] = {}
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict) or not _is_int(img.get("id")):
                raise GroundTruthError(f"{path}: images[{k}] needs an integer 'id', got {img!r:.100}")
            refs.setdefault(img["id"], [])
        listed = True
    else:
        listed = False
    unlisted = set()
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not isinstance(ann.get("caption"), str):
            raise GroundTruthError(f"{path}: annotations[{k}] needs an integer 'image_id' and a string "
                                   f"'caption', got {ann!r:.100}")
        if listed and ann["image_id"] not in refs:
            unlisted.add(ann["image_id"])
            continue
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    if unlisted:
        log.warning("%s: ignoring the captions of %d image id(s) missing from 'images': %s",
                    path, len(unlisted), preview_ids(unlisted))
    empty = [i for i, caps in refs.items() if not caps]
    if empty:
        log.warning("%s: %d listed image(s) have no caption and cannot be scored: %s",
                    path, len(empty), preview_ids(empty))
        refs = {i: caps for i, caps in refs.items() if caps}
    if not refs:
        raise GroundTruthError(f"{path}: no captions")
    return refs


# ------------------------------------------------------------------------------------------ predictions

def _entries(preds: Predictions, source: str) -> list[tuple[int, str]]:
    if isinstance(preds, Mapping):
        items = list(preds.items())
        where = [f"key {i!r}" for i, _ in items]
    else:
        items, where = [], []
        for k, p in enumerate(preds):
            if not isinstance(p, Mapping):
                raise PredictionError(f"{source}: entry {k} is not an object: {p!r:.100}")
            items.append((p.get("image_id"), p.get("caption")))
            where.append(f"entry {k}")
    for (img, cap), w in zip(items, where):
        if not _is_int(img) or not isinstance(cap, str):
            raise PredictionError(f"{source}: {w} needs an integer image_id and a string caption, "
                                  f"got image_id={img!r:.50}, caption={cap!r:.100}")
    return items


def check_predictions(preds: Predictions, gt_ids: Iterable[int], allow_partial: bool = False,
                      source: str = "predictions") -> dict[int, str]:
    """image id -> caption for scoring, in ground-truth order.

    Every ground-truth image needs exactly one prediction and every prediction a ground-truth image;
    otherwise PredictionError lists the ids. With ``allow_partial`` the images both sides share are
    scored instead (first caption per image), with a warning - note that CIDEr-D's idf then comes from
    that subset's references, so its score is not comparable with a full-set score.
    """
    gt_order = list(gt_ids)
    gt_set = set(gt_order)
    first: dict[int, str] = {}
    dup: set[int] = set()
    for img, cap in _entries(preds, source):
        if img in first:
            dup.add(img)
        else:
            first[img] = cap
    unknown = first.keys() - gt_set
    missing = gt_set - first.keys()
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(gt_set)} ground-truth images have no prediction: "
                        f"{preview_ids(missing)}")
    if dup:
        problems.append(f"{len(dup)} images have more than one prediction: {preview_ids(dup)}")
    if unknown:
        problems.append(f"{len(unknown)} predicted images are not in the ground truth: {preview_ids(unknown)}")
    if problems and not allow_partial:
        raise PredictionError(f"{source}: " + "; ".join(problems) +
                              " (allow_partial / --allow-partial scores the shared images only)")
    kept = {i: first[i] for i in gt_order if i in first}
    if not kept:
        raise PredictionError(f"{source}: no prediction matches a ground-truth image id")
    if problems:
        log.warning("%s: %s. Scoring the %d shared images only%s; CIDEr-D's idf comes from these images' "
                    "references, so its score is not comparable with a full-set evaluation.", source,
                    "; ".join(problems), len(kept), " (first caption of each duplicate)" if dup else "")
    return kept


def load_predictions(path: str | os.PathLike) -> list[dict]:
    """A COCO results list, as written by :func:`write_predictions` or the official code."""
    path = Path(path)
    data = _read_json(path, PredictionError)
    if not isinstance(data, list):
        raise PredictionError(f"{path}: expected a JSON list of {{\"image_id\": int, \"caption\": str}} objects")
    return data


def write_predictions(path: str | os.PathLike, preds: Predictions) -> Path:
    """Write a COCO results list atomically (one object per line); one caption per image id."""
    entries = _entries(preds, str(path))
    seen: set[int] = set()
    dup: set[int] = set()
    for img, _ in entries:
        (dup if img in seen else seen).add(img)
    if dup:
        raise PredictionError(f"{path}: more than one caption for image ids {preview_ids(dup)}; "
                              "merge_predictions keeps the first of each")
    lines = [json.dumps({"image_id": img, "caption": cap}, ensure_ascii=False) for img, cap in entries]
    return atomic_write(path, lambda f: f.write("[\n" + ",\n".join(lines) + "\n]\n" if lines else "[]\n"))


def merge_predictions(*parts: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Concatenate prediction lists (e.g. one per rank, in rank order), keeping the first caption of each
    image id - what the official ``dump_predictions`` does with its shards."""
    merged: dict[int, dict] = {}
    for part in parts:
        for p in part:
            merged.setdefault(p["image_id"], {"image_id": p["image_id"], "caption": p["caption"]})
    return list(merged.values())


def merge_prediction_shards(shards: Sequence[str | os.PathLike], out_path: str | os.PathLike | None = None,
                            delete: bool = False) -> list[dict]:
    """Merge per-rank files (``submit_{rank}_{suffix}.json``, in rank order) into one list, optionally
    write it to ``out_path`` and delete the shards afterwards."""
    merged = merge_predictions(*(load_predictions(p) for p in shards))
    if out_path is not None:
        write_predictions(out_path, merged)
    if delete:
        for p in shards:
            Path(p).unlink(missing_ok=True)
    return merged


# ------------------------------------------------------------------------------------------ scoring

def evaluate_predictions(preds: Predictions, gts: Mapping[int, Sequence[str]], allow_partial: bool = False,
                         metrics: Iterable[str] = METRICS, source: str = "predictions") -> CaptionScores:
    """Check ``preds`` against ``gts`` (see :func:`check_predictions`) and score them."""
    res = check_predictions(preds, gts.keys(), allow_partial, source)
    return evaluate_captions({i: list(gts[i]) for i in res}, res, metrics)


def score_predictions_file(pred_path: str | os.PathLike, gt_path: str | os.PathLike, allow_partial: bool = False,
                           metrics: Iterable[str] = METRICS) -> dict[str, float | None]:
    """pycocoevalcap-style scores ({"Bleu_1": ..., "CIDEr": ..., "SPICE": None if unavailable}) of a
    prediction file against a ground-truth file."""
    return evaluate_predictions(load_predictions(pred_path), load_ground_truth(gt_path), allow_partial,
                                metrics, source=str(pred_path)).corpus


def write_result(path: str | os.PathLike, metrics: Mapping[str, float | None]) -> Path:
    """Write scores as a single JSON line, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(dict(metrics)) + "\n"))
