"""Caption metrics against pycocoevalcap 1.2 itself: generated captions, the coco-caption demo results file
(1000 real COCO val2014 captions, references from the pycocoevalcap wheel) and its published scores."""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from beit3cap.metrics import evaluate_captions, native_scores, ptb_tokenize, score, spice_unavailable_reason
from beit3cap.metrics.java import SPICE_CORENLP_JARS, pycocoevalcap_dir, spice
from beit3cap.metrics.rouge import lcs_length

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="java is not installed (apt-get install default-jre-headless)")

PUBLISHED = {"Bleu_1": 0.579, "Bleu_2": 0.404, "Bleu_3": 0.279, "Bleu_4": 0.191,
             "METEOR": 0.195, "ROUGE_L": 0.396, "CIDEr": 0.600}
NATIVE = ("Bleu", "ROUGE_L", "CIDEr")


def word_soup(n_images: int, seed: int, common_word: bool = False) -> tuple[dict, dict]:
    """References and one hypothesis per image: repeated words, empty and blank captions, single words,
    captions longer than 64 words, and odd whitespace (double spaces, tabs, no-break spaces)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(rng.randint(3, 40))] + ["a", "the", "dog"]
    seps = [" "] * 20 + ["  ", "\t", "\u00a0"]

    def caption() -> str:
        r = rng.random()
        if r < 0.05:
            return rng.choice(["", " ", "\u00a0"])
        if r < 0.12:
            return rng.choice(vocab)
        n = rng.randint(2, 14) if rng.random() < 0.93 else rng.randint(65, 130)
        words = [rng.choice(vocab[:rng.randint(2, len(vocab))]) for _ in range(n)]
        return "".join(w + rng.choice(seps) for w in words[:-1]) + words[-1]

    gts = {}
    for i in range(n_images):
        refs = [caption() for _ in range(rng.randint(1, 6))]
        if common_word:  # a gram in every image's references: its idf is exactly 0
            refs[0] = "the " + refs[0]
        gts[1000 + 7 * i] = refs
    return gts, {i: caption() for i in gts}


def reference_scores(gts: dict, res: dict) -> dict[str, tuple[float, np.ndarray]]:
    res_lists = {i: [c] for i, c in res.items()}
    out = {}
    bleu, bleu_per_image = Bleu(4).compute_score(gts, res_lists, verbose=0)
    for k in range(4):
        out[f"Bleu_{k + 1}"] = (bleu[k], np.asarray(bleu_per_image[k]))
    out["ROUGE_L"] = Rouge().compute_score(gts, res_lists)
    out["CIDEr"] = Cider().compute_score(gts, res_lists)
    return out


def assert_same_scores(ours: dict, theirs: dict, tol: float = 1e-9) -> None:
    assert ours.keys() == theirs.keys()
    for name, (corpus, per_image) in theirs.items():
        assert ours[name][0] == pytest.approx(corpus, abs=tol, rel=0), name
        np.testing.assert_allclose(ours[name][1], np.asarray(per_image, dtype=float), rtol=0, atol=tol, err_msg=name)


@pytest.mark.parametrize("seed,n_images,common_word", [(0, 300, False), (1, 200, True), (2, 1, False)])
def test_native_scores_equal_pycocoevalcap(seed, n_images, common_word):
    gts, res = word_soup(n_images, seed, common_word)
    ids = list(gts)
    ours = native_scores([res[i] for i in ids], [gts[i] for i in ids])
    assert_same_scores(ours, reference_scores(gts, res))


@pytest.mark.parametrize("gts,res", [
    ({1: ["a dog", "a cat on a mat"], 2: ["a"], 3: ["", "x y z"]}, {1: "", 2: "", 3: "a a a"}),
    ({1: ["a b"], 2: ["a b"]}, {1: "a b", 2: "a b"}),  # every gram in every image: idf 0 everywhere
    ({1: ["x"], 2: ["", " "]}, {1: " ", 2: ""}),
])
def test_native_scores_on_degenerate_captions(gts, res):
    ids = list(gts)
    ours = native_scores([res[i] for i in ids], [gts[i] for i in ids])
    assert_same_scores(ours, reference_scores(gts, res))


def test_native_scores_without_any_reference_word():
    # pycocoevalcap's CIDEr-D crashes here (max() of no document frequencies); ours scores 0.
    gts, res = {1: ["", " "], 2: [""]}, {1: "", 2: "a"}
    ours = native_scores([res[i] for i in gts], [gts[i] for i in gts])
    res_lists = {i: [c] for i, c in res.items()}
    assert ours["ROUGE_L"][0] == Rouge().compute_score(gts, res_lists)[0] == 0.5
    assert ours["Bleu_1"][0] == pytest.approx(Bleu(4).compute_score(gts, res_lists, verbose=0)[0][0], abs=1e-12)
    assert ours["CIDEr"][0] == 0.0


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(3)

    def dp(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        assert lcs_length(a, b) == dp(a, b) == lcs_length(b, a)


@needs_java
def test_ptb_tokenize_equals_pycocoevalcap_tokenizer():
    rng = random.Random(4)
    pieces = list("abcXYZ .,;:!?'\"`()[]{}-_/&%$#@*+=<>~^|019") + [
        "é", "ß", "“", "”", "’", "…", "\u00a0", "\t", "😀", "中", "\x00", "\u200b", "--", "...", "''", "``",
        "&amp;", "<b>", "http://x.org/a?b=1", "e.g.", "U.S.", "can't", "1/2", "-LRB-", "(", ")"]
    captions = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(500)]
    theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert ptb_tokenize(captions) == [theirs[i][0] for i in range(len(captions))]
    assert ptb_tokenize(["A Dog, (running)!", "", "..."]) == ["a dog -lrb- running -rrb-", "", ""]


@needs_java
@pytest.mark.parametrize("breaker,shifts_pycocoevalcap", [
    ("\r", True), ("\r\n", True), ("\u2028", True), ("\u2029", True), ("\v", True), ("\f", True),
    ("\x85", False)])  # the PTB lexer reads U+0085 as "...", not as a line break
def test_line_breaks_inside_a_caption_do_not_shift_other_captions(breaker, shifts_pycocoevalcap):
    gts = {1: ["a red bus on a street", "a bus"], 2: ["two cats on a sofa"], 3: ["a man riding a horse"]}
    clean = {1: "a red bus on the street", 2: "two cats sleeping on a sofa", 3: "a man on a horse"}
    broken = {**clean, 1: f"a red bus{breaker}on the street", 2: f"two cats{breaker}sleeping on a sofa"}
    if shifts_pycocoevalcap:  # the trap is real: pycocoevalcap's wrapper only replaces \n
        tokenized = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in broken.items()})
        assert [tokenized[i][0] for i in (2, 3)] != ["two cats sleeping on a sofa", "a man on a horse"]

    ours_clean = evaluate_captions(gts, clean, NATIVE)
    ours_broken = evaluate_captions(gts, broken, NATIVE)
    assert ours_broken.corpus == ours_clean.corpus
    for name in ours_clean.per_image:
        np.testing.assert_array_equal(ours_broken.per_image[name], ours_clean.per_image[name])
    assert ours_clean.corpus["CIDEr"] > 0


@needs_java
def test_score_keys_and_input_checks():
    gts = {5: ["a cat on a mat", "the cat sat"], 9: ["two dogs play"]}
    res = {5: "a cat sat on the mat", 9: "dogs playing"}
    result = score(gts, res, metrics=("Bleu", "ROUGE_L", "CIDEr"))
    assert list(result) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert all(isinstance(v, float) for v in result.values())
    with pytest.raises(ValueError, match=r"no caption for 1 image\(s\): 9"):
        score(gts, {5: "a cat"}, metrics=("Bleu",))
    with pytest.raises(ValueError, match="unknown metric"):
        score(gts, res, metrics=("BLEU",))
    with pytest.raises(ValueError, match="non-empty list of reference strings"):
        score({5: []}, {5: "a cat"}, metrics=("CIDEr",))


def test_spice_reports_missing_corenlp_jars(tmp_path):
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    reason = spice_unavailable_reason(tmp_path)
    assert reason and str(tmp_path) in reason and all(name in reason for name in SPICE_CORENLP_JARS)
    for name in SPICE_CORENLP_JARS:
        (tmp_path / name).write_bytes(b"")
    assert spice_unavailable_reason(tmp_path) is None


@needs_java
def test_spice_unavailable_does_not_stop_other_metrics():
    if spice_unavailable_reason() is None:
        pytest.skip("SPICE's CoreNLP jars are installed here")
    scores = evaluate_captions({1: ["a dog runs"], 2: ["a cat"]}, {1: "a dog", 2: "a cat"}, ("Bleu", "SPICE"))
    assert scores.corpus["SPICE"] is None and "stanford-corenlp-3.6.0" in scores.notes["SPICE"]
    assert scores.corpus["Bleu_1"] > 0.5


@needs_java
def test_spice_runner_reports_a_failing_jar(tmp_path):
    if spice_unavailable_reason() is None:
        pytest.skip("SPICE's CoreNLP jars are installed here")
    # Without CoreNLP the SPICE jar starts and dies at once; the error carries Java's own message.
    with pytest.raises(RuntimeError, match=r"SPICE failed \(exit 1\).*stanford"):
        spice(["a dog"], [["a dog runs"]], cache_dir=tmp_path)


@pytest.fixture(scope="module")
def demo(coco_demo_results):
    """The coco-caption demo: 1000 captions and their MS-COCO val2014 references (inside the wheel)."""
    jar = pycocoevalcap_dir() / "spice" / "spice-1.0.jar"
    annotations = json.loads(zipfile.ZipFile(jar).read("coco/annotations/captions_val2014.json"))["annotations"]
    res = {r["image_id"]: r["caption"] for r in json.loads(coco_demo_results.read_text())}
    gts: dict[int, list[str]] = {i: [] for i in res}
    for ann in annotations:
        if ann["image_id"] in gts:
            gts[ann["image_id"]].append(ann["caption"])
    return gts, res


@needs_java
def test_demo_results_equal_pycocoevalcap_and_published_scores(demo):
    gts, res = demo

    def pycocoevalcap_scores() -> dict:
        tokenizer = PTBTokenizer()
        tok_gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in gts.items()})
        tok_res = tokenizer.tokenize({i: [{"caption": res[i]}] for i in gts})
        out = reference_scores(tok_gts, {i: caps[0] for i, caps in tok_res.items()})
        out["METEOR"] = Meteor().compute_score(tok_gts, tok_res)
        return out

    with ThreadPoolExecutor(1) as pool:  # both sides mostly wait for their Java processes
        reference = pool.submit(pycocoevalcap_scores)
        ours = evaluate_captions(gts, res)
        theirs = reference.result()
    assert ours.image_ids == list(gts) and len(ours.image_ids) == 1000

    assert_same_scores({k: (ours.corpus[k], ours.per_image[k]) for k in theirs}, theirs)
    for name, published in PUBLISHED.items():
        assert round(ours.corpus[name], 3) == pytest.approx(published), name
    if spice_unavailable_reason() is not None:
        assert ours.corpus["SPICE"] is None and "SPICE" in ours.notes
