"""``beit3cap synth coco|nocaps|wts``: write a generated dataset in a seed document's layout."""

from __future__ import annotations

import argparse

from ..data.synth import WTS_CAPTION_TYPES, make_coco_tree, make_nocaps_tree, make_wts_tree


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3cap synth", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    layouts = {
        "coco": "train2014/, val2014/, dataset_coco.json (Karpathy splits train/restval/val/test, 5 captions)",
        "nocaps": "val/, test/, nocaps_val_4500_captions.json, nocaps_test_image_info.json (10 captions); "
                  "with --n-train also the COCO training tree NoCaps trains on",
        "wts": "avg_normal_244_{train,test}/<video>phase<label>.png and "
               "<kind>_caption/{train,val}/<kind>_caption_<type>_datasets.json",
    }
    for name, help_text in layouts.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", required=True, help="root folder to write")
        p.add_argument("--n-train", type=int, default={"coco": 400, "nocaps": 0, "wts": 20}[name],
                       help="training images (WTS: videos) (default %(default)s)")
        p.add_argument("--n-val", type=int, default={"coco": 50, "nocaps": 50, "wts": 5}[name],
                       help="validation images (WTS: videos) (default %(default)s)")
        if name != "wts":
            p.add_argument("--n-test", type=int, default=50, help="test images (default %(default)s)")
        p.add_argument("--image-size", type=int, default=64, help="side in pixels (default %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default %(default)s)")
        if name == "wts":
            p.add_argument("--phases", type=int, default=5, help="phase images per video (default %(default)s)")
            p.add_argument("--ext", choices=(".png", ".jpg"), default=".png", help="image format (default %(default)s)")
            p.add_argument("--prefix", default="", help="file-name prefix (the fork's 'type', e.g. avg)")
            p.add_argument("--kind", dest="wts_kind", default="vehicle", choices=("vehicle", "pedestrian"))
            p.add_argument("--caption-types", nargs="+", default=["moving"], choices=WTS_CAPTION_TYPES)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    common = {"image_size": args.image_size, "seed": args.seed}
    if args.kind == "coco":
        root = make_coco_tree(args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, **common)
    elif args.kind == "nocaps":
        root = make_nocaps_tree(args.out, n_val=args.n_val, n_test=args.n_test, n_train=args.n_train, **common)
    else:
        root = make_wts_tree(args.out, n_train=args.n_train, n_val=args.n_val, phases=args.phases, ext=args.ext,
                             prefix=args.prefix, kind=args.wts_kind, caption_types=tuple(args.caption_types),
                             **common)
    print(f"wrote a generated {args.kind} tree to {root}")
    return 0
