"""Shared fixtures, built once per test run: a sentencepiece model trained on generated captions,
its tokenizer, and tiny model names."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from beit3cap.tokenizer import load_tokenizer, train_sentencepiece

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]


def caption_corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 3)
        size = rng.choice(["small", "large", "big", "tiny"])
        out.append(f"{'A' if k == 1 else k} {size} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
                   f"{'' if k == 1 else 's'} {rng.choice(PLACES)} of the picture.")
    return out


@pytest.fixture(scope="session")
def coco_demo_results() -> Path:
    """coco-caption's demo results file (1000 real COCO val2014 captions), from the project's shared/ folder,
    which lies beside the checkout (as in CI)."""
    path = (Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-caption-demo"
            / "captions_val2014_fakecap_results.json")
    if not path.is_file():
        pytest.skip(f"{path} not found: these tests need the project's shared/ folder beside the checkout")
    return path


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
    return train_sentencepiece(caption_corpus(), tmp_path_factory.mktemp("spm") / "test.spm", vocab_size=120)


@pytest.fixture(scope="session")
def tokenizer(spm_path):
    return load_tokenizer(spm_path)


@pytest.fixture(scope="session")
def tiny_vocab(tokenizer) -> int:
    """Model vocabulary rows for the test tokenizer (ids up to and including <mask>, plus dead rows)."""
    return tokenizer.vocab_size + 3


@pytest.fixture(scope="session")
def coco_tree(tmp_path_factory, tokenizer):
    """A generated COCO Karpathy tree (32 px JPEGs; 24 train+restval / 8 val / 8 test images, 5 captions
    each, seed 0) with ``coco_captioning.{train,val,test}.jsonl`` and ``coco_karpathy_{val,test}_gt.json``
    already built with the ``tokenizer`` fixture. Treat it as read-only: it is shared by the session."""
    from beit3cap.data.index import make_coco_captioning_index
    from beit3cap.data.synth import make_coco_tree

    root = make_coco_tree(tmp_path_factory.mktemp("coco_tree"), n_train=24, n_val=8, n_test=8, image_size=32, seed=0)
    make_coco_captioning_index(root, tokenizer)
    return root
