"""``beit3cap caption PATH...``: caption image files, folders (recursively) and glob patterns.

Prints ``file<TAB>caption`` per image to stdout, or writes JSONL/CSV with ``--output``; unreadable files are
reported on stderr and do not stop the others. Exit status: 0 if every image got a caption, 1 if any input
failed (the other captions are still printed or written), 2 for bad arguments or an unloadable checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

from ..captioner import Captioner, CaptionResult, find_images
from ..fileio import atomic_write, atomic_write_jsonl

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beit3cap caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob pattern (quote it)")
    p.add_argument("--checkpoint", "--finetune", dest="checkpoint", required=True,
                   help="fine-tuned captioning checkpoint (.pth with 'model' or 'module', DeepSpeed folder, "
                        "safetensors)")
    p.add_argument("--sentencepiece_model", "--sentencepiece-model", dest="spm", required=True,
                   help="the sentencepiece model the checkpoint was trained with (beit3.spm)")
    p.add_argument("--model", default=None,
                   help="architecture, e.g. beit3_base_patch16_480 (default: from the checkpoint)")
    p.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=3)
    p.add_argument("--max_len", "--max-len", dest="max_len", type=int, default=32,
                   help="text length budget incl. BOS and the MASK slot: at most max_len - 3 words "
                        "(official evaluation: --num_max_bpe_tokens, 64 by default) (default %(default)s)")
    p.add_argument("--length_penalty", "--length-penalty", dest="length_penalty", type=float, default=0.6)
    p.add_argument("--strategy", choices=("beam", "greedy", "sample"), default="beam")
    p.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0, help="sampling: keep the k best words")
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=1.0, help="sampling: nucleus mass")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--forbid_special", "--forbid-special", dest="forbid_special", action="store_true",
                   help="never emit BOS/PAD/UNK/MASK or unused vocabulary rows (the official decoder may)")
    p.add_argument("--amp", choices=tuple(AMP), default="none",
                   help="autocast precision (bf16 needs a CPU/GPU that runs it fast; fp16 is for GPUs)")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--output", "-o", default=None, help="write results to this .jsonl or .csv file")
    p.add_argument("--no_progress", "--no-progress", dest="progress", action="store_false",
                   help="no progress bar (it is shown only when stderr is a terminal)")
    return p


def _write(path: Path, results: list[CaptionResult]) -> None:
    rows = [{"file": r.source, "caption": r.caption, "score": r.score, "error": r.error} for r in results]
    if path.suffix.lower() == ".jsonl":
        atomic_write_jsonl(path, rows)
        return

    def write_csv(f) -> None:
        writer = csv.DictWriter(f, fieldnames=["file", "caption", "score", "error"])
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    atomic_write(path, write_csv)


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in (".jsonl", ".csv"):
        parser.error(f"--output must end in .jsonl or .csv, got {output.name}")

    images, problems = find_images(args.paths)
    for r in problems:
        print(f"error: {r.error}", file=sys.stderr)
    if not images:
        print("error: no images to caption", file=sys.stderr)
        return 2 if not problems else 1
    try:
        captioner = Captioner.from_checkpoint(
            args.checkpoint, args.spm, args.model, device=args.device, num_beams=args.num_beams,
            max_len=args.max_len, length_penalty=args.length_penalty, strategy=args.strategy, top_k=args.top_k,
            top_p=args.top_p, temperature=args.temperature, seed=args.seed, forbid_special=args.forbid_special,
            amp_dtype=AMP[args.amp])
        stream = captioner.iter_captions(images, batch_size=args.batch_size,
                                         progress=args.progress and sys.stderr.isatty())
        results = []
        for r in stream:
            results.append(r)
            if r.error is not None:
                print(f"error: {r.error}", file=sys.stderr)
            elif output is None:
                print(f"{r.source}\t{r.caption}", flush=True)
    except BrokenPipeError:  # the reader stopped early (`beit3cap caption dir | head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 1
    except (OSError, ValueError) as e:  # unreadable checkpoint/tokenizer, mismatched sizes, bad options
        print(f"error: {e}", file=sys.stderr)
        return 2
    captioned = sum(r.error is None for r in results)
    if output is not None:
        _write(output, problems + results)
        print(f"Captioned {captioned} of {len(results)} images into {output}", file=sys.stderr)
    return 0 if captioned == len(results) and not problems else 1
