"""``beit3cap score PREDICTIONS --gt GT.json``: COCO caption metrics of a prediction file.

Prints a table of BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE (the pycocoevalcap 1.2 values) and, with
``--out``, writes them as one JSON line like the official ``coco_captioning_result.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

from beit3cap.fileio import atomic_write
from beit3cap.metrics import METRICS, CaptionScores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3cap score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help='COCO results list: [{"image_id": int, "caption": str}, ...]')
    parser.add_argument("--gt", required=True,
                        help="COCO-format ground truth (coco_karpathy_test_gt.json, nocaps_val_gt.json, ...)")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), metavar="NAME",
                        help=f"any of {', '.join(METRICS)} (space or comma separated; default: all)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="score only the images both files share instead of stopping at missing, duplicate "
                             "or unknown image ids (CIDEr-D's idf then comes from that subset)")
    parser.add_argument("--out", help="write the scores as one JSON line to this file")
    parser.add_argument("--per-image", metavar="JSONL", help="also write one line of scores per image")
    return parser


def _table(scores: CaptionScores) -> str:
    rows = [(name, "n/a" if value is None else f"{value:.4f}") for name, value in scores.corpus.items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"{name}: {note}" for name, note in scores.notes.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    metrics = [m for item in args.metrics for m in item.split(",") if m]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        print(f"beit3cap score: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}",
              file=sys.stderr)
        return 2

    # Imported here so `--help` and argument errors stay instant.
    from beit3cap.evaluate import (GroundTruthError, PredictionError, evaluate_predictions, load_ground_truth,
                                   load_predictions, write_result)
    from beit3cap.metrics import JavaNotFoundError

    try:
        gts = load_ground_truth(args.gt)
        scores = evaluate_predictions(load_predictions(args.predictions), gts, args.allow_partial, metrics,
                                      source=args.predictions)
    except (FileNotFoundError, PredictionError, GroundTruthError) as exc:
        print(f"beit3cap score: error: {exc}", file=sys.stderr)
        return 2
    except JavaNotFoundError as exc:
        print(f"beit3cap score: error: {exc}", file=sys.stderr)
        return 1

    print(f"{len(scores.image_ids)} images scored ({args.predictions} against {args.gt})")
    print(_table(scores))
    if args.out:
        write_result(args.out, scores.corpus)
        print(f"wrote {args.out}")
    if args.per_image:
        rows = scores.image_rows()
        atomic_write(args.per_image, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {args.per_image}")
    return 0
