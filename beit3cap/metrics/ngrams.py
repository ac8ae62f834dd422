"""Shared, vectorised 1..4-gram statistics for BLEU and CIDEr-D.

Every distinct n-gram gets a dense integer id. Every n-gram occurrence becomes the integer key
(image, gram, role), role 0 for the image's hypothesis and j + 1 for its j-th reference; one sort then
lines up, for each (image, gram) "group", the hypothesis count followed by the count in each reference.
BLEU's clipped matches and CIDEr-D's document frequencies, tf-idf vectors and dot products are all
reductions over those sorted runs - no per-sentence dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from beit3cap.metrics.tokens import CaptionBatch

MAX_N = 4


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Index of the first element of every run of equal values in a sorted array."""
    if sorted_keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


def _gram_ids(tokens: np.ndarray, length: np.ndarray, vocab_size: int
              ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, int]:
    """For n = 1..4: the sentence of each n-gram occurrence and its dense gram id; the order (n - 1) of
    every gram id; the number of gram ids."""
    sent_of_token = np.repeat(np.arange(length.size, dtype=np.int64), length)
    remaining = np.cumsum(length)[sent_of_token] - np.arange(tokens.size, dtype=np.int64)
    # The k-gram at token p exists when remaining[p] >= k. Its id comes from the (k-1)-gram id at p and
    # the word at p + k - 1, densified at every level so keys never overflow.
    positions, dense, offset = np.arange(tokens.size, dtype=np.int64), tokens, vocab_size
    occ_sent, occ_gram, orders = [sent_of_token], [tokens], [np.zeros(vocab_size, dtype=np.int8)]
    for k in range(2, MAX_N + 1):
        keep = remaining[positions] >= k
        positions, prev = positions[keep], dense[keep]
        if positions.size == 0:
            break
        uniq, dense = np.unique(prev * vocab_size + tokens[positions + k - 1], return_inverse=True)
        occ_sent.append(sent_of_token[positions])
        occ_gram.append(dense + offset)
        orders.append(np.full(uniq.size, k - 1, dtype=np.int8))
        offset += uniq.size
    return occ_sent, occ_gram, np.concatenate(orders), offset


@dataclass(frozen=True)
class NgramCounts:
    """n-gram statistics of a :class:`CaptionBatch`.

    A *group* is one (image, gram) pair seen in the image's hypothesis or references; groups are sorted
    by (image, gram). An *entry* is one (reference row, gram) pair with its count.
    """

    batch: CaptionBatch
    n_grams: int
    gram_order: np.ndarray  # [n_grams] n - 1
    group_image: np.ndarray
    group_gram: np.ndarray
    group_hyp_count: np.ndarray  # count in the hypothesis (0 if absent)
    group_ref_max: np.ndarray  # largest count in any one reference (0 if absent)
    entry_row: np.ndarray
    entry_gram: np.ndarray
    entry_count: np.ndarray
    entry_group: np.ndarray  # index of the entry's group

    @classmethod
    def build(cls, batch: CaptionBatch) -> NgramCounts:
        words, n_img = batch.words, batch.n_images
        occ_sent, occ_gram, gram_order, n_grams = _gram_ids(words.ids, words.length, words.vocab_size)

        # Key = image | gram | role as bit fields; role 0 is the hypothesis, role j + 1 reference j.
        role_bits = int(np.diff(batch.ref_start).max()).bit_length()
        gram_bits = max(n_grams - 1, 1).bit_length()
        if (n_img - 1).bit_length() + gram_bits + role_bits > 63:
            raise ValueError("too many images, n-grams or references per image for 64-bit keys")
        sent_role = np.concatenate((np.zeros(n_img, dtype=np.int64),
                                    np.arange(batch.n_refs, dtype=np.int64) - batch.ref_start[batch.ref_image] + 1))
        sent_image = np.concatenate((np.arange(n_img, dtype=np.int64), batch.ref_image))
        sent_prefix = (sent_image << (gram_bits + role_bits)) | sent_role
        keys = np.sort(np.concatenate([sent_prefix[s] | (g << role_bits) for s, g in zip(occ_sent, occ_gram)]))

        first = group_starts(keys)
        keys, counts = keys[first], np.diff(np.append(first, keys.size))
        role, image_gram = keys & ((1 << role_bits) - 1), keys >> role_bits
        starts = group_starts(image_gram)
        group_image = image_gram[starts] >> gram_bits
        group_gram = image_gram[starts] & ((1 << gram_bits) - 1)
        is_hyp = role[starts] == 0
        group_hyp_count = np.where(is_hyp, counts[starts], 0)
        is_ref = role > 0
        ref_counts = np.where(is_ref, counts, 0)
        group_ref_max = np.maximum.reduceat(ref_counts, starts) if starts.size else ref_counts
        new_group = np.zeros(keys.size, dtype=np.int64)
        new_group[starts] = 1
        entry_group = (np.cumsum(new_group) - 1)[is_ref]
        return cls(
            batch=batch, n_grams=n_grams, gram_order=gram_order,
            group_image=group_image, group_gram=group_gram,
            group_hyp_count=group_hyp_count, group_ref_max=group_ref_max,
            entry_row=batch.ref_start[group_image[entry_group]] + role[is_ref] - 1,
            entry_gram=group_gram[entry_group], entry_count=counts[is_ref], entry_group=entry_group,
        )
