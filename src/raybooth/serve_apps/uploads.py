"""Reading request bodies within a size limit: JSON, multipart forms, base64 images.

The body is read by counting bytes as they arrive, so an oversized upload is refused (413) after
at most `max_body_bytes`, whatever its Content-Length claims. Image bytes, whichever way they
came (a multipart file, base64, a data: URL), are decoded by raybooth.platform.images, the one
decoding path: any problem is an ImageError naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, AsyncIterator

from fastapi import Request
from PIL import Image

from raybooth.platform.errors import ImageError
from raybooth.platform.images import check_same_size, open_image_and_alpha_mask, open_mask
from raybooth.serve_apps.http_errors import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large",
                    f"the request body is over the limit of {limit} bytes; send smaller images")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def parse_json(body: bytes) -> Any:
    if not body:
        raise ApiError(400, "invalid_request", "the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None


async def parse_multipart(request: Request, body: bytes, max_field_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """Form fields (strings) and files (bytes) of a multipart/form-data body."""
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.datastructures import UploadFile

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, once(), max_files=4, max_fields=32, max_part_size=max_field_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"the multipart body cannot be read: {exc.message}") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if key in fields or key in files:
            what = "one image per edit" if key == "image[]" else "each field once"
            raise ApiError(400, "invalid_request", f"{key} is given twice; send {what}",
                           field=key.removesuffix("[]"))
        if isinstance(value, UploadFile):
            files[key] = await value.read()
            await value.close()
        else:
            fields[key] = value
    return fields, files


def decode_base64_image(text: str, field: str) -> bytes:
    """Base64 (standard or URL-safe, with or without a `data:image/...;base64,` prefix)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "invalid_image", f"{field}: a data: URL must be base64-encoded", field=field)
    cleaned = "".join(text.split())
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_image", f"{field}: not valid base64", field=field) from None


def decode_pair(image_bytes: bytes, mask_bytes: bytes | None, max_pixels: int) -> tuple[Image.Image, Image.Image]:
    """Decode image and mask (format allow-list, pixel limit before decoding, same size).

    Without a mask, the image's transparent pixels are the area to repaint (OpenAI's convention);
    an image with none is a 400 naming `mask`."""
    image, transparent = open_image_and_alpha_mask(image_bytes, name="image", limit=max_pixels)
    if mask_bytes is None:
        if transparent is None:
            raise ImageError(
                "mask is required: send a mask (white or transparent = repaint), or an image whose "
                "transparent pixels mark the area to repaint", field="mask")
        return image, transparent
    mask = open_mask(mask_bytes, name="mask", limit=max_pixels)
    check_same_size(image, mask, "image", "mask")
    return image, mask


# Multipart file parts an edit accepts: OpenAI clients send `image`, or `image[]` for a list.
IMAGE_PARTS = ("image", "image[]")
MASK_PART = "mask"


def edit_files(files: dict[str, bytes]) -> tuple[bytes, bytes | None]:
    """(image bytes, mask bytes or None) from an edit's multipart file parts."""
    unknown = sorted(set(files) - {*IMAGE_PARTS, MASK_PART})
    if unknown:
        raise ApiError(400, "invalid_request",
                       f"unknown file part {unknown[0]!r}; an edit takes `image` (or `image[]`) and `mask`",
                       field=unknown[0])
    given = [name for name in IMAGE_PARTS if name in files]
    if not given:
        raise ApiError(400, "invalid_request", "image is required (a file part)", field="image")
    if len(given) > 1:
        raise ApiError(400, "invalid_request", "send one image per edit (as `image` or as `image[]`)",
                       field="image")
    return files[given[0]], files.get(MASK_PART)
