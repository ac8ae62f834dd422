"""Text segments, masking, the training/evaluation datasets and collation, on real index files and images."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from beit3cap.data.dataset import (CaptioningEvalDataset, CaptioningTrainDataset, collate, get_text_segment,
                                   mask_text_tokens, num_to_mask)
from beit3cap.data.transforms import ImageLoadError, build_transform

MASK, VOCAB = 64001, 64002


def _write_index(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """data_path with 8 small JPEG/PNG images and a training index of 12 rows (some images twice)."""
    root = tmp_path_factory.mktemp("tree")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        name = f"imgs/{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)).save(root / name)
        rows.append({"image_path": name, "text_segment": [int(t) for t in rng.integers(4, 60000, 3 + 4 * i)],
                     "image_id": 100 + i})
    rows += [dict(rows[i], text_segment=rows[i]["text_segment"][::-1]) for i in (1, 3, 5, 6)]
    _write_index(root / "train.jsonl", rows)
    return root


def _train_ds(root, index="train.jsonl", **kw):
    args = dict(transform=build_transform(True, 32, randaug=True), num_max_bpe_tokens=16, mask_prob=0.7,
                mask_token_id=MASK, vocab_size=VOCAB, seed=0)
    args.update(kw)
    return CaptioningTrainDataset(root, [index], **args)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


# ----------------------------------------------------------------------------------------- text segment

def test_text_segment_padding_exact_fit_and_truncation():
    tokens, pad, n = get_text_segment([7, 8, 9], 8)
    assert tokens == [0, 7, 8, 9, 2, 1, 1, 1] and pad == [0, 0, 0, 0, 0, 1, 1, 1] and n == 5
    tokens, pad, n = get_text_segment([7, 8, 9, 10, 11, 12], 8)  # exactly max_len - 2 ids: no padding
    assert tokens == [0, 7, 8, 9, 10, 11, 12, 2] and pad == [0] * 8 and n == 8
    tokens, pad, n = get_text_segment(list(range(10, 30)), 8)  # truncated, still ends with EOS
    assert tokens == [0, 10, 11, 12, 13, 14, 15, 2] and pad == [0] * 8 and n == 8


def test_empty_caption_is_an_error_naming_the_row():
    with pytest.raises(ValueError, match="train.jsonl:7: empty caption"):
        get_text_segment([], 8, where="train.jsonl:7")


# ----------------------------------------------------------------------------------------- masking

def test_mask_count_formula():
    # Spec §5.4 example: 10 pieces -> 12 tokens, p = 0.7 -> 8 positions.
    assert num_to_mask(12, 0.7) == 8
    assert num_to_mask(3, 0.1) == 1      # int(0.8) = 0 -> at least 1
    assert num_to_mask(10, 1.0) == 9     # capped at num_tokens - 1 (BOS is never eligible)
    assert num_to_mask(4, 0.625) == 3    # int(2.5 + 0.5): halves round up
    assert num_to_mask(64, 0.7) == 45
    rng = random.Random(0)
    for n in range(3, 65):
        for p in (0.0, 0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 1.0):
            expected = max(min(int(n * p + 0.5), n - 1), 1)
            tokens, _, num = get_text_segment(list(range(10, 10 + n - 2)), 66)
            masked, pos = mask_text_tokens(tokens, num, p, MASK, VOCAB, rng)
            assert sum(pos) == expected == num_to_mask(n, p)
            assert pos[0] == 0 and not any(pos[n:])  # BOS and padding never chosen
            assert all(m == t for m, t, c in zip(masked, tokens, pos) if not c)


def test_eos_can_be_masked_and_all_eligible_positions_are_reached():
    rng = random.Random(1)
    hits = np.zeros(12, int)
    for _ in range(500):
        tokens, _, n = get_text_segment([5, 6, 7, 8, 9, 10, 11], 12)  # n = 9, 3 padding
        _, pos = mask_text_tokens(tokens, n, 0.3, MASK, VOCAB, rng)
        hits += pos
    assert hits[0] == 0 and (hits[1:9] > 0).all() and (hits[9:] == 0).all()
    # Uniform over the 8 eligible positions: each chosen ~ 500 * 3/8 times.
    assert np.abs(hits[1:9] / 500 - 3 / 8).max() < 0.1


def test_replacement_distribution_80_10_10():
    rng = random.Random(2)
    original = list(range(1000, 1063))
    kinds = {"mask": 0, "same": 0, "random": 0}
    for _ in range(400):
        tokens, _, n = get_text_segment(original, 65)
        masked, pos = mask_text_tokens(tokens, n, 0.7, MASK, VOCAB, rng)
        for m, t, c in zip(masked, tokens, pos):
            if c:
                kinds["mask" if m == MASK else "same" if m == t else "random"] += 1
    total = sum(kinds.values())  # 400 * 46 = 18400; the std of a 10 % share is ~0.0022
    assert total == 400 * num_to_mask(65, 0.7)
    assert abs(kinds["mask"] / total - 0.8) < 0.015
    assert abs(kinds["same"] / total - 0.1) < 0.015
    assert abs(kinds["random"] / total - 0.1) < 0.015


def test_random_replacement_range_includes_unk_and_mask():
    # Spec §9 item 10 (kept for parity): random ids are uniform in [3, vocab_size - 1].
    rng = random.Random(3)
    seen = []
    for _ in range(3000):
        masked, pos = mask_text_tokens([0, 5, 2], 3, 0.1, 9, 10, rng)
        seen.append(masked[pos.index(1)])
    assert set(seen) <= {2, 5, *range(3, 10)} and {3, 4, 6, 7, 8} <= set(seen)
    assert seen.count(3) / len(seen) == pytest.approx(0.1 / 7, abs=0.012)  # <unk> from the random branch


# ----------------------------------------------------------------------------------------- training dataset

def test_training_sample_fields(tree):
    ds = _train_ds(tree)
    assert len(ds) == 12
    s = ds[2]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["image_id"] == 102
    for k in ("language_tokens", "masked_tokens", "padding_mask", "language_masked_pos"):
        assert s[k].shape == (16,) and s[k].dtype == torch.long
    segment = json.loads((tree / "train.jsonl").read_text().splitlines()[2])["text_segment"]
    assert s["language_tokens"].tolist() == [0, *segment, 2, 1, 1, 1]  # 11 ids + BOS/EOS, 3 pads
    assert s["padding_mask"].tolist() == [0] * 13 + [1] * 3
    assert s["language_masked_pos"].sum() == num_to_mask(13, 0.7)
    long = ds[5]  # 23 ids: truncated to 14, EOS kept
    segment = json.loads((tree / "train.jsonl").read_text().splitlines()[5])["text_segment"]
    assert long["language_tokens"].tolist() == [0, *segment[:14], 2] and long["padding_mask"].sum() == 0


def test_same_sample_whatever_the_order_workers_or_resume(tree):
    ds = _train_ds(tree)
    direct = [ds[i] for i in range(len(ds))]
    assert _equal(ds[7], direct[7])  # fetched alone, after others: as after a resume mid-epoch
    state, np_state, py_state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    ds[3]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generators are left alone
    assert np.array_equal(np.random.get_state()[1], np_state) and random.getstate() == py_state

    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=collate)
        batches = list(loader)
        for key in direct[0]:
            assert torch.equal(torch.cat([b[key] for b in batches]), collate(direct)[key]), (workers, key)

    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(len(ds))]
    assert sum(not torch.equal(a["masked_tokens"], b["masked_tokens"]) for a, b in zip(direct, epoch1)) >= 6
    assert all(not torch.equal(a["image"], b["image"]) for a, b in zip(direct, epoch1))
    loader = DataLoader(ds, batch_size=12, num_workers=2, collate_fn=collate)
    assert torch.equal(next(iter(loader))["masked_tokens"], collate(epoch1)["masked_tokens"])
    ds.set_epoch(0)
    assert _equal(ds[5], direct[5])
    other_seed = _train_ds(tree, seed=1)
    assert not torch.equal(other_seed[5]["image"], direct[5]["image"])


def test_paths_relative_or_absolute_and_several_index_files(tree, tmp_path):
    rows = [{"image_path": str(tree / "imgs/0.jpg"), "text_segment": [5, 6], "image_id": 1},
            {"image_path": "imgs/1.png", "text_segment": [7], "image_id": 2}]
    _write_index(tmp_path / "extra.jsonl", rows)
    ds = CaptioningTrainDataset(tree, ["train.jsonl", tmp_path / "extra.jsonl"],
                                build_transform(False, 16), 8, 0.5, MASK, VOCAB)
    assert len(ds) == 14 and ds.image_path(12) == tree / "imgs/0.jpg" and ds.image_path(13) == tree / "imgs/1.png"
    assert ds[13]["language_tokens"].tolist() == [0, 7, 2, 1, 1, 1, 1, 1]
    assert ds.where(13) == f"{tmp_path / 'extra.jsonl'}:2"


@pytest.mark.parametrize("row,message", [
    ({"image_path": "imgs/0.jpg", "text_segment": [], "image_id": 1}, r"bad.jsonl:2: .*empty caption"),
    ({"image_path": "imgs/0.jpg", "text_segment": None, "image_id": 1}, r"bad.jsonl:2: .*no text_segment"),
    ({"image_path": "imgs/0.jpg", "text_segment": [5, "x"], "image_id": 1}, r"bad.jsonl:2: expected \{"),
    ({"image_path": "imgs/0.jpg", "text_segment": [5, 70000], "image_id": 1}, r"bad.jsonl:2: token id 70000"),
    ({"image_path": "imgs/0.jpg", "text_segment": [5]}, r"bad.jsonl:2: expected \{"),
    ("{not json", r"bad.jsonl:2: malformed JSON"),
])
def test_bad_index_rows_name_file_and_line(tree, tmp_path, row, message):
    good = json.dumps({"image_path": "imgs/0.jpg", "text_segment": [5], "image_id": 0})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(ValueError, match=message):
        _train_ds(tree, index=tmp_path / "bad.jsonl")


def test_missing_or_corrupt_image_names_image_and_row(tree, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _write_index(tmp_path / "idx.jsonl", [
        {"image_path": "imgs/0.jpg", "text_segment": [5], "image_id": 0},
        {"image_path": "imgs/nope.jpg", "text_segment": [5], "image_id": 1},
        {"image_path": str(tmp_path / "junk.jpg"), "text_segment": [5], "image_id": 2}])
    ds = _train_ds(tree, index=tmp_path / "idx.jsonl")
    with pytest.raises(ImageLoadError, match=r"nope\.jpg.*idx\.jsonl:2"):
        ds[1]
    with pytest.raises(ImageLoadError, match=r"junk\.jpg.*idx\.jsonl:3"):
        ds[2]
    with pytest.raises(FileNotFoundError, match="index file not found"):
        _train_ds(tree, index="absent.jsonl")


def test_real_tokenizer_and_generated_coco_tree(coco_tree, tokenizer):
    ds = CaptioningTrainDataset(coco_tree, ["coco_captioning.train.jsonl"], build_transform(True, 32, randaug=True),
                                num_max_bpe_tokens=32, mask_prob=0.7, mask_token_id=tokenizer.mask_token_id,
                                vocab_size=tokenizer.vocab_size, seed=42)
    assert len(ds) == 24 * 5
    batch = next(iter(DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate)))
    assert batch["image"].shape == (8, 3, 32, 32)
    assert ((batch["masked_tokens"] == tokenizer.mask_token_id) <= batch["language_masked_pos"].bool()).all()
    assert (batch["language_masked_pos"].bool() & batch["padding_mask"].bool()).sum() == 0


# ----------------------------------------------------------------------------------------- eval dataset

def test_eval_dataset_one_sample_per_image_id_in_first_seen_order(tree, tmp_path):
    rows = [{"image_path": f"imgs/{i}.{'png' if i % 2 else 'jpg'}", "text_segment": [5 + k], "image_id": i}
            for i, k in [(3, 0), (1, 0), (3, 1), (0, 0), (1, 1), (3, 2)]]
    rows.append({"image_path": "imgs/4.jpg", "text_segment": None, "image_id": 9})
    _write_index(tmp_path / "val.jsonl", rows)
    ds = CaptioningEvalDataset(tree, tmp_path / "val.jsonl", build_transform(False, 24))
    assert ds.image_ids == [3, 1, 0, 9] and len(ds) == 4
    assert ds.image_path_of(9) == tree / "imgs/4.jpg"
    s = ds[1]
    assert set(s) == {"image", "image_id"} and s["image_id"] == 1 and s["image"].shape == (3, 24, 24)
    assert torch.equal(ds[1]["image"], s["image"])
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image_id"].tolist() == [3, 1, 0, 9] and batch["image_id"].dtype == torch.long

    rows.append({"image_path": "imgs/5.png", "text_segment": None, "image_id": 3})
    _write_index(tmp_path / "clash.jsonl", rows)
    with pytest.raises(ValueError, match=r"clash.jsonl:8: image_id 3 .* line 1"):
        CaptioningEvalDataset(tree, tmp_path / "clash.jsonl", build_transform(False, 24))


def test_eval_dataset_on_generated_coco_val(coco_tree):
    ds = CaptioningEvalDataset(coco_tree, "coco_captioning.val.jsonl", build_transform(False, 32))
    gt = json.loads((coco_tree / "coco_karpathy_val_gt.json").read_text())
    assert sorted(ds.image_ids) == sorted(img["id"] for img in gt["images"])


# ----------------------------------------------------------------------------------------- collate

def test_collate_stacks_tensors_and_makes_ints_long():
    samples = [{"image": torch.full((3, 2, 2), float(i)), "image_id": i, "ids": [i, i + 1]} for i in range(3)]
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 2, 2) and batch["image"][2, 0, 0, 0] == 2.0
    assert batch["image_id"].dtype == torch.long and batch["image_id"].tolist() == [0, 1, 2]
    assert batch["ids"].dtype == torch.long and batch["ids"].tolist() == [[0, 1], [1, 2], [2, 3]]
    with pytest.raises(ValueError, match="different fields"):
        collate([samples[0], {"image": samples[1]["image"]}])
