"""ROUGE-L with the coco-caption conventions (numerically equal to pycocoevalcap 1.2).

Conventions: captions are split on single spaces (``str.split(" ")``, so an empty caption is one empty
token); precision and recall of the longest common subsequence are maximised *separately* over the
references, then combined as an F-measure with beta = 1.2; the corpus score is the mean over images.

The LCS lengths come from the bit-parallel algorithm of Hyyro (2004): with the reference as a bit
pattern, each hypothesis word costs four word-wide integer operations, vectorised over all
(hypothesis, reference) pairs at once. References longer than 64 words or hypotheses longer than
``_MAX_VECTOR_HYP`` words use the same algorithm on Python integers.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from beit3cap.metrics.tokens import CaptionBatch, Words

BETA = 1.2
_MAX_VECTOR_HYP = 128


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of two token lists."""
    masks: dict[Hashable, int] = {}
    for j, w in enumerate(a):
        masks[w] = masks.get(w, 0) | (1 << j)
    full = (1 << len(a)) - 1
    v = full
    for w in b:
        u = v & masks.get(w, 0)
        v = (v + u) | (v - u)
    return len(a) - (v & full).bit_count()


def _padded(words: Words, sentences: np.ndarray, width: int, pad: int) -> np.ndarray:
    """[len(sentences), width] word ids, ``pad`` after each sentence's end."""
    col = np.arange(width, dtype=np.int64)
    idx = np.minimum(words.start[sentences][:, None] + col, max(words.ids.size - 1, 0))
    return np.where(col < words.length[sentences][:, None], words.ids[idx], pad)


def _lcs_vectorised(words: Words, hyp_sent: np.ndarray, ref_sent: np.ndarray) -> np.ndarray:
    """LCS lengths of the sentence pairs (hyp_sent[p], ref_sent[p]); references have at most 64 words."""
    ref_len = words.length[ref_sent]
    ref_width = -(-int(ref_len.max(initial=1)) // 8) * 8
    hyp_width = int(words.length[hyp_sent].max(initial=0))
    lcs = np.empty(ref_sent.size, dtype=np.int64)
    chunk = max(1, (1 << 24) // max(1, hyp_width * ref_width))  # bounds the [pairs, hyp, ref] temporary
    for lo in range(0, ref_sent.size, chunk):
        hyp = _padded(words, hyp_sent[lo:lo + chunk], hyp_width, -1)
        ref = _padded(words, ref_sent[lo:lo + chunk], ref_width, -2)
        # match[p, i] has bit j set when hypothesis word i equals reference word j.
        bytes_ = np.packbits(hyp[:, :, None] == ref[:, None, :], axis=2, bitorder="little")
        if ref_width < 64:
            bytes_ = np.concatenate((bytes_, np.zeros((*bytes_.shape[:2], 8 - ref_width // 8), np.uint8)), 2)
        match = np.ascontiguousarray(bytes_).view("<u8")[..., 0]
        m = ref_len[lo:lo + chunk].astype(np.uint64)
        full = np.where(m == 64, np.uint64(0xFFFFFFFFFFFFFFFF), (np.uint64(1) << (m % 64)) - np.uint64(1))
        v = full.copy()
        for i in range(hyp_width):  # padding columns have no bits set: a no-op step
            u = v & match[:, i]
            v = (v + u) | (v - u)
        lcs[lo:lo + chunk] = ref_len[lo:lo + chunk] - np.bitwise_count(v & full).astype(np.int64)
    return lcs


def rouge_l(batch: CaptionBatch, beta: float = BETA) -> tuple[float, np.ndarray]:
    """Corpus ROUGE-L (mean over images) and the per-image scores [n_images]."""
    words, n_img = batch.rouge_words, batch.n_images
    ref_sent = np.arange(n_img, n_img + batch.n_refs, dtype=np.int64)
    hyp_sent = batch.ref_image

    lcs = np.empty(ref_sent.size, dtype=np.int64)
    fast = (words.length[ref_sent] <= 64) & (words.length[hyp_sent] <= _MAX_VECTOR_HYP)
    lcs[fast] = _lcs_vectorised(words, hyp_sent[fast], ref_sent[fast])
    for p in np.flatnonzero(~fast):
        lcs[p] = lcs_length(_sentence(words, ref_sent[p]), _sentence(words, hyp_sent[p]))

    hyp_len = words.length[:n_img].astype(np.float64)
    # max over references of lcs / len(hyp) == (max lcs) / len(hyp): the divisor is shared.
    precision = np.maximum.reduceat(lcs, batch.ref_start[:-1]) / hyp_len
    recall = np.maximum.reduceat(lcs / words.length[ref_sent], batch.ref_start[:-1])
    b2 = beta ** 2
    ok = (precision != 0) & (recall != 0)
    score = np.zeros(n_img)
    score[ok] = ((1 + b2) * precision[ok] * recall[ok]) / (recall[ok] + b2 * precision[ok])
    return float(np.mean(score)), score


def _sentence(words: Words, i: int) -> list[int]:
    return words.ids[words.start[i]:words.start[i] + words.length[i]].tolist()
