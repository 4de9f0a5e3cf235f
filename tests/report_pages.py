"""Helpers shared by the report tests: read a report's figures and tables back out of its HTML."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np


class ReportParser(HTMLParser):
    """Figures (data-figure name -> img src), tables (data-table name -> rows of cell text)."""

    def __init__(self):
        super().__init__()
        self.figures: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.external: list[str] = []
        self._figure: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self._figure = a.get("data-figure")
        elif tag == "img":
            assert self._figure is not None and self._figure not in self.figures, self._figure
            self.figures[self._figure] = a["src"]
        elif tag == "table":
            self._table = a["data-table"]
            self.tables[self._table] = []
        elif tag == "tr":
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag in ("link", "script"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_report(text: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(text)
    parser.close()
    assert parser.external == [], parser.external  # self-contained: nothing to fetch
    return parser


def decode(uri: str) -> np.ndarray:
    """A data:image/png;base64 URI decoded by PIL, as an array."""
    from PIL import Image

    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):], validate=True))) as im:
        assert im.format == "PNG"
        im.load()
        return np.asarray(im)


def table_dict(rows: list[list[str]]) -> dict[str, str]:
    return {r[0]: r[1] for r in rows[1:]}
