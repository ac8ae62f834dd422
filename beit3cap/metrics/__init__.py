"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) with pycocoevalcap 1.2's values.

BLEU, ROUGE-L and CIDEr-D are vectorised re-implementations (equal to pycocoevalcap to ~1e-15); PTB
tokenization, METEOR and SPICE run the jars shipped in the pycocoevalcap wheel (Java required).
"""

from beit3cap.metrics.java import JavaNotFoundError, ptb_tokenize, sanitize, spice_unavailable_reason
from beit3cap.metrics.scorer import (BLEU_KEYS, METRICS, NATIVE_METRICS, CaptionScores, evaluate_captions,
                                     native_scores, score)

__all__ = ["BLEU_KEYS", "METRICS", "NATIVE_METRICS", "CaptionScores", "JavaNotFoundError", "evaluate_captions",
           "native_scores", "ptb_tokenize", "sanitize", "score", "spice_unavailable_reason"]
