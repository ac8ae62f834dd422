"""``beit3cap spm INPUT... --output X.spm --vocab-size N``: train a sentencepiece model on captions."""

from __future__ import annotations

import argparse
import json
import sys

from ..tokenizer import load_tokenizer, read_caption_texts, train_sentencepiece


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beit3cap spm", description=__doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="caption files: .txt (one per line), .jsonl/.csv with a 'caption' column, "
                             "dataset_coco.json, a COCO annotation file or a WTS caption JSON")
    parser.add_argument("--output", required=True, help="model file to write, e.g. beit3.spm")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                        help="sentencepiece algorithm (default bpe: whole words on small caption sets)")
    parser.add_argument("--vocab-size", type=int, default=1000,
                        help="upper bound on sentencepiece pieces (default %(default)s)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    texts: list[str] = []
    for path in args.inputs:
        try:
            texts += read_caption_texts(path)
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            kind = "malformed JSON" if isinstance(e, json.JSONDecodeError) else type(e).__name__
            print(f"beit3cap spm: error: {path}: cannot read captions ({kind}: {e})", file=sys.stderr)
            return 1
    try:
        out = train_sentencepiece(texts, args.output, vocab_size=args.vocab_size, model_type=args.model_type)
    except ValueError as e:
        print(f"beit3cap spm: error: {e}", file=sys.stderr)
        return 1
    tok = load_tokenizer(out)
    print(f"wrote {out}: {len(tok.sp_model)} pieces from {len(texts)} captions "
          f"(model vocabulary needs at least {tok.vocab_size} rows)")
    return 0
