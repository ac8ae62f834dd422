"""COCO caption scores for a set of images: PTB tokenization, then BLEU-1..4, METEOR, ROUGE-L, CIDEr-D
and SPICE, with pycocoevalcap's metric names and values."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from beit3cap.metrics import java
from beit3cap.metrics.bleu import bleu
from beit3cap.metrics.cider import cider_d
from beit3cap.metrics.ngrams import NgramCounts
from beit3cap.metrics.rouge import rouge_l
from beit3cap.metrics.tokens import CaptionBatch

log = logging.getLogger(__name__)

METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
NATIVE_METRICS = ("Bleu", "ROUGE_L", "CIDEr")
BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
_warned: set[str] = set()


@dataclass
class CaptionScores:
    """Corpus scores (None for a metric that could not run, with the reason in ``notes``) and per-image
    scores aligned with ``image_ids``."""

    image_ids: list[Hashable]
    corpus: dict[str, float | None]
    per_image: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def image_rows(self) -> list[dict]:
        """One dict per image: {"image_id": id, "Bleu_1": ..., ...}."""
        names = list(self.per_image)
        return [{"image_id": img, **{n: float(self.per_image[n][i]) for n in names}}
                for i, img in enumerate(self.image_ids)]


def preview_ids(ids: Iterable[Hashable], limit: int = 20) -> str:
    """The first ``limit`` ids (sorted) and, if there are more, the total: for error messages."""
    try:
        ids = sorted(ids)
    except TypeError:  # mixed id types
        ids = sorted(ids, key=repr)
    text = ", ".join(map(repr, ids[:limit]))
    return f"{text}, ... ({len(ids)} in total)" if len(ids) > limit else text


def _check_inputs(gts: Mapping, res: Mapping) -> None:
    if gts.keys() != res.keys():
        missing, extra = gts.keys() - res.keys(), res.keys() - gts.keys()
        parts = []
        if missing:
            parts.append(f"no caption for {len(missing)} image(s): {preview_ids(missing)}")
        if extra:
            parts.append(f"{len(extra)} captioned image(s) have no references: {preview_ids(extra)}")
        raise ValueError("captions and references must cover the same images; " + "; ".join(parts))
    bad = [k for k, v in res.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"each image needs exactly one caption string; not a string for {preview_ids(bad)}")
    bad = [k for k, v in gts.items()
           if isinstance(v, str) or not v or not all(isinstance(c, str) for c in v)]
    if bad:
        raise ValueError(f"each image needs a non-empty list of reference strings; wrong for {preview_ids(bad)}")


def _normalize_metrics(metrics: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    return wanted


def native_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]],
                  metrics: Iterable[str] = NATIVE_METRICS) -> dict[str, tuple[float, np.ndarray]]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of already tokenized captions (hyps[i] against refs[i]).

    Returns {name: (corpus score, per-image scores)} with pycocoevalcap's names.
    """
    wanted = set(metrics)
    batch = CaptionBatch.build(list(hyps), [list(r) for r in refs], rouge="ROUGE_L" in wanted)
    counts = NgramCounts.build(batch) if wanted & {"Bleu", "CIDEr"} else None  # shared by both
    out: dict[str, tuple[float, np.ndarray]] = {}
    if "Bleu" in wanted:
        corpus, per_image = bleu(counts)
        for k, name in enumerate(BLEU_KEYS):
            out[name] = (corpus[k], per_image[:, k])
    if "ROUGE_L" in wanted:
        out["ROUGE_L"] = rouge_l(batch)
    if "CIDEr" in wanted:
        out["CIDEr"] = cider_d(counts)
    return out


def evaluate_captions(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str],
                      metrics: Iterable[str] = METRICS) -> CaptionScores:
    """Score one caption per image against its references, like pycocoevalcap's COCOEvalCap.

    ``gts`` maps image id -> reference captions, ``res`` image id -> caption; both must cover the same ids.
    SPICE is None (with a note) unless its CoreNLP jars are installed; METEOR and the PTB tokenizer need
    Java (:class:`~beit3cap.metrics.java.JavaNotFoundError` otherwise).
    """
    wanted = _normalize_metrics(metrics)
    _check_inputs(gts, res)
    ids = list(gts)
    if not ids:
        raise ValueError("no images to score")
    notes: dict[str, str] = {}
    java.require_java()
    if "SPICE" in wanted:
        reason = java.spice_unavailable_reason()
        if reason:
            notes["SPICE"] = reason
            if reason not in _warned:  # once per process, not at every validation
                _warned.add(reason)
                log.warning("SPICE not computed: %s", reason)

    # METEOR's JVM and paraphrase table load while we tokenize and compute the native metrics.
    meteor = java.Meteor() if "METEOR" in wanted else None
    try:
        hyp_and_refs = java.ptb_tokenize([res[i] for i in ids] + [c for i in ids for c in gts[i]])
        hyps, refs, pos = hyp_and_refs[:len(ids)], [], len(ids)
        for i in ids:
            refs.append(hyp_and_refs[pos:pos + len(gts[i])])
            pos += len(gts[i])

        with ThreadPoolExecutor(max_workers=2) as pool:
            meteor_job: Future | None = pool.submit(meteor.score, hyps, refs) if meteor else None
            spice_job: Future | None = None
            if "SPICE" in wanted and "SPICE" not in notes:
                spice_job = pool.submit(java.spice, hyps, refs)
            native_wanted = [m for m in wanted if m in NATIVE_METRICS]
            native = native_scores(hyps, refs, native_wanted) if native_wanted else {}
            meteor_result = meteor_job.result() if meteor_job else None
            try:
                spice_result = spice_job.result() if spice_job else None
            except Exception as exc:  # SPICE is best-effort: report it, keep every other metric
                notes["SPICE"] = f"SPICE failed: {exc}"
                log.warning("%s", notes["SPICE"])
                spice_result = None
    finally:
        if meteor:
            meteor.close()

    results = dict(native)
    if meteor_result is not None:
        results["METEOR"] = meteor_result
    if spice_result is not None:
        results["SPICE"] = spice_result
    corpus: dict[str, float | None] = {}
    per_image: dict[str, np.ndarray] = {}
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"):
        if name in results:
            corpus[name] = float(results[name][0])
            per_image[name] = np.asarray(results[name][1], dtype=np.float64)
        elif name in notes:
            corpus[name] = None
    return CaptionScores(image_ids=ids, corpus=corpus, per_image=per_image, notes=notes)


def score(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str],
          metrics: Iterable[str] = METRICS) -> dict[str, float | None]:
    """Corpus scores keyed like pycocoevalcap (Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE)."""
    return evaluate_captions(gts, res, metrics).corpus
