"""Draws the demo subject: a distinctive toy (a teal robot with an orange antenna and a yellow
star on its chest) in five poses on different backgrounds. Run once; the PNGs are committed."""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).parent / "demo-subject"
BACKGROUNDS = [(235, 225, 200), (190, 215, 235), (200, 235, 200), (240, 200, 210), (220, 220, 220)]


def robot(size: int, bg, dx: int, dy: int, scale: float, tilt: int) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cx, cy = size // 2 + dx, size // 2 + dy
    s = scale * size / 128
    def box(x0, y0, x1, y1, fill):
        d.rectangle([cx + x0 * s, cy + y0 * s, cx + x1 * s, cy + y1 * s], fill=fill)
    box(-22, -10, 22, 34, (20, 150, 150))          # body
    box(-16, -38, 16, -12, (30, 170, 170))         # head
    box(-10, -30, -4, -24, (250, 250, 250))        # eyes
    box(4, -30, 10, -24, (250, 250, 250))
    d.line([cx, cy - 38 * s, cx + tilt * s, cy - 52 * s], fill=(240, 120, 20), width=max(1, int(3 * s)))
    d.ellipse([cx + (tilt - 5) * s, cy - 58 * s, cx + (tilt + 5) * s, cy - 48 * s], fill=(240, 120, 20))
    star = [(0, -8), (2, -2), (8, -2), (3, 2), (5, 8), (0, 4), (-5, 8), (-3, 2), (-8, -2), (-2, -2)]
    d.polygon([(cx + x * s, cy + 10 * s + y * s) for x, y in star], fill=(250, 210, 30))
    box(-30, -6, -22, 22, (20, 120, 120))          # arms
    box(22, -6, 30, 22, (20, 120, 120))
    box(-18, 34, -6, 46, (40, 40, 40))             # feet
    box(6, 34, 18, 46, (40, 40, 40))
    return img


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    poses = [(0, 0, 1.0, 0), (-12, 6, 0.8, 8), (10, -4, 0.9, -8), (4, 8, 0.7, 4), (-6, -6, 1.1, -4)]
    for i, (pose, bg) in enumerate(zip(poses, BACKGROUNDS)):
        robot(128, bg, *pose).save(OUT / f"robot-{i}.png", optimize=True)
