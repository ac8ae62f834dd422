"""Captions of a scoring batch as flat integer word ids, split the way each coco-caption scorer splits.

BLEU and CIDEr-D split on any whitespace (``str.split()``); ROUGE-L splits on single spaces
(``str.split(" ")``, so an empty caption is one empty word). Each split is one C-level call over all captions
joined by a sentinel word; when the text holds no whitespace but single spaces (as PTB tokenizer output
does) the two splits are the same and are done once.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

_SENTINEL = "\x01"  # not whitespace, so both splits keep it as a word of its own
_OTHER_ASCII_WHITESPACE = "\t\n\v\f\r\x1c\x1d\x1e\x1f"  # what str.split() splits on besides " "


@dataclass(frozen=True)
class Words:
    """Word ids of sentences laid end to end: sentence i is ``ids[start[i]:start[i] + length[i]]``."""

    ids: np.ndarray
    length: np.ndarray
    start: np.ndarray
    vocab_size: int


def _only_single_spaces(text: str) -> bool:
    """True when ``text.split()`` equals ``text.split(" ")``: non-empty, ASCII, and no whitespace but
    single inner spaces (cheap substring scans instead of a second split)."""
    return (bool(text) and text.isascii() and text[0] != " " and text[-1] != " " and "  " not in text
            and not any(c in text for c in _OTHER_ASCII_WHITESPACE))


def _encode(flat: list[str], lengths: np.ndarray | None, vocab: dict[str, int]) -> Words:
    ids = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
    if lengths is None:  # sentences are delimited by sentinel words
        marks = ids == vocab[_SENTINEL] if _SENTINEL in vocab else np.zeros(ids.size, dtype=bool)
        bounds = np.concatenate(([-1], np.flatnonzero(marks), [ids.size]))
        lengths = np.diff(bounds) - 1
        ids = ids[~marks]
    start = np.cumsum(lengths) - lengths
    return Words(ids=ids, length=lengths, start=start, vocab_size=len(vocab))


def split_words(sentences: list[str], rouge: bool = True) -> tuple[Words, Words | None]:
    """(words by ``str.split()``, words by ``str.split(" ")`` or None when ``rouge`` is False)."""
    text = f" {_SENTINEL} ".join(sentences)
    if text.count(_SENTINEL) != len(sentences) - 1:
        # Some caption contains the sentinel character itself: split caption by caption.
        ws_parts = [s.split() for s in sentences]
        sp_parts = [s.split(" ") for s in sentences] if rouge else []
        vocab = {w: i for i, w in enumerate(dict.fromkeys(chain.from_iterable(ws_parts + sp_parts)))}
        encoded = [_encode(list(chain.from_iterable(parts)), np.fromiter(map(len, parts), np.int64, len(parts)),
                           vocab) for parts in (ws_parts, sp_parts)]
        return encoded[0], encoded[1] if rouge else None
    if _only_single_spaces(text):
        flat = text.split(" ")
        words = _encode(flat, None, {w: i for i, w in enumerate(dict.fromkeys(flat))})
        return words, words if rouge else None
    ws_flat = text.split()
    sp_flat = text.split(" ") if rouge else []
    vocab = {w: i for i, w in enumerate(dict.fromkeys(chain(ws_flat, sp_flat)))}
    return _encode(ws_flat, None, vocab), _encode(sp_flat, None, vocab) if rouge else None


@dataclass(frozen=True)
class CaptionBatch:
    """One hypothesis per image followed by the references of every image, grouped by image.

    Sentence i < n_images is image i's hypothesis; image i owns reference rows
    ``ref_start[i]:ref_start[i + 1]``, which are sentences ``n_images + row``.
    """

    n_images: int
    ref_start: np.ndarray
    ref_image: np.ndarray
    words: Words  # str.split(): BLEU, CIDEr-D
    rouge_words: Words | None  # str.split(" "): ROUGE-L

    @classmethod
    def build(cls, hyps: list[str], refs: list[list[str]], rouge: bool = True) -> CaptionBatch:
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} captions but {len(refs)} reference lists")
        if not hyps:
            raise ValueError("no captions to score")
        per_image = np.fromiter(map(len, refs), dtype=np.int64, count=len(refs))
        if (per_image == 0).any():
            raise ValueError(f"image #{int(np.argmax(per_image == 0))} has no reference caption")
        words, rouge_words = split_words(list(hyps) + list(chain.from_iterable(refs)), rouge)
        return cls(n_images=len(hyps), ref_start=np.concatenate(([0], np.cumsum(per_image))),
                   ref_image=np.repeat(np.arange(len(hyps), dtype=np.int64), per_image),
                   words=words, rouge_words=rouge_words)

    @property
    def n_refs(self) -> int:
        return int(self.ref_start[-1])
