"""The model against the official backbone (torchscale's BEiT3, installed only for tests), the official key
layout and parameter counts, the registry, and the training helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from beit3cap.model import (MODEL_CONFIGS, BEiT3ForCaptioning, create_model, get_config,
                            layer_id_for_lr_decay, resolve_model_name)

torchscale = pytest.importorskip("torchscale")
from torchscale.architecture.config import EncoderConfig  # noqa: E402
from torchscale.model.BEiT3 import BEiT3 as OfficialBEiT3  # noqa: E402


class OfficialCaptioning(nn.Module):
    """The official captioning wrapper rebuilt from the spec (§6.1) around torchscale's backbone."""

    def __init__(self, cfg, drop_path: float = 0.0):
        super().__init__()
        args = EncoderConfig(
            vocab_size=cfg.vocab_size, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=3,
            encoder_embed_dim=cfg.embed_dim, encoder_layers=cfg.depth, encoder_attention_heads=cfg.num_heads,
            encoder_ffn_embed_dim=cfg.ffn_dim, multiway=True, layernorm_embedding=False, normalize_output=True,
            no_output_layer=True, drop_path_rate=drop_path, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, max_source_positions=cfg.max_text_positions, layernorm_eps=1e-5,
            checkpoint_activations=False, share_encoder_input_output_embed=False,
        )
        self.beit3 = OfficialBEiT3(args)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.num_image_tokens = cfg.num_image_tokens

    def features(self, image, text_ids, padding_mask):
        n_img, t = self.num_image_tokens, text_ids.shape[1]
        allowed = torch.zeros(n_img + t, n_img + t)
        allowed[:n_img, :n_img] = 1
        allowed[n_img:, :n_img] = 1
        allowed[n_img:, n_img:] = torch.ones(t, t).tril()
        out = self.beit3(textual_tokens=text_ids, visual_tokens=image, text_padding_position=padding_mask.bool(),
                         attn_mask=1 - allowed)
        return out["encoder_out"]

    def forward(self, image, text_ids, padding_mask, masked_pos):
        x = self.features(image, text_ids, padding_mask)[:, self.num_image_tokens:]
        return self.mlm_head(x[masked_pos.bool()])


def _pair(name: str, drop_path: float = 0.0, **overrides):
    torch.manual_seed(0)
    ours = create_model(name, drop_path_rate=drop_path, **overrides)
    # Random, non-trivial values everywhere (LayerNorm weights, biases, tables), not just the init.
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05).add_(1.0 if p.dim() == 1 and p.shape[0] in (ours.config.embed_dim,) else 0)
    official = OfficialCaptioning(ours.config, drop_path)
    missing, unexpected = official.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, official


def _inputs(cfg, batch=3, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    ids = torch.randint(4, cfg.vocab_size, (batch, t), generator=g)
    ids[:, 0] = 0
    padding = torch.zeros(batch, t, dtype=torch.long)
    padding[1, 6:] = 1  # padded text
    padding[-1, 3:] = 1
    masked = (torch.rand(batch, t, generator=g) < 0.6).long() * (1 - padding)
    masked[:, 1] = 1
    return image, ids, padding, masked


def test_state_dict_keys_are_exactly_torchscale_plus_head():
    ours, official = _pair("beit3_tiny_patch16_32", vocab_size=50)
    assert set(ours.state_dict()) == set(official.state_dict())
    for k, v in official.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("name, tol", [("beit3_tiny_patch16_32", 1e-5), ("beit3_mini_patch16_64", 1e-5)])
def test_captioning_logits_match_official_eval_mode(name, tol):
    ours, official = _pair(name, vocab_size=70)
    ours.eval(), official.eval()
    image, ids, padding, masked = _inputs(ours.config)
    with torch.no_grad():
        a = ours(image, ids, padding, masked)
        b = official(image, ids, padding, masked)
        # Encoder output at every non-padded position (image and text).
        img_a, txt_a = ours.beit3(image, ids, padding, causal_text=True)
        full_b = official.features(image, ids, padding)
    n_img = ours.config.num_image_tokens
    assert (a - b).abs().max() <= tol
    assert (img_a - full_b[:, :n_img]).abs().max() <= tol
    keep = ~padding.bool()
    assert (txt_a[keep] - full_b[:, n_img:][keep]).abs().max() <= tol


def test_training_mode_with_drop_path_and_gradients_match_official():
    ours, official = _pair("beit3_tiny_patch16_32", drop_path=0.3, vocab_size=50)
    ours.train(), official.train()
    image, ids, padding, masked = _inputs(ours.config, batch=4, seed=5)
    torch.manual_seed(123)
    a = ours(image, ids, padding, masked)
    torch.manual_seed(123)
    b = official(image, ids, padding, masked)
    assert (a - b).abs().max() <= 1e-5
    a.square().mean().backward()
    b.square().mean().backward()
    grads_b = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        gb = grads_b[name].grad
        if p.grad is None:
            assert gb is None or gb.abs().max() == 0, name
            continue
        assert (p.grad - gb).abs().max() <= 1e-5 * max(1.0, gb.abs().max().item()), name


def test_text_only_and_image_only_passes_match_official():
    ours, official = _pair("beit3_tiny_patch16_32", vocab_size=50)
    ours.eval(), official.eval()
    image, ids, padding, _ = _inputs(ours.config)
    with torch.no_grad():
        _, txt = ours.beit3(text_ids=ids, padding_mask=padding)
        ref_txt = official.beit3(textual_tokens=ids, text_padding_position=padding.bool())["encoder_out"]
        img, _ = ours.beit3(image=image)
        ref_img = official.beit3(visual_tokens=image)["encoder_out"]
    keep = ~padding.bool()
    assert (txt[keep] - ref_txt[keep]).abs().max() <= 1e-5
    assert (img - ref_img).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = create_model("beit3_tiny_patch16_32", vocab_size=50, drop_path_rate=0.2).train()
    image, ids, padding, masked = _inputs(model.config, seed=3)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(7)
        model(image, ids, padding, masked).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)


