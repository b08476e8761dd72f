"""Safe image input: format allow-list, pixel limit against decompression bombs, EXIF orientation,
RGB images and one-channel masks. Every error names the file (or HTTP field) and the problem."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from raybooth.platform.errors import ImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 4096 * 4096

Source = Union[str, Path, bytes, BinaryIO]


def max_pixels() -> int:
    return int(os.environ.get("RAYBOOTH_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS))


def _open(source: Source, name: str, limit: int | None) -> Image.Image:
    limit = limit or max_pixels()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: file not found ({path})", field=name)
        fp: BinaryIO = open(path, "rb")
    elif isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: the upload is empty", field=name)
        fp = io.BytesIO(source)
    else:
        fp = source
    try:
        try:
            img = Image.open(fp, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(
                f"{name}: not a supported image (expected one of {', '.join(ALLOWED_FORMATS)})",
                field=name,
            ) from None
        # Only the header has been read: check the size before decoding any pixels.
        w, h = img.size
        if w * h > limit:
            raise ImageError(
                f"{name}: {w}x{h} is {w * h} pixels, over the limit of {limit}; resize it first",
                field=name,
            )
        if w == 0 or h == 0:
            raise ImageError(f"{name}: the image has no pixels ({w}x{h})", field=name)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: the file is corrupt or truncated ({exc})", field=name) from None
        return ImageOps.exif_transpose(img)
    finally:
        if isinstance(source, (str, Path)):
            fp.close()


def open_image(source: Source, name: str = "image", limit: int | None = None) -> Image.Image:
    """Decode an RGB image (alpha composited on white, palette and CMYK converted)."""
    img = _open(source, name, limit)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_mask(source: Source, name: str = "mask", limit: int | None = None) -> Image.Image:
    """Decode a mask as one channel: white (255) = repaint, black (0) = keep.

    A mask with transparency uses its alpha channel (opaque = repaint), as painting tools save them.
    """
    img = _open(source, name, limit)
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return img.convert("L")


def check_same_size(image: Image.Image, mask: Image.Image, image_name: str = "image", mask_name: str = "mask") -> None:
    if image.size != mask.size:
        raise ImageError(
            f"{mask_name} is {mask.size[0]}x{mask.size[1]} but {image_name} is "
            f"{image.size[0]}x{image.size[1]}; the mask must have the image's size",
            field=mask_name,
        )


def list_images(directory: str | Path, name: str) -> list[Path]:
    """The image files of a folder, sorted, with a clear error when there are none."""
    path = Path(directory)
    if not path.is_dir():
        raise ImageError(f"{name}: folder {path} does not exist", field=name)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(
            f"{name}: no images in {path} (looked for {', '.join(IMAGE_SUFFIXES)})", field=name
        )
    return files


def png_bytes(image: Image.Image, *, fast: bool = False) -> bytes:
    """The one PNG encoder. PIL writes no timestamp, so equal pixels give equal bytes (class-image
    checksums rely on it). `fast` (zlib level 1) is for the request path, where latency matters
    more than a few kilobytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1 if fast else 6)
    return buf.getvalue()
