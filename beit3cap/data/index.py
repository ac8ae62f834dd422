"""Index builders: COCO Karpathy, NoCaps, the WTS fork's caption JSONs, and a generic image/caption
table, all written in the official index format (spec §5.1-5.2) plus COCO-format ground-truth files.

Index file: one ``json.dumps`` object per line, keys in the order ``image_path``, ``text_segment``,
``image_id``. Training rows hold one caption each (token ids without BOS/EOS, full length: truncation to
``num_max_bpe_tokens - 2`` happens when a sample is built); val/test rows hold one image each with
``text_segment`` null, and their references go to a ground-truth file
``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "id", "caption"}]}`` under the name
the official evaluation downloads (``coco_karpathy_{val,test}_gt.json``, ``nocaps_val_gt.json``).

Bad input raises :class:`DataError` naming the file (and line or entry); with ``skip_bad=True`` each
bad item is logged as a warning, left out, and listed in the returned :class:`IndexSummary`.
This module must not import torch: indexing runs on machines and in processes without it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json, atomic_write_jsonl

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # WTS: the fork's code looks for .png, its README shows .jpg
_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class DataError(ValueError):
    """Bad input data; the message starts with the file (and line or entry) at fault."""


@dataclass
class IndexSummary:
    files: dict[str, int] = field(default_factory=dict)  # written file -> rows
    images: dict[str, int] = field(default_factory=dict)  # split -> distinct images indexed
    captions: int = 0  # training captions written
    truncated: int = 0  # training captions longer than text_limit pieces
    text_limit: int = 30
    missing_images: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per item left out

    def __str__(self) -> str:
        lines = [f"wrote {path}: {n} {'rows' if path.endswith('.jsonl') else 'images'}"
                 for path, n in self.files.items()]
        lines.append("images: " + ", ".join(f"{s} {n}" for s, n in self.images.items()))
        if self.captions:
            lines.append(f"training captions: {self.captions}, longer than {self.text_limit} pieces "
                         f"(truncated when training): {self.truncated}")
        lines.append(f"missing images: {self.missing_images}; items skipped: {len(self.skipped)}")
        return "\n".join(lines)


@dataclass
class _Item:
    image_path: str  # as written to the index (relative to the index folder, or absolute)
    image_id: int
    captions: list[str]
    where: str  # file and line/entry, for messages


class _Problems:
    """Raise on the first bad item, or (skip_bad) warn, record it, and let the caller drop it."""

    def __init__(self, summary: IndexSummary, skip_bad: bool):
        self.summary, self.skip_bad = summary, skip_bad

    def __call__(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        log.warning("skipped: %s", message)
        self.summary.skipped.append(message)


# --------------------------------------------------------------------------------------------- reading

def _decode_error(path: Path, data: bytes, e: UnicodeDecodeError) -> DataError:
    line = data.count(b"\n", 0, e.start) + 1
    return DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte offset {e.start})")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _decode_error(path, data, e) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None


def _text_lines(path: Path, problems: _Problems) -> list[tuple[int, str]]:
    """(line number, text) of every line that decodes as UTF-8; undecodable lines are problems."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append((n, line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            problems(f"{path}:{n}: not UTF-8 text ({e.reason} at column {e.start + 1})")
    return out


