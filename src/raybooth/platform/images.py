"""The one decoding path for every image that enters raybooth.

CLI files (`raybooth inpaint --image/--mask`), HTTP uploads (multipart files, JSON base64 and
data: URLs), training instance images, class images read back and evaluation subjects all go
through `open_image` (RGB pictures), `open_mask` (one-channel masks) or
`open_image_and_alpha_mask` (a picture whose transparent pixels are the mask). Nothing else in
raybooth calls `PIL.Image.open` on bytes it did not make itself.

What it guarantees, whatever the bytes are: either a fully decoded image, or an `ImageError`
that names the file (or HTTP field) and says what is wrong, never another exception. In order:

- an empty file, and things that are not raster images (text, gzip, SVG, PDF, HEIC), are named
  as such;
- only PNG, JPEG, WebP, BMP, GIF and TIFF are opened (a format allow-list);
- the size is read from the header and checked against the pixel limit *before* any pixel is
  decoded (decompression bombs, headers claiming 100000x100000);
- PNG chunk checksums of critical chunks are verified (as libpng does; Pillow skips IDAT's);
- truncated or corrupt data fails in the decoder, and any decoder error becomes "corrupt";
- EXIF orientation is applied (an unreadable EXIF block is ignored: the pixels as stored);
- an animated image (GIF, WebP, APNG) gives its first frame;
- 16-bit and float images are scaled to 8 bits (not clipped), CMYK and palettes converted,
  transparency composited on white.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from raybooth.platform.errors import ImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOO_LARGE = "over the limit"  # in every pixel-limit message (the HTTP layer maps it to 413)

Source = Union[str, Path, bytes, BinaryIO]

# raybooth's own pixel limit (checked from the header, below) replaces Pillow's warning; a
# damaged EXIF block is ignored (the pixels as stored), not worth a line on stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)


def max_pixels() -> int:
    return int(os.environ.get("RAYBOOTH_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS))


# ---------------------------------------------------------------------------------------------
# Reading the bytes


def _file(source: Source, name: str) -> tuple[BinaryIO, bool]:
    """(a seekable file object, whether to close it)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: file not found ({path})", field=name)
        try:
            return open(path, "rb"), True
        except OSError as exc:
            raise ImageError(f"{name}: the file cannot be read ({exc.strerror})", field=name) from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), True
    if not source.seekable():
        return io.BytesIO(source.read()), True
    return source, False


def _not_an_image(head: bytes) -> str | None:
    """What a file that no image decoder accepts is, when it can be told from its first bytes."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive, not an image; decompress it first"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text) or (
            text.startswith(b"<!doctype svg")):
        return "an SVG drawing (vector graphics), which raybooth does not rasterise; export it as PNG"
    if head.startswith(b"%PDF"):
        return "a PDF document, not an image; export the page as PNG"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis"):
        return "a HEIC/AVIF image, which is not supported; convert it to PNG or JPEG"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "plain text, not an image"
    return None


def _check_png_checksums(fp: BinaryIO, name: str) -> None:
    """libpng's rule: a bad CRC in a critical chunk (IHDR, PLTE, IDAT, IEND) is an error."""
    fp.seek(len(PNG_SIGNATURE))
    while True:
        header = fp.read(8)
        if len(header) < 8:
            return  # the decoder reports a missing IEND / truncation itself
        length, kind = struct.unpack(">I4s", header)
        crc = zlib.crc32(kind)
        left = length
        while left:
            piece = fp.read(min(left, 1 << 20))
            if not piece:
                return
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
        stored = fp.read(4)
        if len(stored) < 4:
            return
        critical = kind[:1].isupper()
        if critical and struct.unpack(">I", stored)[0] != crc:
            raise ImageError(
                f"{name}: the file is corrupt (PNG chunk {kind.decode('latin-1')} fails its checksum)",
                field=name,
            )
        if kind == b"IEND":
            return


def _bomb_message(name: str, exc: Exception, limit: int) -> str:
    claimed = re.search(r"\((\d+) pixels\)", str(exc))
    what = f"the header claims {int(claimed.group(1))} pixels" if claimed else "the header claims too many pixels"
    return f"{name}: {what}, {TOO_LARGE} of {limit} (a decompression bomb?); resize it first"


