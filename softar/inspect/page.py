"""The page: the payload embedded as JSON in one self-contained HTML file (the template page.html, with page.js and
page.css inline). A Content-Security-Policy forbids every request, so the page works offline and cannot leak what it
shows."""

from __future__ import annotations

import html
import string
from importlib import resources
from pathlib import Path

from softar import SoftarError
from softar.disk import strict_json, write_text_atomic

GENERATOR = '<meta name="generator" content="softar inspect">'  # marks a page this tool wrote (and may replace)
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


def render_html(payload: dict) -> str:
    assets = resources.files("softar.inspect")
    css, js = (assets.joinpath(name).read_text(encoding="utf-8") for name in ("page.css", "page.js"))
    data = strict_json(payload).replace("<", "\\u003c")  # no "</script>" can end the data early
    title = html.escape(f"softar inspect: {payload['run']['dir']}")
    template = string.Template(assets.joinpath("page.html").read_text(encoding="utf-8"))
    return template.substitute(generator=GENERATOR, csp=CSP, title=title, css=css, js=js, data=data)


def _ours(path: Path, marker: str) -> bool:
    """Whether an existing file was written by this tool (the only kind it replaces)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return marker in f.read(4096)
    except OSError:
        return False


def write_page(payload: dict, out: Path) -> tuple[Path, Path]:
    """Write PAGE.html and PAGE.json (the payload) atomically; a file there that this tool did not write is refused."""
    page, data = out, out.with_suffix(".json")
    for path, marker in ((page, GENERATOR), (data, '"softar_inspect"')):
        if path.is_dir() or (path.exists() and not _ours(path, marker)):
            raise SoftarError(f"{path} exists and is not a softar inspect file; choose another --out")
    write_text_atomic(data, strict_json(payload, indent=1))
    write_text_atomic(page, render_html(payload))
    return page, data
