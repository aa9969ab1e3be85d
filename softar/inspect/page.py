"""The page: the payload embedded as JSON in one self-contained HTML file (the template page.html, with page.js and
page.css inline). A Content-Security-Policy forbids every request, so the page works offline and cannot leak what it
shows."""

from __future__ import annotations

import html
import string
from importlib import resources
from pathlib import Path

from softar import SoftarError
from softar.disk import claim, strict_json, write_owned

GENERATOR = '<meta name="generator" content="softar inspect">'
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


def render_html(payload: dict) -> str:
    assets = resources.files("softar.inspect")
    css, js = (assets.joinpath(name).read_text(encoding="utf-8") for name in ("page.css", "page.js"))
    data = strict_json(payload).replace("<", "\\u003c")  # no "</script>" can end the data early
    title = html.escape(f"softar inspect: {payload['run']['dir']}")
    template = string.Template(assets.joinpath("page.html").read_text(encoding="utf-8"))
    return template.substitute(generator=GENERATOR, csp=CSP, title=title, css=css, js=js, data=data)


def check_targets(page: Path, screenshot: Path | None = None) -> None:
    """The files `softar inspect` will write, checked before any work: PAGE.html in an existing folder, PAGE.json
    beside it, the screenshot a .png; each must be new or a file softar wrote there and nobody changed since (the
    folder's manifest, `softar.disk.claim`)."""
    if page.suffix != ".html":
        raise SoftarError(f"--out {page}: the page must be a .html file")
    targets = [(page, "--out"), (page.with_suffix(".json"), "--out")]
    if screenshot is not None:
        if screenshot.suffix != ".png":
            raise SoftarError(f"--screenshot {screenshot}: the screenshot must be a .png file")
        targets.append((screenshot, "--screenshot"))
    for path, flag in targets:
        if not path.parent.is_dir():
            raise SoftarError(f"{flag} {path}: folder {path.parent} does not exist")
        claim(path.parent, [path.name], f"{flag} {path}")


def write_page(payload: dict, out: Path) -> tuple[Path, Path]:
    """Write PAGE.html and PAGE.json (the payload): both in full before either replaces what is there, under a
    lock on the folder, so the pair always comes from one generation."""
    page, data = out, out.with_suffix(".json")
    write_owned({data: strict_json(payload, indent=1).encode("utf-8"), page: render_html(payload).encode("utf-8")},
                f"--out {out}")
    return page, data


def write_png(png: bytes, path: Path) -> Path:
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise SoftarError("the browser returned something other than a PNG")
    write_owned({path: png}, f"--screenshot {path}")
    return path
