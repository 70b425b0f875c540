"""report.html: report.md rendered as one self-contained page, its figures inlined as data: URIs, for
MLflow's artifact view. MLflow 3.17's UI renders a .md artifact with react-markdown: it shows an image that
report.md links by a relative path as text (`[ppl](ppl.png)`), and its URL filter drops data: URIs; an .html
artifact is shown in a sandboxed iframe loaded from a blob: URL, where data: images render (checked with
headless Chromium against a local `mlflow server`; README, "Results on the embedded default")."""
from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;line-height:1.4}"
         "table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.9em}"
         "th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}th{background:#f3f3f3}"
         "img{max-width:100%}code{background:#f3f3f3;padding:0 2px}")


def inline_figures(tokens, folder: Path) -> list[str]:
    """Points every image of the parsed Markdown that names a PNG file of `folder` (a bare file name) at
    that file's bytes as a data: URI; returns the names inlined."""
    inlined = []
    for token in tokens:
        for child in token.children or []:
            src = child.attrGet("src") if child.type == "image" else None
            if not src or Path(src).name != src or not src.endswith(".png") or not (folder / src).is_file():
                continue
            child.attrSet("src", "data:image/png;base64," + base64.b64encode((folder / src).read_bytes()).decode())
            inlined.append(src)
    return inlined


def report_html(markdown_text: str, folder: str | Path, title: str) -> str:
    """The page: CommonMark with tables (markdown-it-py; raw HTML in the text is escaped, not passed
    through), the PNGs the text links from `folder` inlined."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown_text)
    inline_figures(tokens, Path(folder))
    body = md.renderer.render(tokens, md.options, {})
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n{body}</body></html>\n")
