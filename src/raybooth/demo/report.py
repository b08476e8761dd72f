"""What the demo shows: console lines while it runs, and `index.html` with every stage's images,
captions and scores when it ends."""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

# Shown large: the toy world is 32 px, the tiny model 64 px.
DISPLAY_SIDE = 128


@dataclass
class Figure:
    """One image on the page, with its caption (e.g. the prompt and what the judge read)."""

    file: str
    caption: str = ""
    ok: bool | None = None  # True/False: the judge agreed with what was asked; None: not judged


@dataclass
class Section:
    title: str
    figures: list[Figure]
    text: str = ""


@dataclass
class Report:
    out: Path
    sections: list[Section] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # measured figures, into demo.json

    def say(self, text: str) -> None:
        print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def save(self, image: Image.Image, name: str, side: int = DISPLAY_SIDE) -> str:
        """Save an image for the page, scaled up without blurring (pixels stay pixels)."""
        scale = max(1, side // max(image.size))
        image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST).save(self.out / name)
        return name

    def figure(self, file: str, caption: str = "", ok: bool | None = None) -> Figure:
        """For stages in other parts (they hold no import of this module)."""
        return Figure(file, caption, ok)

    def add(self, title: str, figures: list[Figure], text: str = "") -> None:
        self.sections.append(Section(title, figures, text))

    def write_index(self, note: str) -> Path:
        parts = [
            "<!doctype html><meta charset=utf-8><title>raybooth demo</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
            # Images are saved already scaled (whole-pixel factors): shown at their own size.
            "figure{display:inline-block;margin:4px;vertical-align:top}"
            "figure img{image-rendering:pixelated;border:1px solid #ccc;display:block}"
            "figcaption{font-size:11px;line-height:1.25;max-width:132px}.ok{color:#1a7f37}.bad{color:#c62828}"
            "code{background:#f4f4f4;padding:0 .2em}</style>",
            "<h1>raybooth demo</h1>",
            f"<p>{html.escape(note)}</p>",
        ]
        for section in self.sections:
            parts.append(f"<h2>{html.escape(section.title)}</h2>")
            if section.text:
                parts.append(f"<p>{html.escape(section.text)}</p>")
            for fig in section.figures:
                mark = "" if fig.ok is None else (" <span class=ok>✓</span>" if fig.ok else " <span class=bad>✗</span>")
                parts.append(f'<figure><img src="{html.escape(fig.file)}" alt="{html.escape(fig.caption or fig.file)}">'
                             f"<figcaption>{html.escape(fig.caption)}{mark}</figcaption></figure>")
        if self.next_steps:
            parts.append("<h2>Next</h2><ul>")
            parts.extend(f"<li><code>{html.escape(s)}</code></li>" for s in self.next_steps)
            parts.append("</ul>")
        index = self.out / "index.html"
        index.write_text("\n".join(parts))
        (self.out / "demo.json").write_text(json.dumps({
            "sections": [{"title": s.title, "text": s.text, "figures": [vars(f) for f in s.figures]} for s in self.sections],
            "facts": self.facts,
        }, indent=2, default=str))
        return index
