"""Caption any image files: robust loading, the official eval transform, batched generation, decoding.

    captioner = Captioner.from_checkpoint("model.pth", "beit3.spm")
    captioner.caption(["cat.jpg", PIL.Image.open("dog.png")])          # -> ["a cat on a sofa", ...]
    captioner.caption_files(paths)                                     # -> [CaptionResult(...), ...]

``caption`` raises on an unreadable image (naming it); ``caption_files`` never does: each result has a
caption or an error, so one corrupt file does not cost the others their captions.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from transformers import XLMRobertaTokenizer

from .data.transforms import ImageLoadError, build_transform, to_rgb
from .generate import generate
from .model import EOS_ID, BEiT3ForCaptioning
from .tokenizer import decode, load_tokenizer, special_ids

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Larger images are refused with a clear error (1 GiB of RGBA pixels); PIL's own limit (~179 MP) is lifted
# for our reads, since a photo of 200 MP is not a decompression bomb.
MAX_IMAGE_PIXELS = 256_000_000
# JPEGs above this are decoded at a reduced scale (DCT scaling, still >= 4x the model's input size); below
# it they are decoded in full so the pixels match the official pipeline exactly.
DRAFT_ABOVE_PIXELS = 40_000_000

_pil_limit_lock = threading.Lock()

ImageInput = str | os.PathLike | Image.Image


@dataclass
class CaptionResult:
    source: str  # the path, or "<image i>" for an in-memory image
    caption: str | None = None
    score: float | None = None  # the decoder's length-normalised log-probability
    error: str | None = None


def load_image(source: ImageInput, *, input_size: int = 224, max_pixels: int = MAX_IMAGE_PIXELS,
               draft_above: int = DRAFT_ABOVE_PIXELS) -> Image.Image:
    """Open an image (path or PIL image) as 8-bit RGB with its EXIF orientation applied.

    Any mode works (greyscale, palette, RGBA/LA over white, 16-bit, CMYK). JPEGs of more than
    ``draft_above`` pixels are decoded at a reduced scale, at least 4 x ``input_size`` a side. Raises
    ImageLoadError naming the file for missing, corrupt or oversized (> ``max_pixels``) files.
    """
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    shown = os.fspath(source)
    try:
        with _pil_limit_lock:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(source)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(f"{shown}: {width}x{height} is {width * height / 1e6:.0f} megapixels, "
                                     f"above the limit of {max_pixels / 1e6:.0f}")
            if image.format == "JPEG" and width * height > draft_above:
                image.draft(None, (4 * input_size, 4 * input_size))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(f"{shown}: no such file") from e
    except IsADirectoryError as e:
        raise ImageLoadError(f"{shown}: is a folder, not an image") from e
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL reports unreadable files as OSError (UnidentifiedImageError, "image file is truncated"),
        # ValueError, SyntaxError or EOFError depending on the codec.
        raise ImageLoadError(f"{shown}: cannot read image ({type(e).__name__}: {e})") from e


def find_images(specs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[CaptionResult]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns, in the given order.

    Returns the image paths (duplicates removed) and an error result for every spec that matched nothing.
    A file named explicitly is kept whatever its extension (reading it decides).
    """
    found: dict[Path, None] = {}
    problems = []
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not matches:
                problems.append(CaptionResult(text, error=f"{text}: no image files in this folder "
                                                          f"(extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"))
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True)
                             if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS)
            if not matches:
                problems.append(CaptionResult(text, error=f"{text}: no image files match this pattern"))
        else:
            matches = []
            problems.append(CaptionResult(text, error=f"{text}: no such file or folder"))
        found.update(dict.fromkeys(matches))
    return list(found), problems


