"""The captioning web service: one HTML page, ``POST /caption``, ``GET /health`` (FastAPI).

``create_app(captioner, ...)`` wraps an already loaded ``Captioner``. Uploads are checked before they reach
the model: too many images or a file over the size limit fails the whole request (400 / 413); a file that
is not a readable image gets its own ``{"name", "error"}`` entry, and when no upload is an image the
request fails with 415. Bad decoding settings give 422. Every error body is ``{"error": "..."}``.
Images that pass are captioned through a ``CaptionBatcher``, so concurrent requests share model calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .captioner import Captioner
from .model import MODEL_CONFIGS, BEiT3Config
from .serve_batching import BatcherClosedError, CaptionBatcher
from .serve_page import PAGE_HTML
from .serve_requests import (DEFAULT_MAX_PIXELS, FILE_FIELD, MAX_BEAMS, MAX_LEN_CAP, ApiError, CaptionJSONRequest,
                             CaptionSettings, Limits, decode_all, parse_settings, read_json, read_multipart)

log = logging.getLogger("beit3cap.serve")


class CaptionResult(BaseModel):
    name: str
    caption: str | None = None
    error: str | None = None


class CaptionResponse(BaseModel):
    results: list[CaptionResult]
    settings: CaptionSettings
    elapsed_s: float


class HealthResponse(BaseModel):
    ready: bool
    model: str
    device: str
    image_size: int
    max_images: int
    max_upload_mb: float
    max_len_limit: int
    defaults: CaptionSettings
    stats: dict[str, int]


class ErrorResponse(BaseModel):
    error: str


# ----------------------------------------------------------------------------------------------------
# The captioner side


def _run_captioner(captioner: Captioner) -> Callable[[list[Image.Image], CaptionSettings], list[str]]:
    def run(images: list[Image.Image], settings: CaptionSettings) -> list[str]:
        return captioner.caption(images, batch_size=len(images), **decode_kwargs(settings))
    return run


def decode_kwargs(settings: CaptionSettings) -> dict[str, Any]:
    """The ``Captioner.caption`` decoding options for these settings."""
    if settings.sample:
        seed = secrets.randbits(63) if settings.seed is None else settings.seed
        return {"strategy": "sample", "max_len": settings.max_len, "top_p": settings.top_p,
                "temperature": settings.temperature, "length_penalty": settings.length_penalty, "seed": seed}
    return {"strategy": "beam", "num_beams": settings.num_beams, "max_len": settings.max_len,
            "length_penalty": settings.length_penalty}


def default_settings(captioner: Captioner, max_len_limit: int) -> CaptionSettings:
    """Request defaults taken from the captioner's own decoding options (those of ``beit3cap caption``)."""
    opts = captioner.options
    return CaptionSettings(num_beams=min(opts["num_beams"], MAX_BEAMS), max_len=min(opts["max_len"], max_len_limit),
                           length_penalty=opts["length_penalty"], sample=opts["strategy"] == "sample",
                           top_p=opts["top_p"], temperature=opts["temperature"])


def model_label(config: BEiT3Config) -> str:
    """The registered name of a model configuration, or a short description of it."""
    shape = ("embed_dim", "depth", "num_heads", "ffn_dim", "img_size", "patch_size", "in_chans")
    for name, known in MODEL_CONFIGS.items():
        if all(getattr(known, f) == getattr(config, f) for f in shape):
            return name
    return (f"beit3 ({config.embed_dim}-dim, {config.depth} layers, {config.img_size} px, "
            f"patch {config.patch_size})")


# ----------------------------------------------------------------------------------------------------
# The app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) before they are spooled to memory or disk."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        too_big = (f"the request body is over the {self.limit / 2**20:.1f} MB this server accepts "
                   "(see --max_upload_mb and --max_images)")
        if declared.isdigit() and int(declared) > self.limit:
            return await _error(413, too_big)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, too_big)
            return message

        await self.app(scope, limited, send)


