"""Inpainting geometry: mask blur, the crop box around a mask, and compositing the original back.

The composite is what guarantees that pixels outside the (blurred) mask are byte-identical to the
input: the VAE round trip changes every pixel a little, so the original is pasted back wherever
the mask is zero rather than trusting the decoded image there.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    if radius <= 0:
        return mask
    return mask.filter(ImageFilter.GaussianBlur(radius))


def crop_box(
    mask: Image.Image, margin: int, aspect: float
) -> tuple[int, int, int, int] | None:
    """The box around the mask's non-zero pixels plus `margin`, grown to the target aspect ratio
    (width / height) and kept inside the image. None when the mask is empty."""
    bbox = mask.getbbox()
    if bbox is None:
        return None
    W, H = mask.size
    x0, y0, x1, y1 = bbox
    x0, y0, x1, y1 = max(0, x0 - margin), max(0, y0 - margin), min(W, x1 + margin), min(H, y1 + margin)
    w, h = x1 - x0, y1 - y0
    # Grow the short side so the crop resizes to the generation size without distortion.
    if w / h < aspect:
        w_new = min(W, round(h * aspect))
        x0, x1 = _grow(x0, x1, w_new, W)
    else:
        h_new = min(H, round(w / aspect))
        y0, y1 = _grow(y0, y1, h_new, H)
    return x0, y0, x1, y1


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    extra = size - (hi - lo)
    lo -= extra // 2
    hi = lo + size
    if lo < 0:
        lo, hi = 0, size
    if hi > limit:
        lo, hi = limit - size, limit
    return lo, hi


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """original * (1 - m) + generated * m, exactly the original wherever m == 0."""
    orig = np.asarray(original.convert("RGB"), dtype=np.uint8)
    gen = np.asarray(generated.convert("RGB").resize(original.size, Image.LANCZOS), dtype=np.float32)
    m = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    blended = np.clip(np.rint(orig.astype(np.float32) * (1.0 - m) + gen * m), 0, 255).astype(np.uint8)
    out = np.where(m > 0, blended, orig)
    return Image.fromarray(out, "RGB")
