"""BEiT-3 Multiway Transformer with the image-captioning head.

Pure PyTorch: no file I/O, no distributed code, no tokenizer. The module tree is laid out so that
``state_dict()`` has exactly the keys and shapes of the official ``BEiT3ForCaptioning`` (microsoft/unilm
``beit3`` on torchscale 0.2.0): ``beit3.*`` for the backbone and ``mlm_head.*`` for the head.

Reading order: config and registry, building blocks, one encoder layer, the backbone, the captioning model.

Every layer runs as two streams that share one attention softmax per text query:

* the image stream (vision experts ``A``) attends to image keys only, so it never needs a mask;
* the text stream (language experts ``B``) attends to [image keys; text keys] under a small mask
  (causal for captioning, key padding always).

This is exactly the official joint-sequence computation with the prefix-LM mask (image->text blocked),
without computing the blocked image->text scores.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# Configuration and registry


@dataclass(frozen=True)
class BEiT3Config:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    drop_path_rate: float = 0.0
    layernorm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            problems.append(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate {self.drop_path_rate} is outside [0, 1)")
        if self.vocab_size < 5:
            problems.append(f"vocab_size {self.vocab_size} leaves no room for the 4 special ids and <mask>")
        for name in ("embed_dim", "depth", "num_heads", "ffn_dim", "img_size", "patch_size", "in_chans",
                     "max_text_positions"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid BEiT3Config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """CLS + one token per patch (901 at 480 px)."""
        return self.grid_size**2 + 1


_BASE = BEiT3Config(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072)
_LARGE = BEiT3Config(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096)

MODEL_CONFIGS: dict[str, BEiT3Config] = {
    **{f"beit3_base_patch16_{s}": replace(_BASE, img_size=s) for s in (224, 384, 480)},
    **{f"beit3_large_patch16_{s}": replace(_LARGE, img_size=s) for s in (224, 384, 480)},
    # Small configurations for tests, benchmarks and the CPU demo (not official checkpoints).
    "beit3_tiny_patch16_32": BEiT3Config(embed_dim=64, depth=2, num_heads=2, ffn_dim=256, img_size=32),
    "beit3_mini_patch16_64": BEiT3Config(embed_dim=128, depth=4, num_heads=4, ffn_dim=512, img_size=64),
    "beit3_small_patch8_64": BEiT3Config(embed_dim=192, depth=4, num_heads=3, ffn_dim=768, img_size=64,
                                         patch_size=8),
}

_TASK_SUFFIXES = ("_captioning", "_coco_captioning", "_nocaps")


def resolve_model_name(name: str) -> str:
    """Map an official model name (``_captioning`` suffix allowed) to a registry key, or explain."""
    base = name.strip()
    for suffix in _TASK_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base in MODEL_CONFIGS:
        return base
    close = difflib.get_close_matches(base, MODEL_CONFIGS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(MODEL_CONFIGS)} "
                     "(the suffix '_captioning' is accepted).")


def get_config(name: str, **overrides) -> BEiT3Config:
    """The registered config for ``name`` with fields replaced by ``overrides`` (e.g. drop_path_rate)."""
    return replace(MODEL_CONFIGS[resolve_model_name(name)], **overrides)


def create_model(name: str, **overrides) -> "BEiT3ForCaptioning":
    return BEiT3ForCaptioning(get_config(name, **overrides))


# ----------------------------------------------------------------------------------------------------
# Building blocks


class Multiway(nn.Module):
    """A vision expert ``A`` and a language expert ``B`` of the same module (keys ``.A.*`` / ``.B.*``)."""

    def __init__(self, make: type[nn.Module] | callable, *args, **kwargs) -> None:
        super().__init__()
        self.A = make(*args, **kwargs)
        self.B = make(*args, **kwargs)


class FeedForward(nn.Module):
    """fc1 -> exact GELU (in fp32, as torchscale) -> sub-LN -> fc2."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layernorm_eps)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)
        return self.fc2(self.ffn_layernorm(h))


