"""The page: the payload embedded as JSON in one self-contained HTML file (the template page.html, with page.js and
page.css inline). A Content-Security-Policy forbids every request, so the page works offline and cannot leak what it
shows."""

from __future__ import annotations

import html
import string
import zlib
from importlib import resources
from pathlib import Path

from softar import SoftarError
from softar.disk import commit, folder_lock, stage_bytes, strict_json

GENERATOR = '<meta name="generator" content="softar inspect">'  # marks a page this tool wrote (and may replace)
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


def render_html(payload: dict) -> str:
    assets = resources.files("softar.inspect")
    css, js = (assets.joinpath(name).read_text(encoding="utf-8") for name in ("page.css", "page.js"))
    data = strict_json(payload).replace("<", "\\u003c")  # no "</script>" can end the data early
    title = html.escape(f"softar inspect: {payload['run']['dir']}")
    template = string.Template(assets.joinpath("page.html").read_text(encoding="utf-8"))
    return template.substitute(generator=GENERATOR, csp=CSP, title=title, css=css, js=js, data=data)


PNG_SOFTWARE = b"Software\0softar inspect"  # a tEXt chunk marks a screenshot this tool wrote


def _ours(path: Path, marker: bytes) -> bool:
    """Whether an existing file was written by this tool (the only kind it replaces)."""
    try:
        with open(path, "rb") as f:
            return marker in f.read(4096)
    except OSError:
        return False


def check_targets(page: Path, screenshot: Path | None = None) -> None:
    """The files `softar inspect` will write, checked before any work: PAGE.html in an existing folder, PAGE.json
    beside it, the screenshot a .png; none may be a link, a folder, or a file this tool did not write."""
    if page.suffix != ".html":
        raise SoftarError(f"--out {page}: the page must be a .html file")
    targets = [(page, "--out", GENERATOR.encode()), (page.with_suffix(".json"), "--out", b'"softar_inspect"')]
    if screenshot is not None:
        if screenshot.suffix != ".png":
            raise SoftarError(f"--screenshot {screenshot}: the screenshot must be a .png file")
        targets.append((screenshot, "--screenshot", PNG_SOFTWARE))
    for path, flag, marker in targets:
        if not path.parent.is_dir():
            raise SoftarError(f"{flag} {path}: folder {path.parent} does not exist")
        _refuse_foreign(path, flag, marker)


def _refuse_foreign(path: Path, flag: str, marker: bytes) -> None:
    if path.is_symlink() or path.is_dir() or (path.exists() and not _ours(path, marker)):
        raise SoftarError(f"{path} exists and is not a file softar inspect wrote; choose another {flag}")


def write_page(payload: dict, out: Path) -> tuple[Path, Path]:
    """Write PAGE.html and PAGE.json (the payload). Both are written in full before either replaces what is there,
    and under a lock on the folder, so the pair always comes from one generation."""
    page, data = out, out.with_suffix(".json")
    html_bytes, json_bytes = render_html(payload).encode("utf-8"), strict_json(payload, indent=1).encode("utf-8")
    with folder_lock(out.parent):
        check_targets(out)  # again: another process may have put something there meanwhile
        staged = [(stage_bytes(data, json_bytes), data)]
        try:
            staged.append((stage_bytes(page, html_bytes), page))
        except SoftarError:
            staged[0][0].unlink(missing_ok=True)
            raise
        for tmp, path in staged:
            commit(tmp, path)
    return page, data


def write_png(png: bytes, path: Path) -> Path:
    """Write a screenshot with a tEXt chunk that marks it as this tool's (after the 8-byte signature and the
    25-byte IHDR chunk)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise SoftarError("the browser returned something other than a PNG")
    chunk = len(PNG_SOFTWARE).to_bytes(4, "big") + b"tEXt" + PNG_SOFTWARE
    chunk += zlib.crc32(b"tEXt" + PNG_SOFTWARE).to_bytes(4, "big")
    with folder_lock(path.parent):
        _refuse_foreign(path, "--screenshot", PNG_SOFTWARE)
        commit(stage_bytes(path, png[:33] + chunk + png[33:]), path)
    return path
