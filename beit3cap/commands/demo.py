"""``beit3cap demo [--out DIR] [--minutes N] [--quick]``: train a small captioner from scratch on generated
data with the run_beit3_finetuning.py training code, evaluate it and write DIR/report.html."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="beit3cap demo",
        description="Generate a COCO-layout dataset of shape images, train a small BEiT-3 captioner on it from "
                    "scratch with the training code of run_beit3_finetuning.py, caption held-out images with "
                    "beam search, score them (BLEU, METEOR, ROUGE-L, CIDEr-D) and write DIR/report.html.",
        epilog="The default run takes about 4 minutes on 2 CPU cores; --quick about 1 minute.")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: ./beit3cap-demo); a folder holding an "
                                               "earlier demo run is overwritten, any other non-empty one refused")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, metavar="N",
                        help="fit the whole run into about N minutes: measures the step time here and sizes "
                             "the dataset and epochs to match (default: the fixed default plan)")
    budget.add_argument("--quick", action="store_true",
                        help="a one-minute run with a smaller dataset and 2 epochs (used by the end-to-end test)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ..demo import default_out_dir, resolve_plan, run_demo

    run_demo(args.out or default_out_dir(), resolve_plan(args.quick, args.minutes))
    return 0