class MultiwayAttention(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = Multiway(nn.Linear, cfg.embed_dim, cfg.embed_dim)
        self.k_proj = Multiway(nn.Linear, cfg.embed_dim, cfg.embed_dim)
        self.v_proj = Multiway(nn.Linear, cfg.embed_dim, cfg.embed_dim)
        self.out_proj = Multiway(nn.Linear, cfg.embed_dim, cfg.embed_dim)
        self.inner_attn_ln = Multiway(nn.LayerNorm, cfg.embed_dim, eps=cfg.layernorm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, H, N, hd]
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def qkv(self, x: torch.Tensor, expert: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_proj, k_proj, v_proj = (getattr(p, expert) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self._heads(q_proj(x)), self._heads(k_proj(x)), self._heads(v_proj(x))

    def output(self, o: torch.Tensor, expert: str) -> torch.Tensor:  # [B, H, N, hd] -> [B, N, D]
        b, _, n, _ = o.shape
        o = o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return getattr(self.out_proj, expert)(getattr(self.inner_attn_ln, expert)(o))


def _drop_path_scale(batch: int, rate: float, like: torch.Tensor) -> torch.Tensor | None:
    """Per-sample stochastic-depth factor [B, 1, 1] (0 or 1/keep), shared by both streams of a sample."""
    if rate == 0.0:
        return None
    keep = 1.0 - rate
    return like.new_empty(batch, 1, 1).bernoulli_(keep).div_(keep)


def _apply(x: torch.Tensor | None, delta: torch.Tensor | None, scale: torch.Tensor | None):
    if x is None:
        return None
    return x + delta if scale is None else x + delta * scale


# ----------------------------------------------------------------------------------------------------
# One encoder layer (pre-LN, sub-LN, Multiway)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEiT3Config, drop_path: float) -> None:
        super().__init__()
        self.self_attn = MultiwayAttention(cfg)
        self.self_attn_layer_norm = Multiway(nn.LayerNorm, cfg.embed_dim, eps=cfg.layernorm_eps)
        self.ffn = Multiway(FeedForward, cfg)
        self.final_layer_norm = Multiway(nn.LayerNorm, cfg.embed_dim, eps=cfg.layernorm_eps)
        self.drop_path = drop_path

    def forward(self, x_img: torch.Tensor | None, x_txt: torch.Tensor | None, text_mask: torch.Tensor | None,
                image_output: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """x_img [B, Ni, D] or None; x_txt [B, T, D] or None.

        text_mask: bool [B, 1, T, Ni+T] (or [B, 1, T, T] without image), True = may attend.
        image_output=False (last layer of a captioning pass): only the image keys/values are computed,
        since nothing reads the image stream afterwards; returns (None, x_txt).
        """
        attn = self.self_attn
        batch = (x_img if x_img is not None else x_txt).shape[0]
        rate = self.drop_path if self.training else 0.0

        o_img = o_txt = None
        if x_img is not None:
            h_img = self.self_attn_layer_norm.A(x_img)
            if image_output:
                q_i, k_i, v_i = attn.qkv(h_img, "A")
                o_img = attn.output(F.scaled_dot_product_attention(q_i, k_i, v_i), "A")
            else:
                k_i, v_i = attn._heads(attn.k_proj.A(h_img)), attn._heads(attn.v_proj.A(h_img))
                x_img = None
        if x_txt is not None:
            q_t, k_t, v_t = attn.qkv(self.self_attn_layer_norm.B(x_txt), "B")
            if o_img is not None or not image_output:
                k_t, v_t = torch.cat([k_i, k_t], dim=2), torch.cat([v_i, v_t], dim=2)
            o_txt = attn.output(F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=text_mask), "B")
        # One per-sample draw shared by both streams, as in the official joint sequence.
        scale = _drop_path_scale(batch, rate, o_txt if o_txt is not None else o_img)
        x_img, x_txt = _apply(x_img, o_img, scale), _apply(x_txt, o_txt, scale)

        scale = _drop_path_scale(batch, rate, x_txt if x_txt is not None else x_img)
        f_img = self.ffn.A(self.final_layer_norm.A(x_img)) if x_img is not None else None
        f_txt = self.ffn.B(self.final_layer_norm.B(x_txt)) if x_txt is not None else None
        return _apply(x_img, f_img, scale), _apply(x_txt, f_txt, scale)

    def image_stream(self, x_img: torch.Tensor, need_output: bool = True
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Image stream only (inference): this layer's image K, V [B, H, Ni, hd] and, if needed, the next
        hidden state (the last layer's is never read when decoding text)."""
        attn = self.self_attn
        h = self.self_attn_layer_norm.A(x_img)
        k, v = attn._heads(attn.k_proj.A(h)), attn._heads(attn.v_proj.A(h))
        if not need_output:
            return None, k, v
        x_img = x_img + attn.output(F.scaled_dot_product_attention(attn._heads(attn.q_proj.A(h)), k, v), "A")
        return x_img + self.ffn.A(self.final_layer_norm.A(x_img)), k, v

    def decode(self, x_txt: torch.Tensor, cache: "DecodeCache", layer: int, start: int,
               mask: torch.Tensor) -> torch.Tensor:
        """Text stream for new tokens at text positions start..start+t-1 (inference).

        x_txt [R, t, D], R = B*K rows grouped by image (K beams each). One attention call per image covers
        its image keys and the text keys of all its beams; ``mask`` [K*t, keys] keeps each beam to its own.
        """
        attn = self.self_attn
        rows, t, d = x_txt.shape
        b, k, h = rows // cache.beams, cache.beams, attn.num_heads
        x = self.self_attn_layer_norm.B(x_txt)
        keys, values = cache.write(layer, start, attn.k_proj.B(x), attn.v_proj.B(x))  # [B, H, keys, hd]
        q = attn.q_proj.B(x).view(b, k, t, h, -1).permute(0, 3, 1, 2, 4).reshape(b, h, k * t, -1)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, H, K*t, hd]
        o = o.view(b, h, k, t, -1).permute(0, 2, 3, 1, 4).reshape(rows, t, d)
        x_txt = x_txt + attn.out_proj.B(attn.inner_attn_ln.B(o))
        return x_txt + self.ffn.B(self.final_layer_norm.B(x_txt))


# ----------------------------------------------------------------------------------------------------
# Backbone (keys under ``beit3.``)


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Kept for state-dict compatibility only: captioning never masks image patches.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, Ni, D]
        if image.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"image is {tuple(image.shape[-2:])} px but the model expects "
                             f"{self.img_size}x{self.img_size} (set --input_size to the model's size)")
        x = self.proj(image).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class PositionTables(nn.Module):
    """Table A (image) and B (text); token j of a stream uses row j + 2 (fairseq convention)."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.A = nn.Embedding(cfg.num_image_tokens + 2, cfg.embed_dim)
        self.B = nn.Embedding(cfg.max_text_positions, cfg.embed_dim)


class Encoder(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.embed_positions = PositionTables(cfg)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.layers = nn.ModuleList(EncoderLayer(cfg, r) for r in rates)
        self.layer_norm = Multiway(nn.LayerNorm, cfg.embed_dim, eps=cfg.layernorm_eps)
        self.grad_checkpointing = False

    def forward(self, x_img: torch.Tensor | None, x_txt: torch.Tensor | None, text_mask: torch.Tensor | None,
                text_output_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            image_output = not (text_output_only and i == last and x_txt is not None)
            if self.grad_checkpointing and self.training:
                x_img, x_txt = checkpoint(layer, x_img, x_txt, text_mask, image_output, use_reentrant=False)
            else:
                x_img, x_txt = layer(x_img, x_txt, text_mask, image_output)
        out_img = self.layer_norm.A(x_img) if x_img is not None else None
        out_txt = self.layer_norm.B(x_txt) if x_txt is not None else None
        return out_img, out_txt


class BEiT3(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, Ni, D]
        x = self.vision_embed(image)
        return x + self.encoder.embed_positions.A.weight[2: 2 + x.shape[1]]

    def embed_text(self, text_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                   start: int = 0) -> torch.Tensor:  # [B, T] -> [B, T, D]
        t = text_ids.shape[1]
        x = self.text_embed(text_ids) + self.encoder.embed_positions.B.weight[start + 2: start + 2 + t]
        if padding_mask is not None:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        return x

    def forward(self, image: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, causal_text: bool = False,
                text_output_only: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encoder features (after the final Multiway LayerNorm) of the image and/or text tokens.

        image [B, 3, S, S]; text_ids [B, T]; padding_mask [B, T] with 1 = padding.
        With both inputs the image never attends to text (the captioning prefix-LM layout); the text
        attends to all image tokens and, if causal_text, to earlier text tokens and itself only.
        text_output_only skips the image stream's last-layer work that only the image output needs.
        """
        if image is None and text_ids is None:
            raise ValueError("BEiT3.forward needs an image, text, or both")
        x_img = self.embed_image(image) if image is not None else None
        x_txt = self.embed_text(text_ids, padding_mask) if text_ids is not None else None
        text_mask = None
        if x_txt is not None:
            n_img = 0 if x_img is None else x_img.shape[1]
            text_mask = text_attention_mask(text_ids.shape[1], n_img, padding_mask, causal_text,
                                            text_ids.device)
        return self.encoder(x_img, x_txt, text_mask, text_output_only)


def text_attention_mask(t: int, n_img: int, padding_mask: torch.Tensor | None, causal: bool,
                        device: torch.device) -> torch.Tensor | None:
    """Bool [B|1, 1, T, Ni+T], True = may attend: every image key, then text keys (causal, unpadded)."""
    if not causal and padding_mask is None:
        return None
    allowed = torch.ones(t, t, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]  # [1, 1, T, T]
    if padding_mask is not None:
        allowed = allowed & ~padding_mask.bool()[:, None, None, :]
    if n_img:
        image_cols = torch.ones(*allowed.shape[:3], n_img, dtype=torch.bool, device=device)
        allowed = torch.cat([image_cols, allowed], dim=-1)
    return allowed


# ----------------------------------------------------------------------------------------------------
# Captioning model


ImageKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: image keys, values [B, H, Ni, hd]


class DecodeCache:
    """Per-layer keys and values of each image and of the text decoded so far by its K rows (beams).

    keys[l], values[l]: [B, H, Ni + max_len*K, hd]. Slots 0..Ni-1 hold the image's keys (written once);
    slot Ni + p*K + j holds text position p of beam j. The keys in use are then always the prefix
    [:Ni + length*K], so one attention call per image serves all of its beams without copying the image
    keys per beam.
    """

    def __init__(self, image_kv: ImageKV, beams: int, max_len: int) -> None:
        k0 = image_kv[0][0]
        self.images, heads, self.n_img, head_dim = k0.shape
        self.beams = beams
        shape = (self.images, heads, self.n_img + max_len * beams, head_dim)
        self.keys, self.values = [], []
        for k, v in image_kv:
            for store, x in ((self.keys, k), (self.values, v)):
                buf = x.new_empty(shape)
                buf[:, :, :self.n_img] = x
                store.append(buf)
        self.length = 0  # text positions held; decode_step appends, generation may shorten it

    def _text(self, buf: torch.Tensor, positions: int) -> torch.Tensor:  # -> [B, H, positions, K, hd] view
        b, h, _, hd = buf.shape
        return buf[:, :, self.n_img:self.n_img + positions * self.beams].view(b, h, positions, self.beams, hd)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new text keys/values k, v [R, t, H*hd] at positions start..start+t-1; return the keys and
        values in use [B, H, Ni + (start+t)*K, hd]."""
        t, end = k.shape[1], start + k.shape[1]
        for buf, x in ((self.keys[layer], k), (self.values[layer], v)):
            heads = buf.shape[1]
            self._text(buf, end)[:, :, start:] = x.view(self.images, self.beams, t, heads, -1).permute(0, 3, 2, 1, 4)
        n = self.n_img + end * self.beams
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def attention_mask(self, start: int, t: int, device: torch.device) -> torch.Tensor:
        """bool [K*t, Ni + (start+t)*K]: query (beam i, token q) sees every image key and the text keys of
        beam i at positions <= start+q."""
        query = torch.arange(self.beams * t, device=device)
        slot = torch.arange((start + t) * self.beams, device=device)
        same_beam = (query // t)[:, None] == (slot % self.beams)[None]
        causal = (slot // self.beams)[None] <= (start + query % t)[:, None]
        image = torch.ones(self.beams * t, self.n_img, dtype=torch.bool, device=device)
        return torch.cat([image, same_beam & causal], dim=1)

    def keep(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep these images (indices) and, for them, these text rows (indices into the current B*K rows,
        each taken from a row of the image it lands on): beam reordering and finished images."""
        n = self.length
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                _, h, _, hd = buf.shape
                text = self._text(buf, n).permute(0, 3, 1, 2, 4).reshape(-1, h, n, hd).index_select(0, rows)
                if images.numel() != self.images:
                    buf = store[i] = buf.index_select(0, images)
                self._text(buf, n).copy_(text.view(images.numel(), self.beams, h, n, hd).permute(0, 2, 3, 1, 4))
        self.images = images.numel()


class BEiT3ForCaptioning(nn.Module):
    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.config = config
        self.beit3 = BEiT3(config)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.apply(_init_weights)

    # --- training ---------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, text_ids: torch.Tensor, padding_mask: torch.Tensor,
                language_masked_pos: torch.Tensor) -> torch.Tensor:
        """Logits [N_masked, V] at the masked text positions, in (batch, position) order.

        image [B, 3, S, S]; text_ids [B, T] (with <mask> substitutions); padding_mask [B, T] (1 = pad);
        language_masked_pos [B, T] (1 = predict this position).
        """
        _, text = self.beit3(image, text_ids, padding_mask, causal_text=True, text_output_only=True)
        return self.mlm_head(text[language_masked_pos.bool()])

    def caption_logits(self, image: torch.Tensor, text_ids: torch.Tensor,
                       padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] at every text position, recomputed from scratch (no cache)."""
        _, text = self.beit3(image, text_ids, padding_mask, causal_text=True, text_output_only=True)
        return self.mlm_head(text)

    # --- cached decoding --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> ImageKV:
        """Run the image stream once; returns every layer's image keys and values [B, H, Ni, hd]."""
        x = self.beit3.embed_image(image)
        kv, layers = [], self.beit3.encoder.layers
        for i, layer in enumerate(layers):
            x, k, v = layer.image_stream(x, need_output=i < len(layers) - 1)
            kv.append((k, v))
        return kv

    def new_cache(self, image_kv: ImageKV, beams: int, max_len: int) -> DecodeCache:
        return DecodeCache(image_kv, beams, max_len)

    @torch.no_grad()
    def decode_step(self, text_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Logits [R, V] for the last of ``text_ids`` [R, t], appended at text position ``cache.length``.

        Rows are grouped by image: R = B * K for the B images and K beams of ``cache``.
        """
        start, t = cache.length, text_ids.shape[1]
        x = self.beit3.embed_text(text_ids, start=start)
        mask = cache.attention_mask(start, t, x.device)
        for i, layer in enumerate(self.beit3.encoder.layers):
            x = layer.decode(x, cache, i, start, mask)
        cache.length = start + t
        return self.mlm_head(self.beit3.encoder.layer_norm.B(x[:, -1]))

    # --- timm-style helpers -----------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.beit3.encoder.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"beit3.encoder.embed_positions.A.weight", "beit3.vision_embed.cls_token"}

    def get_num_layers(self) -> int:
        return self.config.depth


def layer_id_for_lr_decay(param_name: str, num_layers: int) -> int:
    """0 for embeddings, k+1 for ``layers.k.``, num_layers+1 for the rest (final LN, mlm_head)."""
    if "embed" in param_name:
        return 0
    if "layers." in param_name:
        return int(param_name.split("layers.")[1].split(".")[0]) + 1
    return num_layers + 1


def _init_weights(m: nn.Module) -> None:
    # Used only when training from scratch; official runs load pretrained weights over it.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
    elif isinstance(m, VisionEmbedding):
        nn.init.trunc_normal_(m.cls_token, std=0.02, a=-0.04, b=0.04)
