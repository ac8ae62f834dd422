"""BLEU-1..4 with the coco-caption conventions (numerically equal to pycocoevalcap 1.2).

Conventions: clipped n-gram matches against the per-reference maximum count; the effective reference
length of an image is the reference length closest to the hypothesis length, ties going to the shorter;
the corpus score pools matches, guesses and lengths over all images; 1e-15 is added to matches and 1e-9
to guesses and to the reference length so that nothing divides by zero.
"""

from __future__ import annotations

import numpy as np

from beit3cap.metrics.ngrams import MAX_N, NgramCounts

TINY = 1e-15
SMALL = 1e-9


def _geometric_bleu(correct: np.ndarray, guess: np.ndarray, testlen: np.ndarray,
                    reflen: np.ndarray) -> np.ndarray:
    """BLEU-1..4 from match/guess counts [..., 4] and lengths [...]: returns [..., 4]."""
    out = np.empty(correct.shape, dtype=np.float64)
    running = np.ones(correct.shape[:-1], dtype=np.float64)
    for k in range(MAX_N):
        running = running * ((correct[..., k] + TINY) / (guess[..., k] + SMALL))
        out[..., k] = running ** (1.0 / (k + 1))
    ratio = (testlen + TINY) / (reflen + SMALL)
    short = ratio < 1
    out[short] *= np.exp(1 - 1 / ratio[short])[..., None]
    return out


def bleu(counts: NgramCounts) -> tuple[list[float], np.ndarray]:
    """Corpus BLEU-1..4 and the per-image scores [n_images, 4]."""
    batch = counts.batch
    n_img, hyp_len = batch.n_images, batch.words.length[:batch.n_images]
    ref_len = batch.words.length[n_img:]
    clipped = np.minimum(counts.group_hyp_count, counts.group_ref_max)
    bucket = counts.group_image * MAX_N + counts.gram_order[counts.group_gram]
    correct = np.bincount(bucket, weights=clipped, minlength=n_img * MAX_N).reshape(n_img, MAX_N)
    guess = np.maximum(0, hyp_len[:, None] - np.arange(MAX_N)[None, :]).astype(np.float64)

    # Closest reference length, ties to the shorter one: minimise (|ref - hyp|, ref) lexicographically.
    width = int(ref_len.max(initial=0)) + 1
    dist = np.abs(ref_len - hyp_len[batch.ref_image])
    reflen = (np.minimum.reduceat(dist * width + ref_len, batch.ref_start[:-1]) % width).astype(np.float64)
    testlen = hyp_len.astype(np.float64)

    per_image = _geometric_bleu(correct, guess, testlen, reflen)
    # Pooled counts are integers, so summing them in float64 is exact.
    corpus = _geometric_bleu(correct.sum(0)[None], guess.sum(0)[None], testlen.sum(keepdims=True),
                             reflen.sum(keepdims=True))[0]
    return [float(x) for x in corpus], per_image