def _decode(source: Source, name: str, limit: int | None) -> Image.Image:
    """The image as decoded by Pillow (any mode), first frame, EXIF orientation applied."""
    limit = limit or max_pixels()
    fp, close = _file(source, name)
    try:
        head = fp.read(64)
        fp.seek(0)
        if not head:
            raise ImageError(f"{name}: the file is empty (0 bytes)", field=name)
        try:
            img = Image.open(fp, formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageError(_bomb_message(name, exc, limit), field=name) from None
        except UnidentifiedImageError:
            if head.startswith(PNG_SIGNATURE):
                _check_png_checksums(fp, name)  # a damaged header says so, not "unsupported"
            if head.startswith(PNG_SIGNATURE):
                raise ImageError(f"{name}: the file is corrupt (a PNG signature, then no readable PNG "
                                 "header)", field=name) from None
            what = _not_an_image(head) or "not a supported image"
            raise ImageError(
                f"{name}: {what} (raybooth reads {', '.join(ALLOWED_FORMATS)})", field=name
            ) from None
        except Exception as exc:  # any decoder failure on hostile bytes is a bad file
            raise ImageError(f"{name}: the file is corrupt or truncated ({_reason(exc)})", field=name) from None
        # Only the header has been read: check the size before decoding any pixels.
        w, h = img.size
        if w * h > limit:
            raise ImageError(
                f"{name}: {w}x{h} is {w * h} pixels, {TOO_LARGE} of {limit}; resize it first",
                field=name,
            )
        if w == 0 or h == 0:
            raise ImageError(f"{name}: the image has no pixels ({w}x{h})", field=name)
        if img.format == "PNG":
            _check_png_checksums(fp, name)
            fp.seek(0)
        try:
            img.load()  # the first frame of an animation
        except Exception as exc:
            raise ImageError(f"{name}: the file is corrupt or truncated ({_reason(exc)})", field=name) from None
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            pass  # an unreadable EXIF block: use the pixels as stored
        return img
    finally:
        if close:
            fp.close()


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# ---------------------------------------------------------------------------------------------
# Modes


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale scaled to 0-255 (Pillow's convert clips)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 65535 -> 255
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr
    else:
        return img
    return Image.fromarray(np.nan_to_num(arr).round().clip(0, 255).astype(np.uint8), "L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _rgb(img: Image.Image) -> Image.Image:
    img = _to_8bit(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _transparent_area(img: Image.Image) -> Image.Image | None:
    """255 where the image is fully transparent, 255 - alpha where partly; None when opaque."""
    if not _has_alpha(img):
        return None
    alpha = img.convert("RGBA").getchannel("A")
    if alpha.getextrema() == (255, 255):
        return None
    return ImageOps.invert(alpha)


# ---------------------------------------------------------------------------------------------
# Public API


def open_image(source: Source, name: str = "image", limit: int | None = None) -> Image.Image:
    """Decode an RGB image (alpha composited on white; 16-bit, palette and CMYK converted).

    Errors are `ImageError`s naming `name` (a path, or an HTTP field)."""
    return _rgb(_decode(source, name, limit))


def open_mask(source: Source, name: str = "mask", limit: int | None = None) -> Image.Image:
    """Decode a mask as one channel, 255 = repaint, 0 = keep.

    - A mask without transparency: white = repaint, black = keep (greys blend).
    - A mask with transparent pixels follows the OpenAI Images API: transparent = repaint,
      opaque = keep, whatever the colours (partly transparent blends: 255 - alpha).
    """
    img = _decode(source, name, limit)
    transparent = _transparent_area(img)
    if transparent is not None:
        return transparent
    return _to_8bit(img).convert("L")


def open_image_and_alpha_mask(source: Source, name: str = "image",
                              limit: int | None = None) -> tuple[Image.Image, Image.Image | None]:
    """An RGB image and, when it has transparent pixels, the mask they make (transparent =
    repaint): how an OpenAI Images API edit without a `mask` marks the area to change."""
    img = _decode(source, name, limit)
    return _rgb(img), _transparent_area(img)


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
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
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
