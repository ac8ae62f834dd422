"""CIDEr-D with the coco-caption conventions (numerically equal to pycocoevalcap 1.2).

Conventions: tf-idf vectors of 1..4-grams, where the document frequency of a gram is the number of
evaluated images whose references contain it and idf = log(#images) - log(max(1, df)) - so the idf comes
from the evaluated set itself and scoring a subset changes CIDEr; per order, the hypothesis weight is
clipped to the reference weight before the dot product ("min(h, r) * r") and divided by both norms; a
Gaussian penalty exp(-delta^2 / (2 sigma^2)) with sigma 6 on the length difference, where the original's
"length" is the number of bigrams (words - 1, and 0 for an empty caption); averaged over orders and
references, times 10.
"""

from __future__ import annotations

import numpy as np

from beit3cap.metrics.ngrams import MAX_N, NgramCounts

SIGMA = 6.0


def _sum_by(rows: np.ndarray, orders: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
    """[n_rows, 4] sums of ``values`` by (row, order); float even when there is nothing to sum."""
    sums = np.bincount(rows * MAX_N + orders, weights=values, minlength=n_rows * MAX_N)
    return sums.astype(np.float64, copy=False).reshape(n_rows, MAX_N)


def cider_d(counts: NgramCounts, sigma: float = SIGMA) -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D and the per-image scores [n_images]."""
    batch = counts.batch
    n_img, n_refs = batch.n_images, batch.n_refs
    df = np.bincount(counts.group_gram[counts.group_ref_max > 0], minlength=counts.n_grams)

    # One table of logs: log(n_images) - log(df) is then exactly 0 for a gram in every image's references,
    # as in the original, so no rounding noise can turn an all-zero vector into a non-zero norm.
    log_table = np.log(np.arange(1, n_img + 1, dtype=np.float64))
    idf = log_table[n_img - 1] - log_table[np.maximum(df, 1) - 1]

    hyp_w = counts.group_hyp_count * idf[counts.group_gram]  # 0 where the hypothesis lacks the gram
    ref_w = counts.entry_count * idf[counts.entry_gram]
    entry_order = counts.gram_order[counts.entry_gram]
    hyp_norm = np.sqrt(_sum_by(counts.group_image, counts.gram_order[counts.group_gram], hyp_w * hyp_w, n_img))
    ref_norm = np.sqrt(_sum_by(counts.entry_row, entry_order, ref_w * ref_w, n_refs))
    terms = np.minimum(hyp_w[counts.entry_group], ref_w) * ref_w
    dot = _sum_by(counts.entry_row, entry_order, terms, n_refs)

    hyp_norm = hyp_norm[batch.ref_image]
    sim = np.divide(dot, hyp_norm * ref_norm, out=dot.copy(), where=(hyp_norm != 0) & (ref_norm != 0))
    bigrams = np.maximum(batch.words.length - 1, 0)
    delta = (bigrams[batch.ref_image] - bigrams[n_img:]).astype(np.float64)
    sim *= (np.e ** (-(delta ** 2) / (2 * sigma ** 2)))[:, None]

    per_order = np.add.reduceat(sim, batch.ref_start[:-1], axis=0)
    per_image = per_order.mean(axis=1) / np.diff(batch.ref_start) * 10.0
    return float(np.mean(per_image)), per_image
