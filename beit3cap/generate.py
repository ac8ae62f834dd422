"""Caption decoding over the model's cached step: the official beam search (spec §7.1), greedy, sampling.

Every strategy encodes each image once, shares its per-layer image K/V with all of its text rows, keeps a
text KV cache, and drops an image from the batch as soon as its caption is settled.

Beam search reproduces ``CaptioningHandler.eval_batch`` exactly, but with the per-candidate Python loop
replaced by tensor operations over the whole batch:

* beam scores start at [0, -1e9, ...]; candidates are the top 3K of log_softmax(all vocabulary rows) +
  beam score over the K beams of an image, sorted, scanned in order;
* an EOS candidate becomes a finished hypothesis only if it comes before the K-th non-EOS candidate;
  at cur_len == max_len - 1 every scanned candidate is finished instead (its token dropped, its log-prob
  counted);
* a hypothesis [BOS, words..., MASK] of length cur_len scores sum_logprobs / cur_len ** lp; one is kept
  per image, replaced only by a strictly better one;
* before an image's candidates are scanned it is done when its kept score >=
  max(candidate scores) / (max_len - 1) ** lp, and a done image never changes again.

Text position bookkeeping: at cur_len the model input is [BOS, w_1 .. w_{cur_len-2}, MASK]; the cache holds
everything but the MASK, so each step feeds [last word, MASK] and forgets the MASK's entry afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass

import torch

from .model import BOS_ID, EOS_ID, BEiT3ForCaptioning, DecodeCache, ImageKV

TOPN_PER_BEAM = 3  # the official scan looks at 3 candidates per beam
STRATEGIES = ("beam", "greedy", "sample")


@dataclass
class _Rows:
    """What travels with the images still being decoded (alive = their indices in the input batch)."""

    alive: torch.Tensor
    cache: DecodeCache
    words: torch.Tensor  # [rows, max words] words decoded so far, per row

    def keep(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep these images (local indices) and these text rows (indices into the current rows)."""
        if images.numel() != self.alive.numel():
            self.alive = self.alive[images]
        self.cache.keep(images, rows)
        self.words = self.words[rows]


