"""The HTTP side of one search replica: request checks and the routes, over the query encoder and the index.

    GET  /             a self-contained search page (no external scripts, styles or fonts)
    POST /search       multipart `image` (file) or `gallery_row`, `text`, optional `k`
                       -> {"results": [{"rank", "id", "score", "thumbnail"}], "query": {"text"}, "took_ms"}
    GET  /thumb/{row}  a JPEG thumbnail of the gallery image at that index row
    GET  /healthz      {"status": "ok", "gallery": N, "bundle": "<hash prefix>"}

Input is checked at the edge: body size (Content-Length, then a cap while reading), field count, text length, k,
image type, pixel count. Every refusal is a 4xx `{"error": message}`; the client never names a file, only an index
row. Nothing here imports `ray`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.serving.config import FORM_SLACK_BYTES, ServeConfig
from cluster.serving.page import PAGE_HEADERS, render_page

if TYPE_CHECKING:
    import numpy as np
    from fastapi import FastAPI
    from PIL import Image

    from training.retrieval.hit import Hit

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The only PIL decoders an upload reaches (JPEG includes the MPO files many phones write)."""
EXAMPLES = 6
"""Gallery images the page offers as reference images."""
DRAIN_FACTOR = 4
"""A refused upload up to this many times the limit is read to its end, so that the client sees the 413."""
DRAIN_SECONDS = 10.0


class ApiError(Exception):
    """A request the server refuses: answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UploadTooLarge(Exception):
    """Raised from inside the body stream once it passes the limit, so parsing stops there."""


# --- request parsing ----------------------------------------------------------------------------------------------


def parse_text(raw: Any, max_chars: int) -> str:
    """The modification text, stripped; ApiError 400 when missing, blank or too long."""
    if not isinstance(raw, str) or not raw.strip():
        raise ApiError(400, "the form field `text` (the modification to the reference image) is required")
    text = raw.strip()
    if len(text) > max_chars:
        raise ApiError(400, f"`text` has {len(text)} characters; at most {max_chars} are accepted")
    return text


def parse_k(raw: Any, default: int, max_k: int) -> int:
    """Results wanted: `default` when absent; ApiError 400 unless an integer in 1..max_k."""
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str) or not re.fullmatch(r"\s*[0-9]{1,6}\s*", raw) or not 1 <= int(raw) <= max_k:
        raise ApiError(400, f"`k` must be an integer from 1 to {max_k}")
    return int(raw)


def parse_row(raw: Any, count: int, status: int = 400) -> int:
    """A gallery row number given by the client; ApiError `status` unless a digit string in 0..count-1."""
    if not isinstance(raw, str) or not re.fullmatch(r"[0-9]{1,12}", raw.strip()) or int(raw) >= count:
        raise ApiError(status, f"no gallery image at that row (the gallery has rows 0 to {count - 1})")
    return int(raw)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded reference image as RGB; ApiError 415 for non-images, 400 for bombs and broken files."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, "the uploaded image file is empty")
    Image.init()  # registers every plugin, so that `formats` can name WebP and TIFF (idempotent)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # the header only, and only these decoders
    except UnidentifiedImageError as error:
        raise ApiError(415, f"the upload is not an image this server reads ({', '.join(IMAGE_FORMATS)})") from error
    except Image.DecompressionBombError as error:
        raise ApiError(400, f"the image has too many pixels: {error}") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ApiError(400, f"the image header cannot be read: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(400, f"the image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise ApiError(400, f"the image cannot be decoded (truncated or corrupt?): {error}") from error


def _capped_receive(receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` that raises UploadTooLarge once more than `limit` body bytes have arrived."""
    received = 0

    async def capped() -> dict:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLarge
        return message

    return capped


async def _drain(receive: Callable[[], Awaitable[dict]], budget: int) -> None:
    """Read and drop the rest of a refused body, at most `budget` bytes and DRAIN_SECONDS.

    Clients that send the whole body before reading the answer (urllib, requests) would otherwise see the
    connection reset under them instead of the 413 and its message.
    """

    async def drain() -> None:
        remaining = budget
        while remaining > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            remaining -= len(message.get("body", b""))

    try:
        await asyncio.wait_for(drain(), DRAIN_SECONDS)
    except asyncio.TimeoutError:
        pass


