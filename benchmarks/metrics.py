"""Caption metrics: beit3cap.metrics vs pycocoevalcap 1.2 on generated COCO-like captions.

5,000 images x 5 references (by default); the hypothesis of an image is one of its references with some
words replaced, dropped or repeated, so the scores look like a real captioner's. Both sides score the same
already tokenized captions: BLEU-1..4 + ROUGE-L + CIDEr-D (pycocoevalcap's pure-Python scorers vs our
vectorised ones), then METEOR (both run the wheel's METEOR 1.5 jar), then PTB tokenization and a full
evaluation without SPICE. Every score is asserted equal (1e-9, per image and corpus) before any time is
reported.

    .venv/bin/python benchmarks/metrics.py [--images 5000] [--refs 5] [--repeats 3] [--no-meteor] [--no_write]

Prints a table and replaces the "Caption metrics" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_section, machine_summary  # noqa: E402

from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.meteor.meteor import Meteor  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

from beit3cap.metrics import evaluate_captions, native_scores, ptb_tokenize  # noqa: E402
from beit3cap.metrics.java import Meteor as OurMeteor  # noqa: E402

SUBJECTS = "man woman dog cat bus train plate pizza giraffe skier surfer kitchen bathroom elephant horse".split()
WORDS = ("a an the of on in with near at to and two three is are sitting standing riding holding eating "
         "parked flying white black red blue green large small young street table field water beach snow grass "
         "room sky building road front top side next some people group couple several").split()


def make_captions(n_images: int, n_refs: int, seed: int = 0) -> tuple[dict, dict]:
    rng = random.Random(seed)
    weights = [1 / (r + 1) for r in range(len(WORDS))]  # Zipf-like word frequencies

    def reference() -> str:
        words = rng.choices(WORDS, weights, k=rng.randint(7, 15))
        words.insert(rng.randrange(len(words)), rng.choice(SUBJECTS))
        return " ".join(words)

    gts = {i: [reference() for _ in range(n_refs)] for i in range(n_images)}
    res = {}
    for i, refs in gts.items():
        words = rng.choice(refs).split()
        for _ in range(rng.randint(0, 4)):
            op, k = rng.random(), rng.randrange(len(words))
            if op < 0.5:
                words[k] = rng.choices(WORDS, weights)[0]
            elif op < 0.8 and len(words) > 3:
                del words[k]
            else:
                words.insert(k, words[k])
        res[i] = " ".join(words)
    return gts, res


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def pycocoevalcap_native(gts: dict, res_lists: dict) -> tuple[dict, dict]:
    out, times = {}, {}
    t = time.perf_counter()
    score, per_image = Bleu(4).compute_score(gts, res_lists, verbose=0)
    times["BLEU"] = time.perf_counter() - t
    for k in range(4):
        out[f"Bleu_{k + 1}"] = (score[k], per_image[k])
    t = time.perf_counter()
    out["ROUGE_L"] = Rouge().compute_score(gts, res_lists)
    times["ROUGE-L"] = time.perf_counter() - t
    t = time.perf_counter()
    out["CIDEr"] = Cider().compute_score(gts, res_lists)
    times["CIDEr-D"] = time.perf_counter() - t
    return out, times


def assert_equal(ours: dict, theirs: dict, what: str) -> None:
    for name, (corpus, per_image) in theirs.items():
        if abs(ours[name][0] - corpus) > 1e-9:
            raise AssertionError(f"{what} {name}: corpus {ours[name][0]!r} != pycocoevalcap {corpus!r}")
        worst = float(np.max(np.abs(np.asarray(ours[name][1], float) - np.asarray(per_image, float))))
        if worst > 1e-9:
            raise AssertionError(f"{what} {name}: per-image scores differ by up to {worst:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the native metrics (default 3)")
    parser.add_argument("--no-meteor", action="store_true", help="skip the Java parts (METEOR, PTB, full run)")
    parser.add_argument("--no_write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()

    load_at_start = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"
    gts, res = make_captions(args.images, args.refs)
    ids = list(gts)
    res_lists = {i: [res[i]] for i in ids}
    hyps, refs = [res[i] for i in ids], [gts[i] for i in ids]

    ours_t, ours = best_time(lambda: native_scores(hyps, refs), args.repeats)
    theirs, parts = pycocoevalcap_native(gts, res_lists)
    theirs_t = sum(parts.values())
    assert_equal(ours, theirs, "BLEU/ROUGE-L/CIDEr-D")
    rows = [("BLEU-1..4 + ROUGE-L + CIDEr-D", theirs_t, ours_t)]
    scores = {k: v[0] for k, v in ours.items()}

    if not args.no_meteor:
        t = time.perf_counter()
        their_meteor = Meteor().compute_score(gts, res_lists)
        their_meteor_t = time.perf_counter() - t
        t = time.perf_counter()
        our_meteor = OurMeteor().score(hyps, refs)
        our_meteor_t = time.perf_counter() - t
        assert_equal({"METEOR": our_meteor}, {"METEOR": their_meteor}, "METEOR")
        scores["METEOR"] = our_meteor[0]
        rows.append(("METEOR (JVM start + paraphrase table included)", their_meteor_t, our_meteor_t))

        tokenizer = PTBTokenizer()
        t = time.perf_counter()
        tokenizer.tokenize({i: [{"caption": c} for c in gts[i]] for i in ids})
        tokenizer.tokenize({i: [{"caption": res[i]}] for i in ids})
        their_ptb_t = time.perf_counter() - t
        t = time.perf_counter()
        ptb_tokenize(hyps + [c for r in refs for c in r])
        our_ptb_t = time.perf_counter() - t
        rows.append(("PTB tokenization (2 JVM runs vs 1)", their_ptb_t, our_ptb_t))

        t = time.perf_counter()
        evaluate_captions(gts, res, ("Bleu", "METEOR", "ROUGE_L", "CIDEr"))
        full_t = time.perf_counter() - t
        rows.append(("full evaluation without SPICE (theirs: sum of the rows above)",
                     theirs_t + their_meteor_t + their_ptb_t, full_t))

    table = ["| what | pycocoevalcap 1.2 | beit3cap | speed-up |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {what} | {a:.2f} s | {b:.3f} s | {a / b:.1f}x |" for what, a, b in rows]
    detail = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
    body = "\n".join([
        f"{args.images} generated images x {args.refs} references (COCO-like word statistics); scores asserted "
        "equal to pycocoevalcap (1e-9, corpus and every image) before timing is reported. Native metrics: "
        f"ours best of {args.repeats}; pycocoevalcap per metric: {detail}.",
        "",
        *table,
        "",
        "Scores: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
        "",
        f"Command: `.venv/bin/python benchmarks/metrics.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`",
        "",
        machine_summary() + f" Load average when the run started: {load_at_start}.",
    ])
    print(body)
    if not args.no_write:
        append_section("Caption metrics", body)


if __name__ == "__main__":
    main()