class Captioner:
    """A captioning model with its tokenizer, image pipeline and decoding options.

    Decoding options (see ``beit3cap.generate.generate``): num_beams, max_len, length_penalty, strategy,
    top_k, top_p, temperature, amp_dtype; ``forbid_special`` keeps BOS/PAD/UNK/MASK and the dead vocabulary
    rows out of captions (the official decoder does not); ``seed`` seeds sampling per call.
    """

    def __init__(self, model: BEiT3ForCaptioning, tokenizer: XLMRobertaTokenizer, input_size: int | None = None,
                 *, device: str | torch.device = "cpu", num_beams: int = 3, max_len: int = 32,
                 length_penalty: float = 0.6, strategy: str = "beam", top_k: int = 0, top_p: float = 1.0,
                 temperature: float = 1.0, forbid_special: bool = False, amp_dtype: torch.dtype | None = None,
                 seed: int = 0) -> None:
        cfg = model.config
        if input_size is not None and input_size != cfg.img_size:
            raise ValueError(f"input_size {input_size} does not match the model's {cfg.img_size} px input "
                             "(BEiT-3 position tables are sized for one resolution)")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the sentencepiece model has {tokenizer.vocab_size} ids but the model only "
                             f"{cfg.vocab_size} vocabulary rows: wrong --sentencepiece_model for this checkpoint?")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.input_size = cfg.img_size
        self.transform = build_transform(is_train=False, input_size=cfg.img_size)
        self.options: dict[str, Any] = dict(num_beams=num_beams, max_len=max_len, length_penalty=length_penalty,
                                            strategy=strategy, top_k=top_k, top_p=top_p, temperature=temperature,
                                            forbid_special=forbid_special, amp_dtype=amp_dtype, seed=seed)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, sentencepiece_model: str | os.PathLike,
                        model_name: str | None = None, device: str | torch.device = "cpu",
                        **options: Any) -> "Captioner":
        """Load a checkpoint in any official layout (``{"model": ...}``, ``{"module": ...}``, a bare state
        dict, a DeepSpeed folder, safetensors) and the sentencepiece model it was trained with."""
        from .checkpoint import model_from_checkpoint  # torch.load machinery only when needed

        model, _ = model_from_checkpoint(checkpoint, model_name)
        return cls(model, load_tokenizer(sentencepiece_model), device=device, **options)

    # --- public API -------------------------------------------------------------------------------
    def caption(self, images: Sequence[ImageInput], batch_size: int = 8, **options: Any) -> list[str]:
        """One caption per image; raises ImageLoadError on the first unreadable image."""
        results = self.caption_files(images, batch_size=batch_size, **options)
        for r in results:
            if r.error is not None:
                raise ImageLoadError(r.error)
        return [r.caption for r in results]

    def caption_files(self, images: Sequence[ImageInput], batch_size: int = 8, progress: bool = False,
                      **options: Any) -> list[CaptionResult]:
        """One result per input, in order: a caption and score, or an error message naming the file."""
        return list(self.iter_captions(images, batch_size=batch_size, progress=progress, **options))

    def iter_captions(self, images: Sequence[ImageInput], batch_size: int = 8, progress: bool = False,
                      **options: Any) -> Iterator[CaptionResult]:
        """``caption_files`` as a stream: results come batch by batch, in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"unknown decoding options {sorted(unknown)}; known: {sorted(self.options)}")
        opts = {**self.options, **options}
        generator = torch.Generator(self.device).manual_seed(opts.pop("seed"))
        kwargs = self._generate_kwargs(opts)
        from tqdm import tqdm

        with tqdm(total=len(images), unit="img", disable=not progress, dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(max_workers=2) as pool:
            for start, loaded in self._prefetched(pool, images, batch_size):
                results = [CaptionResult(f"<image {start + i}>" if isinstance(x, Image.Image) else os.fspath(x))
                           for i, x in enumerate(images[start:start + batch_size])]
                ok = [i for i, t in enumerate(loaded) if isinstance(t, torch.Tensor)]
                for i, t in enumerate(loaded):
                    if not isinstance(t, torch.Tensor):
                        results[i].error = t
                if ok:
                    batch = torch.stack([loaded[i] for i in ok]).to(self.device)
                    ids, scores = generate(self.model, batch, generator=generator, return_scores=True, **kwargs)
                    for i, words, score in zip(ok, ids, scores):
                        results[i].caption, results[i].score = decode(self.tokenizer, words), score
                bar.update(len(loaded))
                yield from results

    # --- internals --------------------------------------------------------------------------------
    def _generate_kwargs(self, opts: dict[str, Any]) -> dict[str, Any]:
        forbid: set[int] = set()
        if opts.pop("forbid_special"):
            forbid = (special_ids(self.tokenizer) - {EOS_ID}) | set(
                range(self.tokenizer.vocab_size, self.model.config.vocab_size))
        return dict(opts, forbid_ids=forbid, mask_token_id=self.tokenizer.mask_token_id)

    def _load(self, source: ImageInput) -> torch.Tensor | str:
        """The model input for one image, or the error message."""
        try:
            return self.transform(load_image(source, input_size=self.input_size))
        except ImageLoadError as e:
            return str(e)

    def _prefetched(self, pool: ThreadPoolExecutor, images: Sequence[ImageInput],
                    batch_size: int) -> Iterator[tuple[int, list[torch.Tensor | str]]]:
        """Batches of loaded images; the next batch is decoded in threads while the current one is captioned."""
        starts = range(0, len(images), batch_size)
        pending: list[tuple[int, list[Future]]] = []
        for start in starts:
            pending.append((start, [pool.submit(self._load, x) for x in images[start:start + batch_size]]))
            if len(pending) == 2:
                first, futures = pending.pop(0)
                yield first, [f.result() for f in futures]
        for first, futures in pending:
            yield first, [f.result() for f in futures]