async def read_form(request, config: ServeConfig):
    """The request's form fields, with the body capped at `config.max_body_bytes` (ApiError 413/415/400)."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    too_large = ApiError(413, f"the upload is larger than {config.max_upload_mb:g} MB (serve.max_upload_mb)")
    drain_budget = DRAIN_FACTOR * config.max_body_bytes
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(415, "send the query as multipart/form-data with the fields image, text and k")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "the Content-Length header is not a number")
        if int(declared) > config.max_body_bytes:
            if int(declared) <= drain_budget:
                await _drain(request.receive, drain_budget)
            raise too_large
    capped = Request(request.scope, receive=_capped_receive(request.receive, config.max_body_bytes))
    try:
        return await capped.form(max_files=1, max_fields=4, max_part_size=FORM_SLACK_BYTES)
    except UploadTooLarge as error:
        await _drain(request.receive, drain_budget)
        raise too_large from error
    except HTTPException as error:
        raise ApiError(400, f"malformed form: {error.detail}") from error


# --- the model and the gallery ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Query:
    """One composed query: a decoded reference image and its modification text."""

    image: Image.Image
    text: str


class SearchService:
    """The query encoder and the gallery index of one replica, behind the calls the HTTP layer needs."""

    def __init__(self, retriever, index, config: ServeConfig, base_dir: Path) -> None:
        self.retriever = retriever
        self.index = index
        self.config = config
        self.base_dir = base_dir
        self.thumbnail = lru_cache(maxsize=config.thumb_cache)(self._render_thumbnail)

    @classmethod
    def load(cls, bundle: str, index: str, config: ServeConfig, device: str, base_dir: str) -> SearchService:
        """Load the bundle (weights checked by the driver already) and the index, and check they match."""
        from training.retrieval.bundle import load_bundle
        from training.retrieval.gallery_index import GalleryIndex

        retriever = load_bundle(bundle, device=device, verify=False)
        gallery = GalleryIndex.open(index)
        gallery.check_bundle(retriever.bundle_hash)
        return cls(retriever, gallery, config, Path(base_dir))

    def __len__(self) -> int:
        return len(self.index)

    def gallery_path(self, row: int) -> Path:
        """The file of an index row; a relative path is relative to the directory the server started in."""
        path = Path(self.index.paths[row])
        return path if path.is_absolute() else self.base_dir / path

    def gallery_image(self, row: int) -> Image.Image:
        from training.retrieval.retriever import UnreadableImage, open_image

        try:
            return open_image(self.gallery_path(row))
        except UnreadableImage as error:
            logger.warning("gallery row %d: %s", row, error)
            raise ApiError(404, f"gallery image {row} cannot be read on the server") from error

    def _render_thumbnail(self, row: int) -> bytes:
        image = self.gallery_image(row)
        image.thumbnail((self.config.thumb_size, self.config.thumb_size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    def examples(self, count: int = EXAMPLES) -> list[int]:
        """Rows spread over the gallery, offered on the page as reference images."""
        step = max(1, len(self) // count)
        return list(range(0, len(self), step))[:count]

    def encode(self, queries: list[Query]) -> np.ndarray:
        """(Q, D) query embeddings, one forward pass."""
        return self.retriever.encode_queries([query.image for query in queries], [query.text for query in queries])

    def search(self, embedding: np.ndarray, k: int, exclude: list[str]) -> list[Hit]:
        return self.index.search(embedding[None, :], k, exclude=[exclude])[0]


# --- HTTP ---------------------------------------------------------------------------------------------------------


def create_app(service: SearchService, encode: Callable[[Query], Awaitable[np.ndarray]]) -> FastAPI:
    """The FastAPI app of one replica; `encode` turns one query into its embedding (batched by the caller).

    The routes are plain Starlette endpoints (`request -> response`): every field is parsed and checked here,
    so FastAPI's signature-driven parsing (and its 422 answers) has nothing to do.
    """
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response

    config = service.config
    app = FastAPI(title="ConText-CIR search", docs_url=None, redoc_url=None, openapi_url=None)
    page = render_page(config, service.examples(), len(service))

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def refused(request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message)

    async def http_error(request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return error(exc.status_code, str(exc.detail))

    async def crashed(request, exc: Exception) -> JSONResponse:  # a bug: Starlette re-raises it into the log
        return error(500, "the server failed to answer this request; the error is in its log")

    async def index_page(request) -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    async def healthz(request) -> JSONResponse:
        return JSONResponse({"status": "ok", "gallery": len(service), "bundle": service.retriever.bundle_hash[:12]})

    def thumb(request) -> Response:  # sync: Starlette runs it in a thread, off the event loop
        jpeg = service.thumbnail(parse_row(request.path_params["row"], len(service), status=404))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    async def search(request) -> JSONResponse:
        started = time.perf_counter()
        form = await read_form(request, config)
        try:
            text = parse_text(form.get("text"), config.max_text_chars)
            k = parse_k(form.get("k"), config.top_k, config.max_k)
            upload, row = form.get("image"), form.get("gallery_row")
            exclude: list[str] = []
            if upload is not None and not isinstance(upload, str):
                image = await asyncio.to_thread(decode_image, await upload.read(), config.max_pixels)
            elif row is not None:
                position = parse_row(row, len(service))
                image = await asyncio.to_thread(service.gallery_image, position)
                exclude = [service.index.ids[position]]  # the reference itself is no answer
            else:
                raise ApiError(400, "send the reference image as the file field `image` (or a `gallery_row`)")
        finally:
            await form.close()
        try:
            embedding = await encode(Query(image, text))
            hits = await asyncio.to_thread(service.search, embedding, k, exclude)
        except Exception:  # the last resort: logged here, a message without internals for the client
            logger.exception("search failed for text %r", text[:80])
            return error(500, "the server failed to answer this query; the error is in its log")
        results = [
            {
                "rank": hit.rank,
                "id": hit.id,
                "score": round(hit.score, 5),
                "thumbnail": f"/thumb/{service.index.position[hit.id]}",
            }
            for hit in hits
        ]
        took_ms = round((time.perf_counter() - started) * 1000, 1)
        return JSONResponse({"results": results, "query": {"text": text, "k": k}, "took_ms": took_ms})

    app.add_exception_handler(ApiError, refused)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crashed)
    app.add_route("/", index_page, methods=["GET"])
    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/thumb/{row}", thumb, methods=["GET"])
    app.add_route("/search", search, methods=["POST"])
    return app
