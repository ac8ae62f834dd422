"""The BEiT-3 text side: ``XLMRobertaTokenizer`` over a sentencepiece model, special ids, decoding.

Ids (spec §4): bos/cls 0, pad 1, eos/sep 2, unk 3, ordinary piece = sentencepiece id + 1,
``<mask>`` = number of pieces + 1 (64001 for ``beit3.spm``). Model vocabulary rows may exceed the
tokenizer's ids (BEiT-3 keeps 64,010 rows; 64002-64009 are dead) and decoding drops such ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import XLMRobertaTokenizer

from .model import BOS_ID, EOS_ID, PAD_ID, UNK_ID

BEIT3_VOCAB_ROWS = 64010


def load_tokenizer(path: str | os.PathLike) -> XLMRobertaTokenizer:
    """Load ``beit3.spm`` (or any sentencepiece model, or a folder holding exactly one ``*.spm``/``*.model``)."""
    p = Path(path)
    if p.is_dir():
        candidates = sorted([*p.glob("*.spm"), *p.glob("*.model")])
        if len(candidates) != 1:
            raise FileNotFoundError(f"{p}: expected one sentencepiece model (*.spm or *.model) in the folder, "
                                    f"found {len(candidates)}")
        p = candidates[0]
    if not p.is_file():
        raise FileNotFoundError(f"sentencepiece model not found: {p}")
    try:
        tok = XLMRobertaTokenizer(str(p))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with little context
        raise ValueError(f"{p}: not a readable sentencepiece model ({type(e).__name__}: {e})") from e
    if len(tok.sp_model) < 4:
        raise ValueError(f"{p}: sentencepiece model has only {len(tok.sp_model)} pieces")
    return tok


def mask_token_id(tokenizer: XLMRobertaTokenizer) -> int:
    return tokenizer.mask_token_id


def vocab_rows_needed(tokenizer: XLMRobertaTokenizer) -> int:
    """Smallest model vocabulary (``--vocab_size``) that holds every id including ``<mask>``."""
    return tokenizer.vocab_size


def encode(tokenizer: XLMRobertaTokenizer, text: str) -> list[int]:
    """Token ids without BOS/EOS, exactly as the official index builder stores them."""
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def special_ids(tokenizer: XLMRobertaTokenizer) -> set[int]:
    return {BOS_ID, PAD_ID, EOS_ID, UNK_ID, tokenizer.mask_token_id}


def decode(tokenizer: XLMRobertaTokenizer, ids: Sequence[int]) -> str:
    """Caption text from ids; special ids and ids past the tokenizer's vocabulary (dead rows) are dropped."""
    drop = special_ids(tokenizer)
    limit = tokenizer.vocab_size
    kept = [int(i) for i in ids if int(i) not in drop and 0 <= int(i) < limit]
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(kept))


def train_sentencepiece(texts: Iterable[str], output: str | os.PathLike, vocab_size: int = 1000,
                        model_type: str = "bpe") -> Path:
    """Train a sentencepiece model on captions and write it to ``output`` (e.g. ``my.spm``).

    The vocabulary size is a ceiling (``hard_vocab_limit=False``) so tiny corpora still train. BPE is the
    default because on a few hundred captions a unigram model stops far below the requested size and
    splits ordinary words into letters, which lengthens captions 2x.
    """
    import sentencepiece as spm

    lines = [t.strip() for t in texts if t and t.strip()]
    if not lines:
        raise ValueError("no captions to train a sentencepiece model on")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = out.with_suffix("")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size,
        hard_vocab_limit=False, model_type=model_type, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    produced = prefix.with_suffix(".model")
    if produced != out:
        produced.replace(out)
    prefix.with_suffix(".vocab").unlink(missing_ok=True)
    return out


def read_caption_texts(path: str | os.PathLike) -> list[str]:
    """Captions from a text file (one per line), a Karpathy ``dataset_coco.json``, a COCO annotation
    file, a caption JSONL/CSV with a ``caption`` column, or a WTS caption JSON."""
    p = Path(path)
    if p.suffix == ".txt":
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        return [json.loads(line)["caption"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".csv":
        import csv
        with p.open(encoding="utf-8", newline="") as f:
            return [row["caption"] for row in csv.DictReader(f)]
    data = json.loads(p.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "images" in data and data["images"] and "sentences" in data["images"][0]:
        return [s["raw"] for img in data["images"] for s in img["sentences"]]
    if isinstance(data, dict) and "annotations" in data:
        return [a["caption"] for a in data["annotations"]]
    if isinstance(data, dict):  # WTS: {key: {"caption": [{"caption": str, "label": ...}], "videos": [...]}}
        return [c["caption"] for v in data.values() if isinstance(v, dict) for c in v.get("caption", [])]
    raise ValueError(f"{p}: unrecognised caption file (expected .txt, .jsonl, .csv, dataset_coco.json, "
                     "a COCO annotation file or a WTS caption JSON)")
