"""A corpus of hostile and unusual image files, made in the test (nothing is downloaded).

Each case says what raybooth must do with it: `ok` (decodes, with a documented result) or
`bad` (an ImageError naming the file/field; HTTP 400, or 413 for `too_large`). The same bytes are
used for the unit, CLI, training and HTTP tests (tests/test_hostile_images.py,
tests/test_serve_hardening.py).
"""

from __future__ import annotations

import functools
import gzip
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIDE = 64  # most cases: a 64x64 picture (the tiny models' native size)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    suffix: str
    ok: bool  # decodes (True) or is refused (False)
    expect: str  # ok: what the decoded RGB image must be ("size=WxH", ...); bad: a message fragment
    too_large: bool = False  # refused for its pixel count: HTTP 413 rather than 400


def _noise(mode: str = "RGB", size: tuple[int, int] = (SIDE, SIDE), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (good CRCs) claiming width x height, and a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def _bad_crc_png() -> bytes:
    data = bytearray(encode(_noise(), "PNG"))
    # Flip one byte inside the first IDAT's data: its CRC no longer matches.
    at = data.index(b"IDAT") + 4 + 10
    data[at] ^= 0xFF
    return bytes(data)


def _bad_ihdr_crc_png() -> bytes:
    data = bytearray(encode(_noise(), "PNG"))
    data[8 + 8 + 13] ^= 0xFF  # the IHDR CRC itself
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8), (200, 10, 10)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bomb_png(side: int = 6000) -> bytes:
    """A real, valid PNG: 6000x6000 black, ~35 kB compressed, 36 Mpx (108 MB as RGB)."""
    body = zlib.compress(b"\x00" * ((side + 1) * side), 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _ztxt_bomb_png() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (20 * 1024 * 1024), zip=True)
    return encode(Image.new("RGB", (SIDE, SIDE), (0, 128, 0)), "PNG", pnginfo=info)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (SIDE, SIDE), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _png16() -> bytes:
    arr = np.full((SIDE, SIDE), 65535, dtype=np.uint16)
    arr[:, : SIDE // 2] = 32896  # 128 * 257: mid grey in 8 bits
    return encode(Image.fromarray(arr), "PNG")


def _cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (SIDE, SIDE // 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encode(img, "JPEG", exif=exif)


def _broken_exif_jpeg() -> bytes:
    data = bytearray(encode(Image.new("RGB", (SIDE, SIDE), (0, 0, 255)), "JPEG"))
    app1 = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0garbage"  # IFD offset far past the end
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    return bytes(data[:2] + segment + data[2:])


def _palette_transparent() -> bytes:
    img = Image.new("P", (SIDE, SIDE), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, SIDE // 2, SIDE))  # left half red, right half index 0 = transparent
    return encode(img, "PNG", transparency=0)


def _svg() -> bytes:
    return (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
            b'<rect width="64" height="64" fill="red"/></svg>\n')


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[Case, ...]:
    png = encode(_noise(), "PNG")
    jpeg = encode(_noise(), "JPEG", quality=90)
    webp = encode(_noise(), "WEBP", quality=80)
    return (
        Case("truncated-png", png[: len(png) // 2], ".png", False, "corrupt or truncated"),
        Case("truncated-jpeg", jpeg[: len(jpeg) // 2], ".jpg", False, "corrupt or truncated"),
        Case("truncated-webp", webp[: len(webp) // 2], ".webp", False, "corrupt or truncated"),
        Case("png-signature-only", png[:8], ".png", False, "corrupt"),
        Case("png-signature-then-junk", png[:8] + b"\x13\x37junk" * 10, ".png", False, "corrupt"),
        Case("png-bad-idat-crc", _bad_crc_png(), ".png", False, "fails its checksum"),
        Case("png-bad-ihdr-crc", _bad_ihdr_crc_png(), ".png", False, "fails its checksum"),
        Case("zero-bytes", b"", ".png", False, "empty"),
        Case("plain-text", b"hello, this is not a picture\n", ".png", False, "plain text"),
        Case("gzip", gzip.compress(png), ".png", False, "gzip"),
        Case("svg", _svg(), ".png", False, "SVG"),
        Case("png-header-claims-100000x100000", _png_claiming(100_000, 100_000), ".png", False,
             "over the limit", too_large=True),
        Case("jpeg-header-claims-65000x65000", _jpeg_claiming(65_000, 65_000), ".jpg", False,
             "over the limit", too_large=True),
        Case("decompression-bomb-6000x6000", _bomb_png(), ".png", False, "over the limit", too_large=True),
        Case("png-ztxt-bomb", _ztxt_bomb_png(), ".png", False, "corrupt"),
        Case("animated-gif", _animated_gif(), ".gif", True, f"size={SIDE}x{SIDE} first-frame=red"),
        Case("png-16-bit", _png16(), ".png", True, f"size={SIDE}x{SIDE} scaled-16-bit"),
        Case("cmyk-jpeg", _cmyk_jpeg(), ".jpg", True, f"size={SIDE}x{SIDE} red"),
        Case("exif-rotated-jpeg", _exif_rotated(), ".jpg", True, f"size={SIDE // 2}x{SIDE} rotated"),
        Case("jpeg-broken-exif", _broken_exif_jpeg(), ".jpg", True, f"size={SIDE}x{SIDE} blue"),
        Case("palette-with-transparency", _palette_transparent(), ".png", True,
             f"size={SIDE}x{SIDE} transparent-on-white"),
        Case("one-pixel", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), ".png", True, "size=1x1"),
    )


def check_decoded(case: Case, img: Image.Image) -> None:
    """What an `ok` case must decode to (RGB, the documented pixels)."""
    assert img.mode == "RGB", (case.name, img.mode)
    size = case.expect.split()[0].removeprefix("size=")
    assert f"{img.size[0]}x{img.size[1]}" == size, (case.name, img.size)
    arr = np.asarray(img).astype(int)
    if "red" in case.expect and "transparent" not in case.expect:
        assert arr[..., 0].min() > 200 and arr[..., 1:].max() < 60, (case.name, arr.mean((0, 1)))
    if "blue" in case.expect:
        assert arr[..., 2].min() > 200 and arr[..., :2].max() < 60, (case.name, arr.mean((0, 1)))
    if "scaled-16-bit" in case.expect:
        assert abs(arr[0, 0, 0] - 128) <= 1 and arr[0, -1, 0] == 255, arr[0, [0, -1], 0]
    if "transparent-on-white" in case.expect:
        assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, -1]) == (255, 255, 255)