@pytest.mark.slow
def test_base_224_matches_official_to_1e_4():
    ours, official = _pair("beit3_base_patch16_224")
    ours.eval(), official.eval()
    image, ids, padding, masked = _inputs(ours.config, batch=2, t=12)
    with torch.no_grad():
        diff = (ours(image, ids, padding, masked) - official(image, ids, padding, masked)).abs().max()
    assert diff <= 1e-4


def _decoding_case(seed: int, images: int, beams: int, steps: int):
    """A tiny random model, images, BOS-led random text rows (beams rows per image) and an empty cache."""
    torch.manual_seed(seed)
    model = create_model("beit3_tiny_patch16_32", vocab_size=40).eval()
    image = torch.randn(images, 3, 32, 32)
    ids = torch.randint(4, 40, (images * beams, steps))
    ids[:, 0] = 0
    return model, image, ids, model.new_cache(model.encode_image(image), beams=beams, max_len=steps + 1)


def test_cached_decoding_equals_full_recompute():
    k = 3
    model, image, ids, cache = _decoding_case(seed=0, images=2, beams=k, steps=7)
    steps = ids.shape[1]
    full = model.caption_logits(image.repeat_interleave(k, 0), ids)
    step_logits = [model.decode_step(ids[:, :2], cache)]
    for j in range(2, steps):
        step_logits.append(model.decode_step(ids[:, j:j + 1], cache))
    for j, logits in enumerate(step_logits, start=1):
        assert (logits - full[:, j]).abs().max() <= 1e-5


def test_cache_keep_reorders_beams_and_drops_images_like_a_recompute():
    """Beam reordering and finished images: after keep() the cached rows continue as if every row's
    text had been recomputed from scratch with its new image."""
    k = 2
    model, image, ids, cache = _decoding_case(seed=1, images=3, beams=k, steps=6)
    steps = ids.shape[1]
    model.decode_step(ids[:, :3], cache)
    images = torch.tensor([0, 2])  # image 1 finished
    rows = torch.tensor([1, 1, 5, 4])  # image 0: both beams continue beam 1; image 2: beams swap
    cache.keep(images, rows)
    ids = ids[rows]
    logits = [model.decode_step(ids[:, j:j + 1], cache) for j in range(3, steps)]
    full = model.caption_logits(image[images].repeat_interleave(k, 0), ids)
    for j, step in enumerate(logits, start=3):
        assert (step - full[:, j]).abs().max() <= 1e-5


@pytest.mark.parametrize("name, n_keys, n_params", [
    ("beit3_base_patch16_480", 493, 270_751_754),
    ("beit3_large_patch16_480", 973, 739_033_610),
    ("beit3_base_patch16_224", 493, 270_211_082),
])
def test_official_key_count_and_parameter_count(name, n_keys, n_params):
    with torch.device("meta"):
        model = BEiT3ForCaptioning(get_config(name))
    assert len(model.state_dict()) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert all(k.startswith(("beit3.", "mlm_head.")) for k in model.state_dict())


def test_registry_names_suffix_and_unknown_name_error():
    for size in ("base", "large"):
        for px in (224, 384, 480):
            name = f"beit3_{size}_patch16_{px}"
            assert resolve_model_name(name) == name
            assert resolve_model_name(name + "_captioning") == name
            assert get_config(name).img_size == px
    with pytest.raises(ValueError) as e:
        resolve_model_name("beit_base_patch16_224")  # the official --model default, not a BEiT-3 name
    assert "beit3_base_patch16_224" in str(e.value) and "Known models" in str(e.value)
    assert set(MODEL_CONFIGS) >= {"beit3_tiny_patch16_32"}


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        get_config("beit3_tiny_patch16_32", num_heads=3)
    with pytest.raises(ValueError, match="expects 32x32"):
        create_model("beit3_tiny_patch16_32", vocab_size=20)(torch.zeros(1, 3, 48, 48), torch.zeros(1, 3).long(),
                                                            torch.zeros(1, 3).long(), torch.ones(1, 3).long())


def test_no_weight_decay_and_layer_ids():
    model = create_model("beit3_tiny_patch16_32", vocab_size=20)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    depth = model.config.depth
    assert layer_id_for_lr_decay("beit3.text_embed.weight", depth) == 0
    assert layer_id_for_lr_decay("beit3.encoder.embed_positions.B.weight", depth) == 0
    assert layer_id_for_lr_decay("beit3.encoder.layers.1.ffn.A.fc1.weight", depth) == 2
    assert layer_id_for_lr_decay("mlm_head.weight", depth) == depth + 1
    assert layer_id_for_lr_decay("beit3.encoder.layer_norm.B.weight", depth) == depth + 1