def iter_index(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line of an index file, streamed and checked: a bad line raises
    :class:`DataError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            text = row.get("text_segment", 0) if isinstance(row, dict) else 0
            if (not isinstance(row, dict) or not isinstance(row.get("image_path"), str)
                    or type(row.get("image_id")) is not int
                    or not (text is None or (isinstance(text, list) and all(type(i) is int for i in text)))):
                raise DataError(f"{path}:{n}: expected {{\"image_path\": str, \"text_segment\": [int] or null, "
                                f"\"image_id\": int}}, got {line.strip()[:120]}")
            yield n, row


def read_index(path: str | os.PathLike) -> list[dict]:
    """All rows of an index file (see :func:`iter_index`)."""
    return [row for _, row in iter_index(path)]


# --------------------------------------------------------------------------------------------- writing

def _encode(tokenizer: Any, text: str) -> list[int]:
    # Same as beit3cap.tokenizer.encode, restated so this module stays free of torch.
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def _image_problem(file: Path, check_images: bool) -> str | None:
    if not file.is_file():
        return "image not found"
    if check_images:
        from PIL import Image
        try:
            with Image.open(file) as im:
                im.verify()  # container-level checks (PNG CRCs, ...)
            with Image.open(file) as im:
                im.load()  # a full decode: catches truncated JPEGs, which verify() lets through
        except Exception as e:  # PIL raises many types for broken files
            return f"unreadable image ({type(e).__name__}: {e})"
    return None


def _check_items(items: list[_Item], root: Path, problems: _Problems, summary: IndexSummary,
                 check_images: bool, need_captions: bool, source: Path) -> list[_Item]:
    kept = []
    for item in items:
        bad = _image_problem(root / item.image_path, check_images)
        if bad:
            summary.missing_images += bad == "image not found"
            problems(f"{item.where}: {bad}: {root / item.image_path}")
            continue
        captions = []
        for c in item.captions:
            if not isinstance(c, str) or not c.strip():
                problems(f"{item.where}: empty or non-text caption {c!r} for image {item.image_path}")
            else:
                captions.append(c)
        if need_captions and not captions:
            problems(f"{item.where}: no caption for image {item.image_path}")
            continue
        kept.append(_Item(item.image_path, item.image_id, captions, item.where))
    if items and not kept:
        raise DataError(f"{source}: none of its {len(items)} images could be used "
                        f"(see the warnings above)")
    return kept


def write_gt(path: str | os.PathLike, references: Mapping[int, Sequence[str]],
             file_names: Mapping[int, str] | None = None) -> Path:
    """COCO-format ground truth (images in the given order, annotation ids from 1). Whitespace runs
    become one space: the PTB tokenizer would split a line at ``\r``/``\f``/U+2028 and shift every
    later caption."""
    images = [{"id": i, "file_name": file_names[i]} if file_names else {"id": i} for i in references]
    anns = [{"image_id": i, "id": 0, "caption": " ".join(c.split())} for i, caps in references.items() for c in caps]
    for k, ann in enumerate(anns, start=1):
        ann["id"] = k
    return atomic_write_json(path, {"images": images, "annotations": anns})


def _emit(out_dir: Path, index_name: str, split: str, items: list[_Item], tokenizer: Any,
          summary: IndexSummary, problems: _Problems, gt_name: str | None = None) -> None:
    """Write one index file (one row per caption if ``tokenizer`` is given, else one per image)."""
    path = out_dir / index_name
    counter = {"rows": 0}

    def rows() -> Iterator[dict]:  # a generator: a failure mid-way leaves the old file untouched
        for it in items:
            for text in (it.captions if tokenizer is not None else [None]):
                segment = None
                if text is not None:
                    segment = _encode(tokenizer, text)
                    if not segment:
                        problems(f"{it.where}: caption {text!r} encodes to no tokens")
                        continue
                    summary.captions += 1
                    summary.truncated += len(segment) > summary.text_limit
                counter["rows"] += 1
                yield {"image_path": it.image_path, "text_segment": segment, "image_id": it.image_id}

    atomic_write_jsonl(path, rows())
    summary.files[str(path)] = counter["rows"]
    summary.images[split] = len(items)
    if not items:
        log.warning("%s: no images in split %r", path, split)
    if gt_name is not None:
        gt = write_gt(out_dir / gt_name, {it.image_id: it.captions for it in items},
                      {it.image_id: it.image_path for it in items})
        summary.files[str(gt)] = len(items)


def _unique_ids(items: list[_Item], problems: _Problems, seen: dict[int, str]) -> list[_Item]:
    kept = []
    for it in items:
        if it.image_id in seen:
            problems(f"{it.where}: duplicate image id {it.image_id} (first used at {seen[it.image_id]})")
            continue
        seen[it.image_id] = it.where
        kept.append(it)
    return kept


# ------------------------------------------------------------------------------------------------ COCO

def make_coco_captioning_index(data_path: str | os.PathLike, tokenizer: Any, *, num_max_bpe_tokens: int = 32,
                               check_images: bool = False, skip_bad: bool = False) -> IndexSummary:
    """``dataset_coco.json`` (Karpathy) -> ``coco_captioning.{train,val,test}.jsonl`` and
    ``coco_karpathy_{val,test}_gt.json`` in ``data_path`` (train = Karpathy train + restval)."""
    root = Path(data_path)
    src = root / "dataset_coco.json"
    summary = IndexSummary(text_limit=num_max_bpe_tokens - 2)
    problems = _Problems(summary, skip_bad)
    data = _load_json(src)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{src}: expected a Karpathy split file: {{\"images\": [...]}}")
    splits: dict[str, list[_Item]] = {"train": [], "val": [], "test": []}
    for k, entry in enumerate(data["images"]):
        where = f"{src}: images[{k}]"
        try:
            split = _SPLIT_NAMES.get(entry["split"])
            item = _Item(f"{entry['filepath']}/{entry['filename']}", entry["cocoid"],
                         [s["raw"] for s in entry["sentences"]], where)
        except (KeyError, TypeError) as e:
            problems(f"{where}: malformed entry (missing or wrong field {e})")
            continue
        if split is None or not isinstance(item.image_id, int):
            problems(f"{where}: bad split {entry['split']!r} or cocoid {entry['cocoid']!r}")
            continue
        splits[split].append(item)
    seen: dict[int, str] = {}
    for split, items in splits.items():
        items = _check_items(_unique_ids(items, problems, seen), root, problems, summary, check_images, True, src)
        _emit(root, f"coco_captioning.{split}.jsonl", split, items, tokenizer if split == "train" else None,
              summary, problems, None if split == "train" else f"coco_karpathy_{split}_gt.json")
    return summary


# ---------------------------------------------------------------------------------------------- NoCaps

def _nocaps_images(path: Path, split: str, problems: _Problems) -> list[_Item]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a COCO-style file with an \"images\" list")
    items = []
    for k, img in enumerate(data["images"]):
        where = f"{path}: images[{k}]"
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            problems(f"{where}: expected {{\"id\": int, \"file_name\": str}}")
            continue
        items.append(_Item(f"{split}/{img['file_name']}", img["id"], [], where))
    return items


def make_nocaps_captioning_index(data_path: str | os.PathLike, *, check_images: bool = False,
                                 skip_bad: bool = False) -> IndexSummary:
    """``nocaps_val_4500_captions.json`` + ``nocaps_test_image_info.json`` -> ``nocaps.{val,test}.jsonl``
    (rows ``val/<file_name>`` / ``test/<file_name>``) and ``nocaps_val_gt.json`` in ``data_path``."""
    root = Path(data_path)
    summary = IndexSummary()
    problems = _Problems(summary, skip_bad)
    val_src = root / "nocaps_val_4500_captions.json"
    val = _nocaps_images(val_src, "val", problems)
    refs: dict[int, list[str]] = {it.image_id: it.captions for it in val}
    for k, ann in enumerate(_load_json(val_src).get("annotations", [])):
        if not isinstance(ann, dict) or ann.get("image_id") not in refs:
            problems(f"{val_src}: annotations[{k}]: no image with id {ann.get('image_id') if isinstance(ann, dict) else ann!r}")
            continue
        refs[ann["image_id"]].append(ann.get("caption"))
    val = _check_items(_unique_ids(val, problems, {}), root, problems, summary, check_images, True, val_src)
    _emit(root, "nocaps.val.jsonl", "val", val, None, summary, problems, "nocaps_val_gt.json")
    test_src = root / "nocaps_test_image_info.json"
    test = _nocaps_images(test_src, "test", problems)
    test = _check_items(_unique_ids(test, problems, {}), root, problems, summary, check_images, False, test_src)
    _emit(root, "nocaps.test.jsonl", "test", test, None, summary, problems)
    return summary


# ------------------------------------------------------------------------------------------------- WTS

def _find_image(image_dir: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        if (image_dir / (stem + ext)).is_file():
            return image_dir / (stem + ext)
    return None


def make_wts_index(data_path: str | os.PathLike, tokenizer: Any, image_dir: str | os.PathLike, *,
                   split_name: str = "train", type: str = "", out_dir: str | os.PathLike = ".",
                   num_max_bpe_tokens: int = 64, check_images: bool = False, skip_bad: bool = False) -> IndexSummary:
    """A WTS caption JSON ``{key: {"caption": [{"caption", "label"}], "videos": ["<name>.mp4"]}}`` ->
    ``<out_dir>/coco_captioning.<split_name>.jsonl`` with absolute image paths
    ``<image_dir>/<type><video stem>phase<label>.{png,jpg,jpeg}`` (spec §11.1).

    Unlike the fork: one stable id per image (first-appearance order), ``.png``/``.jpg``/``.jpeg`` all
    found, missing images warned about and counted (an error only if none is found), and for any split
    but ``train`` one row per image plus ``coco_karpathy_<split_name>_gt.json`` holding its captions.
    """
    src, image_dir, out = Path(data_path), Path(os.path.abspath(image_dir)), Path(out_dir)
    summary = IndexSummary(text_limit=num_max_bpe_tokens - 2)
    problems = _Problems(summary, skip_bad)
    data = _load_json(src)
    if not isinstance(data, dict):
        raise DataError(f"{src}: expected {{key: {{\"caption\": [...], \"videos\": [...]}}}}")
    by_path: dict[Path, _Item] = {}
    missing: set[Path] = set()
    for key, value in data.items():
        where = f"{src}: [{key!r}]"
        if (not isinstance(value, dict) or not isinstance(value.get("caption"), list)
                or not isinstance(value.get("videos"), list)
                or not all(isinstance(c, dict) and "caption" in c and "label" in c for c in value["caption"])):
            problems(f"{where}: expected {{\"caption\": [{{\"caption\": str, \"label\": phase}}], \"videos\": [str]}}")
            continue
        for c in value["caption"]:
            for video in value["videos"]:
                stem = f"{type}{Path(str(video)).stem}phase{c['label']}"
                file = _find_image(image_dir, stem)
                if file is None:
                    if image_dir / stem not in missing:
                        missing.add(image_dir / stem)
                        log.warning("%s: image not found: %s{%s}", where, image_dir / stem, ",".join(IMAGE_EXTENSIONS))
                    continue
                if file not in by_path:
                    by_path[file] = _Item(str(file), len(by_path), [], where)
                by_path[file].captions.append(c["caption"])
    summary.missing_images = len(missing)
    if not by_path:
        raise DataError(f"{src}: none of the {len(missing)} images it names exist in {image_dir} "
                        f"(looked for <type><video stem>phase<label> with {', '.join(IMAGE_EXTENSIONS)}, type={type!r})")
    train = split_name == "train"
    items = _check_items(list(by_path.values()), out, problems, summary, check_images, True, src)
    _emit(out, f"coco_captioning.{split_name}.jsonl", split_name, items, tokenizer if train else None,
          summary, problems, None if train else f"coco_karpathy_{split_name}_gt.json")
    return summary


# ---------------------------------------------------------------------------------------------- custom

def _custom_rows(path: Path, problems: _Problems) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a caption table (JSONL objects or CSV with a header)."""
    lines = _text_lines(path, problems)
    if path.suffix.lower() == ".csv":
        numbers = [n for n, _ in lines]
        reader = csv.DictReader([text for _, text in lines])
        if reader.fieldnames is not None and not {"image", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{path}:{numbers[0]}: the CSV header needs the columns image and caption "
                            f"(found {reader.fieldnames})")
        for row in reader:
            yield f"{path}:{numbers[reader.line_num - 1]}", row
        return
    for n, text in lines:
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            problems(f"{path}:{n}: malformed JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            problems(f"{path}:{n}: expected a JSON object with \"image\" and \"caption\"")
            continue
        yield f"{path}:{n}", row


def make_custom_index(annotations: str | os.PathLike, tokenizer: Any, *, image_dir: str | os.PathLike | None = None,
                      data_path: str | os.PathLike | None = None, val_fraction: float = 0.1,
                      test_fraction: float = 0.1, seed: int = 0, num_max_bpe_tokens: int = 32,
                      check_images: bool = False, skip_bad: bool = False) -> IndexSummary:
    """A table of ``image, caption`` rows (JSONL or CSV; several rows per image allowed; optional
    ``split`` = train/val/test and ``image_id`` columns) -> ``coco_captioning.{train,val,test}.jsonl``
    and ``coco_karpathy_{val,test}_gt.json`` in ``data_path`` (default: the annotation file's folder).

    ``image`` is relative to ``image_dir`` (default: the annotation file's folder). Images without a
    split are split per image, seeded: ``val_fraction``/``test_fraction`` of them go to val/test.
    Without an ``image_id`` column images are numbered 0, 1, ... in order of first appearance.
    """
    src = Path(annotations)
    image_dir = Path(image_dir) if image_dir is not None else src.parent
    root = Path(data_path) if data_path is not None else src.parent
    summary = IndexSummary(text_limit=num_max_bpe_tokens - 2)
    problems = _Problems(summary, skip_bad)
    by_image: dict[str, tuple[_Item, str]] = {}
    ids: dict[int, str] = {}
    for where, row in _custom_rows(src, problems):
        image, caption = row.get("image"), row.get("caption")
        split = str(row.get("split") or "").strip()
        if not isinstance(image, str) or not image.strip() or caption is None:
            problems(f"{where}: needs \"image\" and \"caption\" (got keys {sorted(row)})")
            continue
        if split and split not in _SPLIT_NAMES:
            problems(f"{where}: unknown split {split!r} (use train, val or test)")
            continue
        split = _SPLIT_NAMES.get(split, "")
        if image in by_image:
            item, first_split = by_image[image]
            if row.get("image_id") not in (None, "") and str(row["image_id"]) != str(item.image_id):
                problems(f"{where}: image {image!r} has image id {row['image_id']!r}, but {item.where} gave {item.image_id}")
            elif split and first_split and split != first_split:
                problems(f"{where}: image {image!r} is in split {split!r}, but {item.where} put it in {first_split!r}")
            else:
                item.captions.append(caption)
                if split and not first_split:
                    by_image[image] = (item, split)
            continue
        try:
            image_id = int(row["image_id"]) if row.get("image_id") not in (None, "") else len(by_image)
        except (TypeError, ValueError):
            problems(f"{where}: image_id {row['image_id']!r} is not an integer")
            continue
        if image_id in ids:
            problems(f"{where}: duplicate image id {image_id} (first used at {ids[image_id]})")
            continue
        ids[image_id] = where
        file = Path(os.path.abspath(image_dir / image))
        try:
            rel = file.relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            rel = str(file)
        by_image[image] = (_Item(rel, image_id, [caption], where), split)
    if not by_image:
        raise DataError(f"{src}: no usable rows")
    splits: dict[str, list[_Item]] = {"train": [], "val": [], "test": []}
    unassigned = []
    for item, split in by_image.values():
        (splits[split] if split else unassigned).append(item)
    random.Random(seed).shuffle(unassigned)
    # at least one val/test image when asked for and there are enough images to go round
    n_val, n_test = (max(1, round(len(unassigned) * f)) if f > 0 and len(unassigned) > 2 else 0
                     for f in (val_fraction, test_fraction))
    splits["val"] += unassigned[:n_val]
    splits["test"] += unassigned[n_val:n_val + n_test]
    splits["train"] += unassigned[n_val + n_test:]
    for split, items in splits.items():
        items = _check_items(sorted(items, key=lambda it: it.image_id), root, problems, summary, check_images,
                             True, src)
        _emit(root, f"coco_captioning.{split}.jsonl", split, items, tokenizer if split == "train" else None,
              summary, problems, None if split == "train" else f"coco_karpathy_{split}_gt.json")
    return summary
