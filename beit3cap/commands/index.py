"""``beit3cap index coco|nocaps|wts|custom``: build index files and ground-truth files."""

from __future__ import annotations

import argparse
import logging
import sys

from ..data.index import (DataError, make_coco_captioning_index, make_custom_index, make_nocaps_captioning_index,
                          make_wts_index)


def _common(p: argparse.ArgumentParser, tokenizer: bool = True, max_tokens: int = 32) -> None:
    if tokenizer:
        p.add_argument("--sentencepiece-model", "--sentencepiece_model", dest="spm", required=True,
                       help="sentencepiece model (beit3.spm) used to tokenize training captions")
        p.add_argument("--num-max-bpe-tokens", "--num_max_bpe_tokens", dest="max_tokens", type=int,
                       default=max_tokens, help="only for the report: captions longer than this minus 2 pieces "
                       "are counted (they are truncated when training) (default %(default)s)")
    p.add_argument("--check-images", action="store_true",
                   help="decode every image to catch unreadable or truncated files (a missing file is always caught)")
    p.add_argument("--skip-bad", action="store_true",
                   help="warn about and leave out bad items (missing images, empty captions, duplicate ids, "
                        "malformed lines) instead of stopping at the first")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3cap index", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("coco", help="dataset_coco.json (Karpathy) -> coco_captioning.{train,val,test}.jsonl")
    p.add_argument("--data-path", "--data_path", dest="data_path", required=True,
                   help="folder with train2014/, val2014/ and dataset_coco.json")
    _common(p)
    p = sub.add_parser("nocaps", help="NoCaps val/test json -> nocaps.{val,test}.jsonl")
    p.add_argument("--data-path", "--data_path", dest="data_path", required=True,
                   help="folder with val/, test/, nocaps_val_4500_captions.json, nocaps_test_image_info.json")
    _common(p, tokenizer=False)
    p = sub.add_parser("wts", help="a WTS caption JSON -> <out-dir>/coco_captioning.<split-name>.jsonl")
    p.add_argument("caption_json", help="e.g. vehicle_caption/train/vehicle_caption_moving_datasets.json")
    p.add_argument("--image-dir", "--image_dir", dest="image_dir", required=True,
                   help="folder of <type><video>phase<label>.png/.jpg images")
    p.add_argument("--split-name", "--split_name", dest="split_name", default="train",
                   help="train: one row per caption; anything else: one row per image plus a GT file")
    p.add_argument("--type", default="", help="file-name prefix of the images, e.g. 'avg' (default: none)")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir", default=".", help="where to write (default: here)")
    _common(p, max_tokens=64)
    p = sub.add_parser("custom", help="a JSONL/CSV table of image, caption[, split, image_id] rows")
    p.add_argument("annotations", help="JSONL objects or CSV with a header: image, caption[, split][, image_id]")
    p.add_argument("--image-dir", "--image_dir", dest="image_dir",
                   help="folder the 'image' column is relative to (default: the table's folder)")
    p.add_argument("--data-path", "--data_path", dest="data_path",
                   help="where to write the index (the --data_path of training; default: the table's folder)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of images without a split for val")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of images without a split for test")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    _common(p)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    common = {"check_images": args.check_images, "skip_bad": args.skip_bad}
    try:
        tokenizer = None
        if hasattr(args, "spm"):
            from ..tokenizer import load_tokenizer  # imports torch: only when a tokenizer is needed
            tokenizer = load_tokenizer(args.spm)
            common["num_max_bpe_tokens"] = args.max_tokens
        if args.kind == "coco":
            summary = make_coco_captioning_index(args.data_path, tokenizer, **common)
        elif args.kind == "nocaps":
            summary = make_nocaps_captioning_index(args.data_path, **common)
        elif args.kind == "wts":
            summary = make_wts_index(args.caption_json, tokenizer, args.image_dir, split_name=args.split_name,
                                     type=args.type, out_dir=args.out_dir, **common)
        else:
            summary = make_custom_index(args.annotations, tokenizer, image_dir=args.image_dir,
                                        data_path=args.data_path, val_fraction=args.val_fraction,
                                        test_fraction=args.test_fraction, seed=args.seed, **common)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"beit3cap index: error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0