@dataclass
class _Best:
    """The caption kept for every input image: its words and length-normalised score (float64)."""

    score: torch.Tensor
    found: torch.Tensor
    words: torch.Tensor
    length: torch.Tensor

    @classmethod
    def empty(cls, batch: int, max_words: int, device: torch.device) -> "_Best":
        return cls(torch.full((batch,), float("-inf"), dtype=torch.float64, device=device),
                   torch.zeros(batch, dtype=torch.bool, device=device),
                   torch.zeros(batch, max_words, dtype=torch.long, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    def offer(self, images: torch.Tensor, words: torch.Tensor, n_words: int, score: torch.Tensor,
              only_if_better: bool) -> None:
        """Record (words[:, :n_words], score) for these images; with only_if_better, only strict gains."""
        if only_if_better:
            better = ~self.found[images] | (score > self.score[images])
            images, words, score = images[better], words[better], score[better]
        self.score[images] = score
        self.found[images] = True
        self.length[images] = n_words
        self.words[images, :n_words] = words[:, :n_words]

    def result(self) -> tuple[list[list[int]], list[float]]:
        lengths, words = self.length.tolist(), self.words.tolist()
        return [w[:n] for w, n in zip(words, lengths)], self.score.tolist()


def generate(model: BEiT3ForCaptioning, images: torch.Tensor, *, num_beams: int = 3, max_len: int = 64,
             length_penalty: float = 0.6, mask_token_id: int, strategy: str = "beam", top_k: int = 0,
             top_p: float = 1.0, temperature: float = 1.0, forbid_ids: Collection[int] = (),
             generator: torch.Generator | None = None, amp_dtype: torch.dtype | None = None,
             return_scores: bool = False) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Caption token ids for each image [B, 3, S, S] (no BOS/EOS/MASK), ready for ``tokenizer.decode``.

    strategy "beam": the official beam search (module docstring) with ``num_beams`` beams.
    strategy "greedy": the most likely word each step; the caption ends at the first EOS. This is the
    path of a 1-beam official search up to its first finished hypothesis (that search goes on with the
    second-best word and may later keep a longer caption, so greedy is a prefix of it).
    strategy "sample": a word drawn from softmax(logits / temperature), restricted to the ``top_k`` most
    likely words (0 = all) and to the smallest set whose probability reaches ``top_p``; ``generator``
    makes it reproducible.
    All strategies: at most max_len - 3 words (the official budget); ``forbid_ids`` get probability 0
    (EOS may not be forbidden); ``amp_dtype`` runs the model under ``torch.autocast`` (log-probs and
    scores stay float32). Scores (with ``return_scores``) are sum of log-probs / (words + 2) ** lp,
    as the official hypotheses are scored; for greedy/sampling the log-probs are the model's, before
    temperature and filtering, and include the EOS (or, at the length limit, the dropped word).
    """
    _check_args(model, images, num_beams, max_len, strategy, top_k, top_p, temperature, forbid_ids)
    if images.shape[0] == 0:
        return ([], []) if return_scores else []
    param = next(model.parameters())
    images = images.to(param.device, param.dtype if param.is_floating_point() else images.dtype)
    forbid = torch.tensor(sorted(set(int(i) for i in forbid_ids)), dtype=torch.long, device=param.device)
    amp = (torch.autocast(param.device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    with torch.no_grad(), amp:
        image_kv = model.encode_image(images)
        if strategy == "beam":
            best = _beam_search(model, image_kv, num_beams, max_len, length_penalty, mask_token_id, forbid)
        else:
            best = _sample(model, image_kv, max_len, length_penalty, mask_token_id, forbid,
                           strategy == "greedy", top_k, top_p, temperature, generator)
    ids, scores = best.result()
    return (ids, scores) if return_scores else ids


def _check_args(model: BEiT3ForCaptioning, images: torch.Tensor, num_beams: int, max_len: int, strategy: str,
                top_k: int, top_p: float, temperature: float, forbid_ids: Collection[int]) -> None:
    cfg = model.config
    problems = []
    if images.dim() != 4 or images.shape[1] != cfg.in_chans:
        problems.append(f"images must be [B, {cfg.in_chans}, S, S], got {tuple(images.shape)}")
    if strategy not in STRATEGIES:
        problems.append(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_beams < 1:
        problems.append(f"num_beams must be >= 1, got {num_beams}")
    # The MASK of the last step sits at text index max_len - 2, i.e. position row max_len.
    if not 3 <= max_len < cfg.max_text_positions:
        problems.append(f"max_len must be in [3, {cfg.max_text_positions - 1}] (it allows max_len - 3 words), "
                        f"got {max_len}")
    if top_k < 0 or not 0.0 < top_p <= 1.0 or temperature <= 0.0:
        problems.append(f"need top_k >= 0, 0 < top_p <= 1, temperature > 0 (got {top_k}, {top_p}, {temperature})")
    bad = [i for i in forbid_ids if not 0 <= int(i) < cfg.vocab_size]
    if bad:
        problems.append(f"forbid_ids outside the model's {cfg.vocab_size} vocabulary rows: {sorted(bad)[:5]}")
    if EOS_ID in {int(i) for i in forbid_ids}:
        problems.append(f"forbid_ids may not contain EOS ({EOS_ID}): captions could never end")
    if problems:
        raise ValueError("generate: " + "; ".join(problems))


def _log_probs(logits: torch.Tensor, forbid: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if forbid.numel():
        logits = logits.index_fill(1, forbid, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _step_input(words: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """[rows, 2]: the newest word (BOS at the start) and the MASK slot whose logits give the next one."""
    return torch.stack([words, torch.full_like(words, mask_token_id)], dim=1)


def _beam_search(model: BEiT3ForCaptioning, image_kv: ImageKV, beams: int, max_len: int, lp: float,
                 mask_token_id: int, forbid: torch.Tensor) -> _Best:
    n_images, device = image_kv[0][0].shape[0], image_kv[0][0].device
    vocab, n_cand = model.config.vocab_size, TOPN_PER_BEAM * beams
    stop_denominator = (max_len - 1) ** lp  # the official is_done divides by max_length ** lp, max_length = max_len - 1
    best = _Best.empty(n_images, max_len - 3, device)
    rows = _Rows(torch.arange(n_images, device=device), model.new_cache(image_kv, beams, max_len),
                 torch.zeros(n_images * beams, max_len - 3, dtype=torch.long, device=device))
    beam_scores = torch.full((n_images, beams), -1e9, dtype=torch.float32, device=device)
    beam_scores[:, 0] = 0.0
    beam_scores = beam_scores.view(-1)
    last_words = torch.full((n_images * beams,), BOS_ID, dtype=torch.long, device=device)
    slots = torch.arange(n_cand, device=device)

    for cur_len in range(2, max_len):  # the official loop's last pass (cur_len == max_len) changes nothing
        n_alive = rows.alive.numel()
        if cur_len > 2:
            # Log-probs are <= 0, so no candidate can beat the best beam score: an image whose kept caption
            # already passes the stop test against it is done whatever this step's logits are.
            sure = best.found[rows.alive] & (best.score[rows.alive] >=
                                             beam_scores.view(n_alive, beams).amax(1).double() / stop_denominator)
            if bool(sure.any()):
                live = (~sure).nonzero().squeeze(1)
                row_ids = (live[:, None] * beams + torch.arange(beams, device=device)).view(-1)
                rows.keep(live, row_ids)
                beam_scores, last_words = beam_scores[row_ids], last_words[row_ids]
                n_alive = live.numel()
                if n_alive == 0:
                    break

        logits = model.decode_step(_step_input(last_words, mask_token_id), rows.cache)
        rows.cache.length -= 1  # forget the MASK slot
        scores = (_log_probs(logits, forbid) + beam_scores[:, None]).view(n_alive, beams * vocab)
        cand_scores, cand_ids = scores.topk(n_cand, dim=1, largest=True, sorted=True)
        cand_beam, cand_word = cand_ids // vocab, cand_ids % vocab

        done = best.found[rows.alive] & (best.score[rows.alive] >= cand_scores.amax(1).double() / stop_denominator)
        last = cur_len + 1 == max_len
        finished = torch.ones_like(cand_word, dtype=torch.bool) if last else cand_word == EOS_ID
        cont = ~finished
        cont_before = cont.cumsum(1) - cont.long()  # non-EOS candidates ahead of each candidate
        scanned = (cont_before < beams) & ~done[:, None]  # the scan stops once K continuations are found

        # Hypotheses of one step share their length, so the first finished one scanned is the step's best.
        fin = finished & scanned
        has_fin = fin.any(1)
        if bool(has_fin.any()):
            img = has_fin.nonzero().squeeze(1)
            first = fin[img].int().argmax(1, keepdim=True)  # first True
            src = img * beams + cand_beam[img].gather(1, first).squeeze(1)
            score = cand_scores[img].gather(1, first).squeeze(1).double() / cur_len ** lp
            best.offer(rows.alive[img], rows.words[src], cur_len - 2, score, only_if_better=True)
        if last:
            break

        live = (~done).nonzero().squeeze(1)
        if live.numel() == 0:
            break
        # Position (among the 3K candidates) of each image's k-th continuation; other slots land in column K.
        target = torch.where(cont & scanned, cont_before, beams)[live]
        pick = torch.zeros(live.numel(), beams + 1, dtype=torch.long, device=device)
        pick.scatter_(1, target, slots.expand(live.numel(), n_cand))
        pick = pick[:, :beams]
        src = (live[:, None] * beams + cand_beam[live].gather(1, pick)).view(-1)
        beam_scores = cand_scores[live].gather(1, pick).view(-1)
        last_words = cand_word[live].gather(1, pick).view(-1)
        rows.keep(live, src)
        rows.words[:, cur_len - 2] = last_words
    return best


def _sample(model: BEiT3ForCaptioning, image_kv: ImageKV, max_len: int, lp: float, mask_token_id: int,
            forbid: torch.Tensor, greedy: bool, top_k: int, top_p: float, temperature: float,
            generator: torch.Generator | None) -> _Best:
    n_images, device = image_kv[0][0].shape[0], image_kv[0][0].device
    best = _Best.empty(n_images, max_len - 3, device)
    rows = _Rows(torch.arange(n_images, device=device), model.new_cache(image_kv, 1, max_len),
                 torch.zeros(n_images, max_len - 3, dtype=torch.long, device=device))
    sums = torch.zeros(n_images, dtype=torch.float32, device=device)
    last_words = torch.full((n_images,), BOS_ID, dtype=torch.long, device=device)

    for cur_len in range(2, max_len):
        logits = model.decode_step(_step_input(last_words, mask_token_id), rows.cache)
        rows.cache.length -= 1
        logp = _log_probs(logits, forbid)
        word = logp.argmax(1) if greedy else _draw(logits, forbid, top_k, top_p, temperature, generator)
        sums = sums + logp.gather(1, word[:, None]).squeeze(1)
        ended = torch.ones_like(word, dtype=torch.bool) if cur_len + 1 == max_len else word == EOS_ID
        if bool(ended.any()):
            idx = ended.nonzero().squeeze(1)
            best.offer(rows.alive[idx], rows.words[idx], cur_len - 2, sums[idx].double() / cur_len ** lp,
                       only_if_better=False)
            live = (~ended).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            rows.keep(live, live)
            sums, word = sums[live], word[live]
        rows.words[:, cur_len - 2] = word
        last_words = word
    return best


def _draw(logits: torch.Tensor, forbid: torch.Tensor, top_k: int, top_p: float, temperature: float,
          generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float() / temperature
    if forbid.numel():
        logits = logits.index_fill(1, forbid, float("-inf"))
    if 0 < top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=1, descending=True)
        probs = sorted_logits.softmax(1)
        # Keep a word while the mass of the more likely words is still below top_p (the top word always stays).
        drop_sorted = probs.cumsum(1) - probs >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
