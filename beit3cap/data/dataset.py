"""Captioning samples from the official ``.jsonl`` index files: text segments, masking, collation.

Index rows look like ``{"image_path": ..., "text_segment": [ids without BOS/EOS] | null, "image_id": int}``;
``image_path`` and index file names are relative to ``data_path`` unless absolute (spec §5.1, §11.1).

Reproducibility: every random choice for sample ``i`` in epoch ``e`` (crop, flip, RandAugment, masking)
comes from generators seeded by (seed, e, i). A sample therefore looks the same whatever the number of
DataLoader workers, the rank that loads it, or where a resumed run restarts. The official code relies on
per-worker seeding instead, which changes with the worker count and is unseeded with 0 workers (spec §9
item 21). Call ``set_epoch`` before creating each epoch's DataLoader iterator: workers take a copy of the
dataset when the iterator starts (so with ``persistent_workers=True`` they would keep the old epoch).
"""

from __future__ import annotations

import contextlib
import os
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..model import BOS_ID, EOS_ID, PAD_ID
from .index import iter_index
from .transforms import ImageLoadError, load_rgb_image

Transform = Callable[[Image.Image], torch.Tensor]
MASK_KEEP_PROB = 0.1  # of the chosen positions: 80 % -> <mask>, 10 % unchanged, 10 % random id
MASK_RANDOM_PROB = 0.1


def get_text_segment(ids: Sequence[int], max_len: int, where: str = "") -> tuple[list[int], list[int], int]:
    """``[BOS] + ids[:max_len-2] + [EOS]`` right-padded to ``max_len``.

    Returns (tokens, padding_mask with 1 = padding, number of real tokens). Truncated captions keep EOS.
    """
    if len(ids) == 0:
        raise ValueError(f"{where or 'text segment'}: empty caption (text_segment holds no token ids)")
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3 (BOS, one token, EOS), got {max_len}")
    tokens = [BOS_ID, *ids[:max_len - 2], EOS_ID]
    num_tokens = len(tokens)
    pad = max_len - num_tokens
    return tokens + [PAD_ID] * pad, [0] * num_tokens + [1] * pad, num_tokens


def num_to_mask(num_tokens: int, mask_prob: float) -> int:
    """Official count: round(num_tokens * p) capped at num_tokens - 1 and at least 1 (spec §5.4)."""
    return max(min(int(num_tokens * mask_prob + 0.5), num_tokens - 1), 1)


