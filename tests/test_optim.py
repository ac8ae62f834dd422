"""Parameter groups, AdamW, the warm-up + cosine schedule (spec §8.1-8.3) and the captioning loss (§6.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beit3cap.args import config_from_argv, parse_args
from beit3cap.loss import CaptioningLoss, smoothed_kl
from beit3cap.model import create_model
from beit3cap.optim import build_optimizer, cosine_schedule, parameter_groups, set_lr


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("beit3_tiny_patch16_32", vocab_size=58)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------------------------------- groups

def test_no_decay_rule_and_two_groups_without_layer_decay(tiny):
    groups = parameter_groups(tiny, weight_decay=0.05, layer_decay=1.0)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] or [g["weight_decay"] for g in groups] == [0.0, 0.05]
    decay = next(g for g in groups if g["weight_decay"] == 0.05)
    no_decay = next(g for g in groups if g["weight_decay"] == 0.0)
    assert all(g["lr_scale"] == 1.0 for g in groups)
    d, nd = _names(tiny, decay), _names(tiny, no_decay)
    # Spec §8.1: the text position table and text embedding decay; table A and CLS do not.
    assert "beit3.encoder.embed_positions.B.weight" in d
    assert "beit3.text_embed.weight" in d
    assert "mlm_head.weight" in d
    assert "beit3.vision_embed.mask_token" in d  # 3-D, not excluded (no gradient, so AdamW skips it)
    assert "beit3.encoder.embed_positions.A.weight" in nd
    assert "beit3.vision_embed.cls_token" in nd
    assert "mlm_head.bias" in nd
    assert all(tiny.get_parameter(n).ndim > 1 for n in d)
    # every parameter exactly once
    assert len(d) + len(nd) == len(list(tiny.parameters()))


def test_layer_decay_scales(tiny):
    groups = parameter_groups(tiny, weight_decay=0.05, layer_decay=0.5)
    depth = tiny.get_num_layers()
    by_name = {}
    for g in groups:
        for n in _names(tiny, g):
            by_name[n] = g["lr_scale"]
    assert by_name["beit3.text_embed.weight"] == pytest.approx(0.5 ** (depth + 1))
    assert by_name["beit3.encoder.layers.0.ffn.A.fc1.weight"] == pytest.approx(0.5 ** depth)
    assert by_name[f"beit3.encoder.layers.{depth - 1}.ffn.A.fc1.weight"] == pytest.approx(0.5)
    assert by_name["mlm_head.weight"] == 1.0
    assert by_name["beit3.encoder.layer_norm.B.weight"] == 1.0


def test_weight_decay_zero_keeps_groups_and_lr_scale(tiny):
    """Official bug §9.14: weight_decay 0 made the optimizer lose lr_scale (KeyError in training)."""
    opt = build_optimizer(tiny, lr=1e-3, weight_decay=0.0, layer_decay=0.5)
    assert all("lr_scale" in g for g in opt.param_groups)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    set_lr(opt, 2e-3)
    assert {round(g["lr"] / g["lr_scale"], 12) for g in opt.param_groups} == {2e-3}


def test_optimizer_state_dict_has_only_official_group_keys(tiny):
    opt = build_optimizer(tiny, lr=1e-3, weight_decay=0.05)
    keys = set(opt.state_dict()["param_groups"][0])
    assert {"weight_decay", "lr_scale", "lr", "params"} <= keys
    assert "param_names" not in keys


# ----------------------------------------------------------------------------------------- schedule

def _spec_schedule(base, final, epochs, per_epoch, warmup_iters):
    warm = [base * i / (warmup_iters - 1) for i in range(warmup_iters)] if warmup_iters > 1 else \
        ([0.0] if warmup_iters == 1 else [])
    n = epochs * per_epoch - warmup_iters
    cos = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return warm + cos


def test_schedule_matches_spec_formula():
    sched = cosine_schedule(4e-5, 1e-6, epochs=10, steps_per_epoch=7, warmup_epochs=1)
    expected = _spec_schedule(4e-5, 1e-6, 10, 7, 7)
    assert len(sched) == 70
    np.testing.assert_allclose(sched, expected, rtol=1e-12, atol=0)
    assert sched[0] == 0.0  # warm-up starts at 0, --warmup_lr is ignored (official)
    assert sched[6] == pytest.approx(4e-5)  # both ends of the linspace are included
    assert sched[7] == pytest.approx(4e-5)  # cosine starts at the peak
    assert sched[-1] > 1e-6  # never quite reaches min_lr


def test_warmup_steps_override_even_with_zero_warmup_epochs():
    """Official bug §9.13: warmup_steps > 0 with warmup_epochs 0 failed an assertion."""
    sched = cosine_schedule(1e-3, 0.0, epochs=2, steps_per_epoch=10, warmup_epochs=0, warmup_steps=4)
    np.testing.assert_allclose(sched, _spec_schedule(1e-3, 0.0, 2, 10, 4), rtol=1e-12)
    sched = cosine_schedule(1e-3, 0.0, epochs=2, steps_per_epoch=10, warmup_epochs=5, warmup_steps=3)
    assert sched[2] == pytest.approx(1e-3) and sched[1] == pytest.approx(5e-4)


def test_warmup_longer_than_run_is_cut():
    sched = cosine_schedule(1e-3, 0.0, epochs=1, steps_per_epoch=5, warmup_epochs=3)
    assert len(sched) == 5 and sched[0] == 0.0 and sched[-1] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------------------- loss

def test_smoothed_kl_equals_kl_div_over_all_rows():
    torch.manual_seed(0)
    logits, labels = torch.randn(13, 58) * 3, torch.randint(0, 58, (13,))
    eps = 0.1
    target = torch.full((13, 58), eps / 57)
    target[torch.arange(13), labels] = 1 - eps
    reference = F.kl_div(F.log_softmax(logits, -1), target, reduction="none").sum(-1)
    torch.testing.assert_close(smoothed_kl(logits, labels, eps), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(smoothed_kl(logits, labels, 0.0), F.cross_entropy(logits, labels, reduction="none"))


def test_smoothed_kl_gradient_matches_smoothed_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(5, 20, requires_grad=True)
    labels = torch.randint(0, 20, (5,))
    smoothed_kl(logits, labels, 0.1).sum().backward()
    g1 = logits.grad.clone()
    logits.grad = None
    target = torch.full((5, 20), 0.1 / 19)
    target[torch.arange(5), labels] = 0.9
    (-(target * F.log_softmax(logits, -1)).sum()).backward()
    torch.testing.assert_close(g1, logits.grad)


def test_drop_worst_keeps_the_smallest_losses_after_the_threshold():
    torch.manual_seed(2)
    logits, labels = torch.randn(10, 30), torch.randint(0, 30, (10,))
    per_token = smoothed_kl(logits, labels, 0.1)
    loss = CaptioningLoss(0.1, drop_worst_ratio=0.2, drop_worst_after=100)
    before = loss(logits, labels, global_step=100)  # not strictly after: everything counts
    assert before.kept == 10 and before.mean.item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    after = loss(logits, labels, global_step=101)
    assert after.kept == 8 and after.total == 10
    assert after.mean.item() == pytest.approx(per_token.sort().values[:8].mean().item(), rel=1e-6)
    assert int(after.correct) == int((logits.argmax(-1) == labels).sum())


# ------------------------------------------------------------------------------------------- flags

BASE = ["--task", "coco_captioning", "--sentencepiece_model", "x.spm"]


def test_official_defaults_and_both_local_rank_spellings():
    ns = parse_args(BASE + ["--local-rank=3"])
    assert ns.local_rank == 3 and parse_args(BASE + ["--local_rank", "2"]).local_rank == 2
    cfg = config_from_argv(BASE)
    assert (cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.batch_size, cfg.epochs) == (5e-4, 0.05, 0.9, 64, 20)
    assert (cfg.num_max_bpe_tokens, cfg.generation_max_len, cfg.vocab_size) == (64, 64, 64010)
    assert (cfg.captioning_mask_prob, cfg.drop_worst_ratio, cfg.drop_worst_after) == (0.6, 0.2, 12000)
    assert cfg.auto_resume and cfg.save_ckpt and cfg.hflip and cfg.resolved_eval_batch_size == 96
    assert config_from_argv(BASE + ["--num_max_bpe_tokens", "32", "--gen_max_len", "40"]).generation_max_len == 40


def test_imagenet_flags_are_accepted_ignored_and_documented(capsys):
    cfg = config_from_argv(BASE + ["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--aa", "rand-m9",
                                   "--nb_classes", "1000", "--resplit", "--momentum", "0.9", "--warmup_lr", "1e-5"])
    assert not hasattr(cfg, "mixup")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "accepted and ignored" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--task", "vqav2"], "not supported"),
    (["--opt", "sgd"], "only adamw"),
    (["--update_freq", "0"], "--update_freq must be"),
    (["--drop_worst_ratio", "1.0"], "--drop_worst_ratio"),
])
def test_bad_flags_fail_with_a_clear_message(flags, message):
    argv = BASE + flags if flags[0] != "--task" else ["--sentencepiece_model", "x.spm"] + flags
    with pytest.raises(SystemExit, match=message):
        config_from_argv(argv)


def test_config_is_plain_data():
    plain = config_from_argv(BASE).to_plain()
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in plain.values())


def test_optimizer_state_mismatch_is_detected():
    from beit3cap.optim import state_mismatch

    model = create_model("beit3_tiny_patch16_32", vocab_size=58)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    assert state_mismatch(opt, state) is None
    other = build_optimizer(create_model("beit3_tiny_patch16_32", vocab_size=60), lr=1e-3, weight_decay=0.05)
    assert state_mismatch(other, state) == "a moment of shape (58, 64) for a parameter of shape (60, 64)"
    layered = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert state_mismatch(layered, state).startswith("parameter groups of sizes")
