"""Reading the nightly report as a reader sees it."""
from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """What a reader sees of a page: each table's rows of cell text (in order, with the id of
    the section it is in), the visible text (not the style sheet), and every src/href."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.links, self.text, self._section, self._cell = [], [], [], None, None
        self._style = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        self._style = tag == "style"
        if tag == "section":
            self._section = attrs.get("id")
        elif tag == "table":
            self.tables.append((self._section, []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        self._style = False
        if tag in ("td", "th"):
            self.tables[-1][1][-1].append(self._cell)
            self._cell = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._style:
            return
        self.text.append(data)
        if self._cell is not None:
            self._cell += data
