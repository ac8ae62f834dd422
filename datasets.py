"""Seed compatibility: the index-building snippets of the BEiT-3 captioning guide and of the WTS fork
run unchanged from the repository root (``from datasets import CaptioningDataset, ...``).

The work is done by :mod:`beit3cap.data.index`; this module only keeps the official names. The
training/evaluation datasets live in :mod:`beit3cap.data.dataset`.

Note: from the repository root this file shadows the HuggingFace ``datasets`` package.
"""

from __future__ import annotations

import os
from typing import Any

from beit3cap.data.index import (IndexSummary, make_coco_captioning_index, make_nocaps_captioning_index,
                                 make_wts_index)


class CaptioningDataset:
    """Holder of the official static index builders (the dataset itself is
    ``beit3cap.data.dataset.CaptioningTrainDataset`` / ``CaptioningEvalDataset``)."""

    @staticmethod
    def make_coco_captioning_dataset_index(data_path: str | os.PathLike, tokenizer: Any, **kwargs: Any) -> IndexSummary:
        summary = make_coco_captioning_index(data_path, tokenizer, **kwargs)
        print(summary)
        return summary

    @staticmethod
    def make_nocaps_captioning_dataset_index(data_path: str | os.PathLike, **kwargs: Any) -> IndexSummary:
        summary = make_nocaps_captioning_index(data_path, **kwargs)
        print(summary)
        return summary


def _make_captioning_coco_karpathy_dataset_index(data_path: str | os.PathLike, tokenizer: Any,
                                                 image_dir: str | os.PathLike, split: Any = ("train", "restval"),
                                                 split_name: str = "train", type: str = "avg",
                                                 **kwargs: Any) -> IndexSummary:
    """The WTS fork's signature (spec §11.1): ``data_path`` is a caption JSON, the index is written to
    the current directory as ``coco_captioning.<split_name>.jsonl``; ``split`` is ignored, as there."""
    summary = make_wts_index(data_path, tokenizer, image_dir, split_name=split_name, type=type, **kwargs)
    print(summary)
    return summary
