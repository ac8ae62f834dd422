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

    def image_kv_and_forward(self, x_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image stream only (inference): returns the next hidden state and this layer's image K, V."""
        attn = self.self_attn
        q, k, v = attn.qkv(self.self_attn_layer_norm.A(x_img), "A")
        x_img = x_img + attn.output(F.scaled_dot_product_attention(q, k, v), "A")
        x_img = x_img + self.ffn.A(self.final_layer_norm.A(x_img))
        return x_img, k, v

    def decode(self, x_txt: torch.Tensor, image_k: torch.Tensor, image_v: torch.Tensor,
               cache: "TextKVCache", layer: int, start: int) -> torch.Tensor:
        """Text stream for new tokens at text positions start..start+t-1 (inference).

        x_txt [R, t, D] with R = B*K rows grouped by image (K beams each); image_k/v [B, H, Ni, hd] are
        shared by the K rows of an image without being copied.
        """
        attn = self.self_attn
        rows, t, _ = x_txt.shape
        n_img = image_k.shape[0]
        beams = rows // n_img
        q, k_new, v_new = attn.qkv(self.self_attn_layer_norm.B(x_txt), "B")  # [R, H, t, hd]
        k_txt, v_txt = cache.write(layer, start, k_new, v_new)  # [R, H, start+t, hd]
        q = q * attn.head_dim**-0.5
        h = attn.num_heads

        def per_image(x: torch.Tensor) -> torch.Tensor:  # [R, H, t, *] -> [B, H, K*t, *]
            return x.view(n_img, beams, h, t, -1).transpose(1, 2).reshape(n_img, h, beams * t, x.shape[-1])

        def per_row(x: torch.Tensor) -> torch.Tensor:  # [B, H, K*t, *] -> [R, H, t, *]
            return x.view(n_img, h, beams, t, -1).transpose(1, 2).reshape(rows, h, t, x.shape[-1])

        s_img = per_row(per_image(q) @ image_k.transpose(-1, -2))  # [R, H, t, Ni]
        s_txt = q @ k_txt.transpose(-1, -2)  # [R, H, t, start+t]
        causal = torch.ones(t, start + t, dtype=torch.bool, device=q.device).tril(diagonal=start)
        s_txt = s_txt.masked_fill(~causal, float("-inf"))
        p = torch.softmax(torch.cat([s_img, s_txt], dim=-1).float(), dim=-1).type_as(q)
        n_i = image_k.shape[2]
        o = per_row(per_image(p[..., :n_i].contiguous()) @ image_v) + p[..., n_i:] @ v_txt
        x_txt = x_txt + attn.output(o, "B")
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


class TextKVCache:
    """Static per-layer keys/values of the text decoded so far: [R, H, max_len, hd] each."""

    def __init__(self, num_layers: int, rows: int, num_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, num_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # text positions held; decode_step appends, generation may shorten it

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep/reorder rows (beam reordering, dropping finished images)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


ImageKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H, Ni, hd]


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
        kv = []
        for layer in self.beit3.encoder.layers:
            x, k, v = layer.image_kv_and_forward(x)
            kv.append((k.contiguous(), v.contiguous()))  # read at every decoding step: pay the copy once
        return kv

    def new_cache(self, rows: int, max_len: int, like: torch.Tensor) -> TextKVCache:
        cfg = self.config
        return TextKVCache(cfg.depth, rows, cfg.num_heads, max_len, cfg.head_dim, like.dtype, like.device)

    @torch.no_grad()
    def decode_step(self, image_kv: ImageKV, text_ids: torch.Tensor, cache: TextKVCache) -> torch.Tensor:
        """Logits [R, V] for the last of ``text_ids`` [R, t], appended at text position ``cache.length``.

        Rows are grouped by image: R = B * K where B is the batch of ``image_kv``.
        """
        start = cache.length
        x = self.beit3.embed_text(text_ids, start=start)
        for i, layer in enumerate(self.beit3.encoder.layers):
            k, v = image_kv[i]
            x = layer.decode(x, k, v, cache, i, start)
        cache.length = start + text_ids.shape[1]
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