def create_app(captioner: Captioner, *, max_upload_mb: float = 10.0, max_images: int = 16, max_batch: int = 16,
               batch_wait_ms: float = 15.0, max_pixels: int = DEFAULT_MAX_PIXELS,
               defaults: CaptionSettings | None = None, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving a loaded ``Captioner``.

    ``max_upload_mb`` bounds each image file, ``max_images`` each request; ``max_batch`` images at most go
    into one model call, and the queue waits up to ``batch_wait_ms`` for more requests to join a batch.
    ``defaults`` fill the settings a request leaves out (default: the captioner's options).
    """
    if max_upload_mb <= 0 or max_images < 1:
        raise ValueError(f"need max_upload_mb > 0 and max_images >= 1 (got {max_upload_mb}, {max_images})")
    model = captioner.model
    config = model.config
    limits = Limits(int(max_upload_mb * 2**20), max_images, max_pixels,
                    min(config.max_text_positions - 1, MAX_LEN_CAP))
    defaults = defaults or default_settings(captioner, limits.max_len)
    if defaults.max_len > limits.max_len:
        raise ValueError(f"default max_len {defaults.max_len} is above this server's limit of {limits.max_len}")
    batcher = CaptionBatcher(_run_captioner(captioner), max_batch=max_batch, max_wait_s=batch_wait_ms / 1000)
    name = model_name or model_label(config)
    device = str(captioner.device)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        log.info("model %s on %s ready", name, device)
        yield
        await batcher.stop()

    app = FastAPI(title="beit3cap", version="0.1.0", lifespan=lifespan,
                  description="Caption images with a BEiT-3 captioning model. The page at / is a front end "
                              "to POST /caption.")
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)

    @app.get("/health", response_model=HealthResponse, summary="Model, device, limits, readiness, counters")
    async def health() -> dict[str, Any]:
        return {"ready": batcher.running, "model": name, "device": device, "image_size": config.img_size,
                "max_images": limits.max_images, "max_upload_mb": max_upload_mb, "max_len_limit": limits.max_len,
                "defaults": defaults, "stats": batcher.stats.as_dict()}

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text} for code, text in (
            (400, "no images, too many images, bad base64 or a malformed body"),
            (413, "an image file (or the whole body) over the size limit"),
            (415, "no upload is a readable image, or an unsupported content type"),
            (422, "bad decoding settings"), (503, "the server is starting or stopping"))}
    body_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [FILE_FIELD],
            "properties": {FILE_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
                           **CaptionSettings.model_json_schema()["properties"]}}},
        "application/json": {"schema": CaptionJSONRequest.model_json_schema()}}}}

    @app.post("/caption", response_model=CaptionResponse, response_model_exclude_none=True, responses=errors,
              openapi_extra=body_doc,
              summary="Caption images sent as multipart 'files' or as JSON base64 'images'")
    async def caption(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            uploads, raw = await read_multipart(request, limits)
        elif ctype == "application/json":
            uploads, raw = await read_json(request, limits)
        else:
            raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}: send multipart/form-data "
                                "with 'files' parts or application/json with 'images'")
        settings = parse_settings(raw, limits, defaults)
        decoded = await asyncio.to_thread(decode_all, uploads, limits.max_pixels, captioner.input_size)
        images = [d for d in decoded if isinstance(d, Image.Image)]
        if not images:
            raise ApiError(415, "no upload is a readable image: "
                                + "; ".join(f"{n}: {d}" for (n, _), d in zip(uploads, decoded)))
        try:
            captions = iter(await batcher.submit(images, settings))
        except BatcherClosedError as exc:
            raise ApiError(503, str(exc)) from exc
        except Exception as exc:
            log.exception("captioning failed")
            raise ApiError(500, f"captioning failed: {type(exc).__name__}: {exc}") from exc
        results = [{"name": n, "caption": next(captions)} if isinstance(d, Image.Image) else
                   {"name": n, "error": str(d)} for (n, _), d in zip(uploads, decoded)]
        return {"results": results, "settings": settings, "elapsed_s": round(time.perf_counter() - started, 4)}

    return app