def mask_text_tokens(tokens: Sequence[int], num_tokens: int, mask_prob: float, mask_token_id: int,
                     vocab_size: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Choose positions among 1..num_tokens-1 (never BOS or padding; EOS can be chosen) and corrupt them.

    Each chosen position becomes ``mask_token_id`` (80 %), stays (10 %) or becomes a uniform id in
    [3, vocab_size-1] (10 %; this range includes <unk> and <mask>, kept for parity, spec §9 item 10).
    Returns (masked tokens, masked positions with 1 = chosen).
    """
    masked = list(tokens)
    positions = [0] * len(tokens)
    chosen = 0
    target = num_to_mask(num_tokens, mask_prob)
    while chosen < target:
        i = rng.randint(1, num_tokens - 1)
        if positions[i]:
            continue
        positions[i] = 1
        chosen += 1
        u = rng.random()
        if u < 1.0 - MASK_KEEP_PROB - MASK_RANDOM_PROB:
            masked[i] = mask_token_id
        elif u >= 1.0 - MASK_RANDOM_PROB:
            masked[i] = rng.randint(3, vocab_size - 1)
    return masked, positions


def sample_seeds(seed: int, epoch: int, index: int) -> list[int]:
    """Three independent 64-bit seeds for (seed, epoch, index): masking, torch, numpy/python."""
    return [int(s) for s in np.random.SeedSequence([seed, epoch, index]).generate_state(3, dtype=np.uint64)]


@contextlib.contextmanager
def seeded_global_rngs(torch_seed: int, other_seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's and Python's global RNGs inside the block, then restore them.

    torchvision's random transforms (and the RandAugment here) draw from torch's global generator;
    user-supplied transforms may use numpy or ``random`` (timm, the official RandAugment). Restoring the
    states keeps the caller's streams untouched. Not thread-safe: global generators are process-wide.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(torch_seed)
        np.random.seed([other_seed & 0xFFFFFFFF, other_seed >> 32])
        random.seed(other_seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _resolve(data_path: Path, path: str | os.PathLike) -> Path:
    return data_path / path  # an absolute ``path`` wins, as with os.path.join


class CaptioningTrainDataset(Dataset):
    """One sample per caption row of the training index file(s), with image augmentation and masking.

    ``vocab_size`` is the tokenizer's (``tokenizer.vocab_size``, 64002 for beit3.spm), not the model's
    64010 rows: random replacement ids are drawn from [3, vocab_size-1], as in the official code.
    Rows are stored packed (numpy buffers, not Python objects) so forked DataLoader workers share them
    instead of copying them page by page through reference counting.
    """

    def __init__(self, data_path: str | os.PathLike, index_files: Sequence[str | os.PathLike], transform: Transform,
                 num_max_bpe_tokens: int, mask_prob: float, mask_token_id: int, vocab_size: int,
                 seed: int = 0) -> None:
        if isinstance(index_files, (str, os.PathLike)):
            raise TypeError("index_files must be a list of paths")
        if num_max_bpe_tokens < 3:
            raise ValueError(f"num_max_bpe_tokens must be at least 3, got {num_max_bpe_tokens}")
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
        if not 3 <= mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id {mask_token_id} must lie in [3, vocab_size={vocab_size})")
        self.data_path = Path(data_path)
        self.index_files = [_resolve(self.data_path, p) for p in index_files]
        self.transform = transform
        self.num_max_bpe_tokens = num_max_bpe_tokens
        self.mask_prob = mask_prob
        self.mask_token_id = mask_token_id
        self.vocab_size = vocab_size
        self.seed = seed
        self.epoch = 0
        self._load_rows()

    def _load_rows(self) -> None:
        path_bytes, path_ends = bytearray(), array("q")
        tokens, token_ends = array("i"), array("q")
        image_ids, file_idx, lines = array("q"), array("i"), array("i")
        for f, index_file in enumerate(self.index_files):
            for line_no, row in iter_index(index_file):
                segment = row.get("text_segment")
                if not isinstance(segment, list) or not segment:
                    what = "no text_segment" if segment is None else "an empty caption" \
                        if segment == [] else f"a text_segment of type {type(segment).__name__}"
                    raise ValueError(f"{index_file}:{line_no}: training row has {what}; every training "
                                     "row needs a non-empty list of token ids")
                try:
                    tokens.extend(segment)
                except (TypeError, OverflowError) as e:
                    raise ValueError(f"{index_file}:{line_no}: text_segment must hold integer token ids") from e
                token_ends.append(len(tokens))
                path_bytes += row["image_path"].encode("utf-8")
                path_ends.append(len(path_bytes))
                image_ids.append(row["image_id"])
                file_idx.append(f)
                lines.append(line_no)
        if not image_ids:
            raise ValueError(f"no rows in index file(s) {[str(p) for p in self.index_files]}")
        self._path_bytes = np.frombuffer(bytes(path_bytes), dtype=np.uint8)
        self._path_ends = np.frombuffer(path_ends, dtype=np.int64)
        self._tokens = np.frombuffer(tokens, dtype=np.int32)
        self._token_ends = np.frombuffer(token_ends, dtype=np.int64)
        self._image_ids = np.frombuffer(image_ids, dtype=np.int64)
        self._file_idx = np.frombuffer(file_idx, dtype=np.int32)
        self._lines = np.frombuffer(lines, dtype=np.int32)
        bad = np.flatnonzero((self._tokens < 0) | (self._tokens >= self.vocab_size))
        if bad.size:
            row = int(np.searchsorted(self._token_ends, bad[0], side="right"))
            raise ValueError(f"{self.where(row)}: token id {int(self._tokens[bad[0]])} is outside the "
                             f"vocabulary [0, {self.vocab_size}); was the index built with another tokenizer?")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._image_ids)

    def where(self, index: int) -> str:
        """``index_file:line`` of row ``index``, for error messages."""
        return f"{self.index_files[self._file_idx[index]]}:{self._lines[index]}"

    def image_path(self, index: int) -> Path:
        start = self._path_ends[index - 1] if index > 0 else 0
        return _resolve(self.data_path, self._path_bytes[start:self._path_ends[index]].tobytes().decode("utf-8"))

    def text_segment(self, index: int) -> list[int]:
        start = self._token_ends[index - 1] if index > 0 else 0
        return self._tokens[start:self._token_ends[index]].tolist()

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        mask_seed, torch_seed, other_seed = sample_seeds(self.seed, self.epoch, index)
        try:
            image = load_rgb_image(self.image_path(index))
        except ImageLoadError as e:
            raise ImageLoadError(f"{e} (row {self.where(index)})") from e
        with seeded_global_rngs(torch_seed, other_seed):
            image = self.transform(image)
        tokens, padding_mask, num_tokens = get_text_segment(
            self.text_segment(index), self.num_max_bpe_tokens, where=self.where(index))
        masked, positions = mask_text_tokens(tokens, num_tokens, self.mask_prob, self.mask_token_id,
                                             self.vocab_size, random.Random(mask_seed))
        return {
            "image": image,
            "image_id": int(self._image_ids[index]),
            "language_tokens": torch.tensor(tokens, dtype=torch.long),
            "masked_tokens": torch.tensor(masked, dtype=torch.long),
            "padding_mask": torch.tensor(padding_mask, dtype=torch.long),
            "language_masked_pos": torch.tensor(positions, dtype=torch.long),
        }


class CaptioningEvalDataset(Dataset):
    """One sample per distinct ``image_id`` of an index file, in first-seen order (WTS-style validation
    files repeat an image once per caption). Samples hold only ``image`` and ``image_id``; reference
    captions for scoring come from the ground-truth files written next to the index.
    """

    def __init__(self, data_path: str | os.PathLike, index_file: str | os.PathLike, transform: Transform) -> None:
        self.data_path = Path(data_path)
        self.index_file = _resolve(self.data_path, index_file)
        self.transform = transform
        self._rows: dict[int, tuple[str, int]] = {}  # image_id -> (image_path, line); dicts keep order
        for line_no, row in iter_index(self.index_file):
            seen = self._rows.get(row["image_id"])
            if seen is None:
                self._rows[row["image_id"]] = (row["image_path"], line_no)
            elif seen[0] != row["image_path"]:
                raise ValueError(f"{self.index_file}:{line_no}: image_id {row['image_id']} points to "
                                 f"{row['image_path']!r} but line {seen[1]} gave it {seen[0]!r}")
        if not self._rows:
            raise ValueError(f"no rows in index file {self.index_file}")
        self.image_ids: list[int] = list(self._rows)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path_of(self, image_id: int) -> Path:
        return _resolve(self.data_path, self._rows[image_id][0])

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        try:
            image = load_rgb_image(self.image_path_of(image_id))
        except ImageLoadError as e:
            raise ImageLoadError(f"{e} (row {self.index_file}:{self._rows[image_id][1]})") from e
        return {"image": self.transform(image), "image_id": image_id}


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack tensors; turn ints and lists of ints into ``torch.long`` tensors (the official merge rule)."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = samples[0].keys()
    for s in samples[1:]:
        if s.keys() != keys:
            raise ValueError(f"samples have different fields: {sorted(keys)} vs {sorted(s.keys())}")
    batch = {}
    for key in keys:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.tensor(values, dtype=torch.long)
    return batch
