"""Proofs for beit3cap.generate.

The batched, cached beam search is compared with a plain transcription of the official loop (spec §7.1):
images repeated per beam, the whole text recomputed every step with ``caption_logits`` (no cache), and a
Python scan over every image's candidates. Tiny random models with a sharpened head and a biased EOS row
make beams finish early, images stop early and captions hit the length limit; the test checks that all of
these happened.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from beit3cap.generate import generate
from beit3cap.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, create_model

VOCAB = 30
MASK = VOCAB - 2  # like the tokenizer: <mask> = pieces + 1, one dead row above it


# ----------------------------------------------------------------------------------------------------
# The official scheme, written out plainly


class KeepBest:
    """The official hypothesis container with n_hyp = 1 (``utils.BeamHypotheses``)."""

    def __init__(self, max_len: int, lp: float):
        self.max_length, self.lp = max_len - 1, lp
        self.hyps: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, hyp: list[int], sum_logprobs: float) -> bool:
        score = sum_logprobs / len(hyp) ** self.lp
        if not self.hyps or score > self.worst:
            self.hyps.append((score, hyp))
            if len(self.hyps) > 1:
                self.hyps.sort(key=lambda h: h[0])
                del self.hyps[0]
                self.worst = self.hyps[0][0]
            else:
                self.worst = min(score, self.worst)
            return True
        return False

    def is_done(self, best_sum_logprobs: float) -> bool:
        return bool(self.hyps) and self.worst >= best_sum_logprobs / self.max_length ** self.lp


def official_beam_search(model, images, beams, max_len, lp, forbid=(), stats=None):
    """Per image, per candidate, full recompute each step; returns (words, scores) per image."""
    n, vocab = images.shape[0], model.config.vocab_size
    repeated = images.repeat_interleave(beams, 0)
    seqs = [[BOS_ID, MASK] for _ in range(n * beams)]
    beam_scores = torch.tensor([0.0 if j == 0 else -1e9 for _ in range(n) for j in range(beams)])
    kept = [KeepBest(max_len, lp) for _ in range(n)]
    done = [False] * n
    cur_len = 2
    while cur_len <= max_len:
        logits = model.caption_logits(repeated, torch.tensor(seqs))[:, -1].float()
        if forbid:
            logits[:, list(forbid)] = float("-inf")
        scores = torch.log_softmax(logits, -1) + beam_scores[:, None]
        top_scores, top_ids = scores.view(n, beams * vocab).topk(3 * beams, dim=1, sorted=True)
        next_batch = []
        for b in range(n):
            was_done = done[b]
            done[b] = done[b] or kept[b].is_done(top_scores[b].max().item())
            if done[b]:
                if not was_done and stats is not None and cur_len < max_len - 1:
                    stats["stopped_early"] += 1
                next_batch += [(0.0, PAD_ID, 0)] * beams
                continue
            beam, eos_here = [], 0
            for idx, score in zip(top_ids[b].tolist(), top_scores[b].tolist()):
                beam_id, word = idx // vocab, idx % vocab
                row = b * beams + beam_id
                if (word == EOS_ID and cur_len + 1 <= max_len) or cur_len + 1 == max_len:
                    kept[b].add(seqs[row][:cur_len], score)
                    eos_here += cur_len + 1 < max_len
                else:
                    beam.append((score, word, row))
                if len(beam) == beams:
                    break
            if stats is not None:
                stats["eos_hyps"] += eos_here
                stats["all_beams_eos"] += eos_here == beams > 1
            if not beam:
                beam = [(0.0, PAD_ID, 0)] * beams
            next_batch += beam
        beam_scores = torch.tensor([s for s, _, _ in next_batch])
        seqs = [seqs[row][:-1] + [word, MASK] for _, word, row in next_batch]
        cur_len += 1
        if all(done):
            break
    words = [k.hyps[0][1][1:-1] for k in kept]
    if stats is not None:
        stats["full_length"] += sum(len(w) == max_len - 3 for w in words)
        stats["short"] += sum(len(w) < max_len - 3 for w in words)
    return words, [k.hyps[0][0] for k in kept]


def uncached_greedy(model, images, max_len, lp):
    words, scores = [], []
    for img in images:
        seq, total = [BOS_ID], 0.0
        for cur_len in range(2, max_len):
            with torch.no_grad():
                logits = model.caption_logits(img[None], torch.tensor([seq + [MASK]]))[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            w = int(logp.argmax())
            total = float(torch.tensor(total) + logp[w])  # float32 accumulation, as the beam scores
            if w == EOS_ID or cur_len + 1 == max_len:
                break
            seq.append(w)
        words.append(seq[1:])
        scores.append(total / cur_len ** lp)
    return words, scores


# ----------------------------------------------------------------------------------------------------
# Models


def tiny_model(seed: int, sharpen: float, eos_bias: float, dtype=torch.float64):
    torch.manual_seed(seed)
    model = create_model("beit3_tiny_patch16_32", vocab_size=VOCAB).eval().to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # leave the init's near-uniform predictions behind
            p.add_(torch.randn_like(p) * 0.05)
        model.mlm_head.weight.mul_(sharpen)
        model.mlm_head.bias[EOS_ID] += eos_bias
    return model


def images_for(seed: int, n: int, dtype=torch.float64):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


# (seed, sharpen, eos_bias): flat to peaked predictions, EOS rare to dominant
MODELS = [(0, 3.0, 0.0), (1, 8.0, 1.0), (2, 15.0, 2.5), (3, 6.0, 4.0), (4, 25.0, 0.5), (5, 10.0, -3.0),
          (6, 4.0, 6.0), (7, 12.0, 3.0)]
SETTINGS = [(3, 8, 0.6), (2, 6, 0.6), (4, 12, 1.0), (1, 9, 0.6), (3, 3, 0.6), (5, 7, 0.0), (3, 10, 2.0),
            (3, 10, -0.5), (2, 9, -1.0), (3, 5, -0.3), (2, 6, -0.5)]
# With lp >= 0 the official stop test is a safe bound (it never changes the caption, only saves work);
# with lp < 0 it decides captions, and the last two settings catch a stop test using max_len instead of
# max_len - 1.


def new_stats() -> dict[str, int]:
    return dict.fromkeys(["stopped_early", "eos_hyps", "all_beams_eos", "full_length", "short"], 0)


def test_beam_search_equals_official_loop():
    coverage = new_stats()
    for model_args in MODELS:
        model = tiny_model(*model_args)
        images = images_for(model_args[0], 5)
        for beams, max_len, lp in SETTINGS:
            case = (model_args, beams, max_len, lp)
            want_ids, want_scores = official_beam_search(model, images, beams, max_len, lp, stats=coverage)
            got_ids, got_scores = generate(model, images, num_beams=beams, max_len=max_len, length_penalty=lp,
                                           mask_token_id=MASK, return_scores=True)
            assert got_ids == want_ids, case
            assert got_scores == pytest.approx(want_scores, abs=1e-5, rel=1e-6), case
            # Another batch composition gives every image the same caption.
            order = [3, 0, 4]
            part = generate(model, images[order], num_beams=beams, max_len=max_len, length_penalty=lp,
                            mask_token_id=MASK)
            assert part == [want_ids[i] for i in order], case
    # The scenarios the models were built for did occur: beams finishing early (also all K at once),
    # images stopping before the limit, captions at the length limit and shorter ones.
    assert all(v > 0 for v in coverage.values()), coverage


def test_beam_search_float32_and_forbidden_ids_equal_official_loop():
    forbid = (BOS_ID, PAD_ID, UNK_ID, MASK, VOCAB - 1)
    for seed, sharpen, eos_bias in MODELS[:4]:
        model = tiny_model(seed, sharpen, eos_bias, dtype=torch.float32)
        model.mlm_head.bias.data[[UNK_ID, MASK]] += 3.0  # make the forbidden rows attractive
        images = images_for(seed, 4, torch.float32)
        for forbid_ids in ((), forbid):
            want_ids, want_scores = official_beam_search(model, images, 3, 8, 0.6, forbid=forbid_ids)
            got_ids, got_scores = generate(model, images, num_beams=3, max_len=8, mask_token_id=MASK,
                                           forbid_ids=forbid_ids, return_scores=True)
            assert got_ids == want_ids
            assert got_scores == pytest.approx(want_scores, abs=1e-5, rel=1e-5)
            if forbid_ids:
                assert not set(itertools.chain(*got_ids)) & set(forbid)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_greedy_cached_equals_uncached_recompute(dtype):
    for seed, sharpen, eos_bias in MODELS:
        model = tiny_model(seed, sharpen, eos_bias, dtype)
        images = images_for(seed, 4, dtype)
        want_ids, want_scores = uncached_greedy(model, images, 10, 0.6)
        got_ids, got_scores = generate(model, images, strategy="greedy", max_len=10, mask_token_id=MASK,
                                       return_scores=True)
        assert got_ids == want_ids
        assert got_scores == pytest.approx(want_scores, abs=1e-5, rel=1e-5)


def test_greedy_is_the_one_beam_search_up_to_its_first_hypothesis():
    equal = longer = 0
    for seed, sharpen, eos_bias in MODELS:
        model = tiny_model(seed, sharpen, eos_bias)
        images = images_for(seed, 5)
        # A large length penalty rewards going on after an EOS, so both outcomes occur.
        greedy, g_scores = generate(model, images, strategy="greedy", max_len=9, length_penalty=2.0,
                                    mask_token_id=MASK, return_scores=True)
        beam, b_scores = generate(model, images, num_beams=1, max_len=9, length_penalty=2.0,
                                  mask_token_id=MASK, return_scores=True)
        for g, b, gs, bs in zip(greedy, beam, g_scores, b_scores):
            assert b[:len(g)] == g
            if len(b) == len(g):
                assert gs == pytest.approx(bs, abs=1e-9)
                equal += 1
            else:  # the beam went on past an EOS and found a better longer caption
                assert bs > gs
                longer += 1
    assert equal and longer


def test_captions_respect_max_len():
    model = tiny_model(5, 10.0, -8.0)  # EOS almost never chosen: every caption runs to the limit
    images = images_for(5, 3)
    for max_len in (3, 4, 7):
        for strategy in ("beam", "greedy", "sample"):
            out = generate(model, images, max_len=max_len, mask_token_id=MASK, strategy=strategy,
                           generator=torch.Generator().manual_seed(0))
            assert [len(w) for w in out] == [max_len - 3] * 3


class Counter:
    """Forward hooks that record how many images the encoder saw and how many text rows each step had."""

    def __init__(self, model):
        self.images: list[int] = []
        self.rows: list[int] = []
        self.handles = [
            model.beit3.vision_embed.register_forward_hook(lambda m, i, o: self.images.append(i[0].shape[0])),
            model.mlm_head.register_forward_hook(lambda m, i, o: self.rows.append(i[0].shape[0])),
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def test_images_are_encoded_once_and_finished_images_leave_the_batch():
    model = tiny_model(6, 4.0, 6.0)  # EOS-heavy: some images settle long before the length limit
    images = images_for(6, 6)
    stats = new_stats()
    want, _ = official_beam_search(model, images, 3, 12, 0.6, stats=stats)
    assert stats["stopped_early"] > 0
    counter = Counter(model)
    try:
        got = generate(model, images, num_beams=3, max_len=12, mask_token_id=MASK)
    finally:
        counter.close()
    assert got == want
    assert counter.images == [6]
    assert counter.rows[0] == 18 and counter.rows == sorted(counter.rows, reverse=True)
    assert counter.rows[-1] < 18 and len(counter.rows) <= 12 - 2
    assert all(r % 3 == 0 for r in counter.rows)


def test_sampling_is_reproducible_and_filters_apply():
    model = tiny_model(2, 3.0, 0.0)
    images = images_for(2, 4)

    def sample(seed, **kw):
        return generate(model, images, strategy="sample", max_len=10, mask_token_id=MASK,
                        generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(1) == sample(1)
    assert len({str(sample(s)) for s in range(4)}) > 1
    greedy = generate(model, images, strategy="greedy", max_len=10, mask_token_id=MASK)
    assert sample(3, top_k=1) == greedy
    assert sample(3, top_p=1e-6) == greedy
    assert sample(3, temperature=1e-4) == greedy
    forbid = (BOS_ID, PAD_ID, UNK_ID, MASK, VOCAB - 1)
    for s in range(3):
        assert not set(itertools.chain(*sample(s, forbid_ids=forbid, temperature=3.0))) & set(forbid)


def test_autocast_bf16_runs_and_mostly_agrees():
    model = tiny_model(1, 8.0, 1.0, dtype=torch.float32)
    images = images_for(1, 4, torch.float32)
    fp32 = generate(model, images, max_len=8, mask_token_id=MASK)
    bf16 = generate(model, images, max_len=8, mask_token_id=MASK, amp_dtype=torch.bfloat16)
    assert all(isinstance(w, int) for w in itertools.chain(*bf16)) and len(bf16) == 4
    assert sum(a == b for a, b in zip(fp32, bf16)) >= 2


def test_empty_batch():
    model = tiny_model(0, 1.0, 0.0, dtype=torch.float32)
    assert generate(model, torch.zeros(0, 3, 32, 32), mask_token_id=MASK, return_scores=True) == ([], [])


@pytest.mark.parametrize("kwargs, message", [
    (dict(forbid_ids=(EOS_ID,)), "EOS"),
    (dict(forbid_ids=(VOCAB,)), "outside"),
    (dict(max_len=2), "max_len"),
    (dict(num_beams=0), "num_beams"),
    (dict(strategy="nucleus"), "strategy"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_arguments_are_explained(kwargs, message):
    model = tiny_model(0, 1.0, 0.0, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        generate(model, images_for(0, 1, torch.float32), mask_token_id=MASK, **kwargs)
