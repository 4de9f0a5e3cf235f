"""A self-contained HTML page: headings, paragraphs, embedded PNG figures and tables, no assets.

Every figure is a `data:image/png;base64` URI and the style sheet is inline, so the page can be
mailed, archived beside a run or opened offline and still shows everything. Figures and tables
carry a `data-figure` / `data-table` name so tests (and people) can find them.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
figure { display: inline-block; margin: 0.5em 1.5em 1em 0; vertical-align: top; }
figure img { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; max-width: 520px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #8a5a00; } code, .mono { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


def png_uri(image: Any) -> str:
    """A PIL image (or uint8 H×W / H×W×C array) as a base64 PNG data URI."""

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fmt(value: Any) -> str:
    """Numbers with 4 significant digits (integers as they are), everything else as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


class Page:
    """Sections appended in order; `html()` gives the finished document."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.names: set[str] = set()

    def _unique(self, name: str) -> str:
        """Figure and table names stay unique (labels such as 'K=1' and 'K 1' share a slug)."""
        found, i = name, 1
        while found in self.names:
            i += 1
            found = f"{name}-{i}"
        self.names.add(found)
        return found

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def figure(self, name: str, image: Any, caption: str) -> None:
        name = self._unique(name)
        self.parts.append(
            f'<figure data-figure="{html.escape(name)}"><img src="{png_uri(image)}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')

    def table(self, name: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        name = self._unique(name)
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        body = []
        for row in rows:
            cells = []
            for v in row:
                cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
                cells.append(f"<td{cls}>{html.escape(fmt(v))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self.parts.append(f'<table data-table="{html.escape(name)}"><thead><tr>{head}</tr></thead>'
                          f"<tbody>{''.join(body)}</tbody></table>")

    def html(self) -> str:
        title = html.escape(self.title)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{title}</title><style>{STYLE}</style></head>\n<body>\n<h1>{title}</h1>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")
