"""What a ``POST /caption`` request holds: decoding settings, uploaded files (multipart or base64 JSON),
and the checks they pass before reaching the model.

Count and size problems fail the whole request (``ApiError`` 400 / 413), bad settings give 422; whether
each upload is an image is decided per file (``UnreadableImage``), so one bad file does not cost the others
their captions.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from fastapi import Request
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from .captioner import DRAFT_ABOVE_PIXELS
from .data.transforms import to_rgb

MAX_BEAMS = 16
MAX_LEN_CAP = 256  # longer budgets only make a request slow: captions are far shorter
DEFAULT_MAX_PIXELS = 40_000_000  # below PIL's decompression-bomb warning (89 MP)
FILE_FIELD = "files"
JSON_OVERHEAD = 1 << 20  # room for field names, settings and base64 padding in a request body


class CaptionSettings(BaseModel):
    """Decoding settings of one request (all optional). Beam search unless ``sample`` is true."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_beams: int = Field(3, ge=1, le=MAX_BEAMS, description="beams of the official beam search")
    max_len: int = Field(32, ge=3, description="text length budget: captions get at most max_len - 3 words")
    length_penalty: float = Field(0.6, ge=0.0, le=5.0, allow_inf_nan=False,
                                  description="beam scores are log-prob sums / length ** length_penalty")
    sample: bool = Field(False, description="draw words at random (nucleus sampling) instead of beam search")
    top_p: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False,
                         description="sampling: smallest word set whose probability reaches top_p")
    temperature: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False, description="sampling temperature")
    seed: int | None = Field(None, ge=0, lt=2**63,
                             description="sampling: seed of the model call (default: a fresh random seed); "
                                         "requests batched together share one random stream")


class CaptionJSONRequest(CaptionSettings):
    """The JSON form of ``POST /caption``: base64 images (plain or ``data:`` URLs) plus settings."""

    images: list[str] = Field(description="base64-encoded image files, or data: URLs")
    names: list[str] | None = Field(None, description="optional names echoed in the results")


class ApiError(Exception):
    """A request the service refuses; becomes ``{"error": message}`` with this HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_images: int
    max_pixels: int
    max_len: int  # largest max_len the model's text positions allow

    @property
    def max_body_bytes(self) -> int:
        return self.max_images * (self.max_upload_bytes * 4 // 3 + 4) + JSON_OVERHEAD


# ----------------------------------------------------------------------------------------------------
# Reading uploads


class UnreadableImage(ValueError):
    """An upload that is not an image, is corrupt, or has too many pixels."""


def read_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, input_size: int | None = None) -> Image.Image:
    """Decode an uploaded file as RGB with its EXIF orientation applied, as ``beit3cap caption`` reads files
    (large JPEGs decoded at a reduced scale). With ``input_size``, also do the evaluation transform's square
    bicubic resize here: the transform then resizes S x S to S x S, which PIL returns unchanged, so the
    pixels are the same while only small images wait in memory for their batch.

    Raises UnreadableImage saying what is wrong."""
    try:
        with Image.open(BytesIO(data)) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise UnreadableImage(f"{image.width}x{image.height} is more than the {max_pixels:,}-pixel limit")
            if input_size and image.format == "JPEG" and pixels > DRAFT_ABOVE_PIXELS:
                image.draft(None, (4 * input_size, 4 * input_size))
            image.load()
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except UnreadableImage:
        raise
    except UnidentifiedImageError as exc:
        raise UnreadableImage("not an image (no image format Pillow knows)") from exc
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"too many pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # PIL reports corrupt files as OSError ("image file is truncated"), ValueError, SyntaxError or
        # EOFError depending on the codec.
        raise UnreadableImage(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    return rgb.resize((input_size, input_size), Image.Resampling.BICUBIC) if input_size else rgb


def _check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise ApiError(400, f"no images: send them as multipart '{FILE_FIELD}' parts or as JSON "
                            "{\"images\": [\"<base64>\", ...]}")
    if n > limits.max_images:
        raise ApiError(400, f"too many images: {n} (this server takes at most {limits.max_images} per request)")


def _check_size(name: str, size: int, limits: Limits) -> None:
    if size > limits.max_upload_bytes:
        raise ApiError(413, f"{name} is {size / 2**20:.2f} MB; the limit is "
                            f"{limits.max_upload_bytes / 2**20:.2f} MB per image")


async def read_multipart(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    # One file more than allowed, so that _check_count (not the parser) words the error.
    async with request.form(max_files=limits.max_images + 1, max_fields=64) as form:
        uploads: list[tuple[str, UploadFile]] = []
        settings: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != FILE_FIELD:
                    raise ApiError(400, f"unexpected file field {key!r}: send images as '{FILE_FIELD}' parts")
                uploads.append((value.filename or f"image-{len(uploads)}", value))
            elif key in settings:
                raise ApiError(422, f"bad settings: {key!r} given more than once")
            else:
                settings[key] = value
        _check_count(len(uploads), limits)
        out = []
        for name, upload in uploads:
            if upload.size is not None:
                _check_size(name, upload.size, limits)
            data = await upload.read()
            _check_size(name, len(data), limits)
            out.append((name, data))
    return out, settings


def _b64decode(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{where} is a data: URL without ';base64,' data")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{where} is not valid base64 ({exc})") from exc


async def read_json(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object: {\"images\": [\"<base64>\", ...], ...settings}")
    images, names = body.pop("images", None), body.pop("names", None)
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ApiError(400, "'images' must be a list of base64 strings")
    if names is not None and (not isinstance(names, list) or len(names) != len(images)
                              or not all(isinstance(n, str) for n in names)):
        raise ApiError(400, "'names', when given, must be a list of strings as long as 'images'")
    _check_count(len(images), limits)
    out = []
    for i, text in enumerate(images):
        name = names[i] if names else f"image-{i}"
        # Cheap bound before decoding: base64 needs 4 characters per 3 bytes.
        _check_size(name, len(text) * 3 // 4 - 2 if len(text) > 2 else 0, limits)
        data = _b64decode(text, f"images[{i}] ({name})")
        _check_size(name, len(data), limits)
        out.append((name, data))
    return out, body


def describe_settings_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per bad setting: ``name: what is wrong (got value)``."""
    problems = []
    for err in exc.errors():
        field = prefix + (".".join(str(p) for p in err["loc"]) or "settings")
        if err["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown setting")
        else:
            problems.append(f"{field}: {err['msg']} (got {err['input']!r})")
    return "; ".join(problems)


def parse_settings(raw: dict[str, Any], limits: Limits, defaults: CaptionSettings) -> CaptionSettings:
    """Validate decoding settings (form strings or JSON values) over the server's defaults; ApiError 422
    says what is wrong."""
    try:
        settings = CaptionSettings.model_validate({**defaults.model_dump(), **raw})
    except ValidationError as exc:
        raise ApiError(422, "bad settings: " + describe_settings_error(exc)) from exc
    if settings.max_len > limits.max_len:
        raise ApiError(422, f"bad settings: max_len: must be at most {limits.max_len} on this server "
                            f"(got {settings.max_len})")
    return settings


def decode_all(uploads: list[tuple[str, bytes]], max_pixels: int,
               input_size: int | None = None) -> list[Image.Image | UnreadableImage]:
    """Each upload as an RGB image (see ``read_image``), or the reason it is not one."""
    out: list[Image.Image | UnreadableImage] = []
    for _, data in uploads:
        try:
            out.append(read_image(data, max_pixels, input_size))
        except UnreadableImage as exc:
            out.append(exc)
    return out
