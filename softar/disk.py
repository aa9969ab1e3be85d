"""Everything softAR reads from or writes to disk goes through here: every file it reads may be corrupt or
hostile, so a read either returns checked data or raises one `SoftarError` naming the file and the problem.
Writes are atomic (temp file, fsync, rename), and temp names carry the writer's pid so that leftovers of a killed
process are recognised and cleaned by the next one.

What softAR may overwrite or replace is what it can prove it wrote: each folder it writes into holds a manifest
(`MANIFEST`) listing the names it wrote there with their sha256, and a file is replaced only while it is unchanged
since. Nothing is ever judged ours by its name or its text."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from softar import SoftarError

TEMP_TAG = ".softar-tmp-"  # in every temp name softAR creates: .<name>.softar-tmp-<pid>
MANIFEST = ".softar-manifest.json"  # in each folder softAR writes to: {"files": {name: [sha256], [""] for a folder}}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_regular(path: Path, what: str = "file"):
    """`path` opened for binary reading, refused unless it is a regular file (a FIFO or a device would block or
    never end): opened without blocking and checked on the open descriptor, so nothing can be swapped in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise SoftarError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SoftarError(f"{what}: {path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` owned by this process."""
    return path.with_name(f".{path.name}{TEMP_TAG}{os.getpid()}")


def _temp_of(name: str) -> str | None:
    """The name whose temp `name` is (`temp_name`: .<name>.softar-tmp-<pid>), or None."""
    head, tag, pid = name.rpartition(TEMP_TAG)
    return head[1:] if tag and head.startswith(".") and len(head) > 1 and pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: Path, stems: tuple[str, ...] | None = None) -> list[Path]:
    """Remove the temp files and folders softAR left in `folder` (for the targets named `stems`, or any) from
    processes that no longer run."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        base, pid = _temp_of(p.name), p.name.rpartition(TEMP_TAG)[2]
        if base is None or stems is not None and base not in stems:
            continue
        if int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staged_folder(out: Path, replace: bool, what: str, flag: str = "--out") -> Iterator[Path]:
    """A temp folder beside `out` to write a whole dataset into. Leaving the block without an error moves it into
    place: with `replace`, an existing `out` is replaced atomically (it moves aside, the new one moves in, then the
    old one goes); otherwise by a rename, which fails if `out` is a non-empty folder (another process may have
    written it meanwhile); either way only a folder of softAR's own (`check_owned`) is replaced. The folder's
    manifest lists everything the block wrote. On any error the temp folder goes, and an OSError becomes a one-line
    error."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(out)
        tmp.mkdir()
    except OSError as e:
        raise SoftarError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        _write_manifest(tmp, {p.name: [""] if p.is_dir() else [sha256_file(p)] for p in tmp.iterdir()})
        check_owned(out, f"{flag} {out}")
        if replace and out.exists():
            old = temp_name(out.with_name(out.name + ".old"))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SoftarError(f"{flag} {out}: cannot write the {what} ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _listed(folder: Path) -> dict[str, list[str]]:
    """The names softAR wrote in `folder` (name -> the sha256s it may have, [""] for a folder), from its manifest;
    {} without one. A name has two sha256s only while a write is replacing it (see `write_owned`)."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        return {}
    if path.is_symlink():
        raise SoftarError(f"softar manifest {path}: a link, not a manifest softar wrote")
    files = read_json(path, "softar manifest", {"files": dict})["files"]
    if not all(isinstance(v, list) and v and all(isinstance(h, str) for h in v)
               and n and "/" not in n and n not in (".", "..", MANIFEST) for n, v in files.items()):
        raise SoftarError(f"softar manifest {path}: not a manifest softar wrote")
    return files


def _write_manifest(folder: Path, files: dict[str, list[str]]) -> None:
    write_text_atomic(folder / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def _check_is_folder(folder: Path) -> None:
    if folder.is_symlink() or folder.exists() and not folder.is_dir():
        raise SoftarError(f"{folder} is a link or not a directory: softar writes only into a folder of its own")


def foreign(folder: Path, names: Iterable[str] | None = None) -> list[str]:
    """Of `names` in `folder` (default: all it holds), those softAR cannot prove it wrote: not in the folder's
    manifest, a link, a file changed since (its sha256), or a file where a folder was written (and the reverse).
    Names that are absent are not foreign; neither are softAR's own temp files."""
    _check_is_folder(folder)
    if not folder.exists():
        return []
    listed = _listed(folder)
    present = [p.name for p in folder.iterdir()] if names is None else [n for n in names if (folder / n).exists()
                                                                          or (folder / n).is_symlink()]
    bad = []
    for name in sorted(present):
        p = folder / name
        if name == MANIFEST or _temp_of(name) in (*listed, MANIFEST):  # a write of softar's own, in flight or killed
            continue
        kinds = listed.get(name)
        ok = kinds is not None and not p.is_symlink() and (
            p.is_dir() if kinds == [""] else p.is_file() and sha256_file(p) in kinds)
        if not ok:
            bad.append(name)
    return bad


def check_owned(folder: Path, what: str, names: Iterable[str] | None = None) -> None:
    """A one-line error unless everything of `names` in `folder` (default: all it holds) is softAR's (`foreign`)."""
    bad = foreign(folder, names)
    if bad:
        shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise SoftarError(f"{what}: {folder} holds {shown}, which softar did not write (or which changed since); "
                          "it replaces only what it wrote: choose another path")


def claim(folder: Path, names: Iterable[str] | None, what: str) -> None:
    """Before any work, writing nothing: `folder` is a folder or can be made, softAR can write there (a temp file
    of its own is made and removed), and each of `names` in it (None: all it holds) is absent or softAR's
    (`foreign`)."""
    if folder.is_symlink() or folder.exists() and not folder.is_dir():
        raise SoftarError(f"{what}: {folder} is not a directory")
    check_owned(folder, what, names)
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SoftarError(f"{what}: {probe} is not a directory")
    tmp = temp_name(probe / MANIFEST)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(tmp)
    except OSError as e:
        raise SoftarError(f"{what}: cannot write in {probe} ({e.strerror or e})") from None


def make_folder(folder: Path, name: str, what: str) -> Path:
    """A folder softAR makes in `folder` (made too if missing), or made before, listed in its manifest."""
    path = folder / name
    check_owned(folder, what, [name])
    try:
        path.mkdir(parents=True, exist_ok=True)
        with folder_lock(folder):
            _write_manifest(folder, {**_listed(folder), name: [""]})
    except OSError as e:
        raise SoftarError(f"{what}: cannot make {path} ({e.strerror or e})") from None
    return path


def write_owned(files: dict[Path, bytes], what: str) -> None:
    """Write files of one folder together: under a lock on the folder, each is refused if something not softAR's
    is there (`foreign`), all are staged in full, then moved into place. While they move, the manifest accepts the
    old and the new content of each, so a kill at any moment leaves files softAR still recognises as its own."""
    folder = next(iter(files)).parent
    assert all(p.parent == folder for p in files)
    _check_is_folder(folder)  # before making anything; what it holds is checked under the lock
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoftarError(f"{what}: cannot make {folder} ({e.strerror or e})") from None
    with folder_lock(folder):
        check_owned(folder, what, [p.name for p in files])
        listed = _listed(folder)
        new = {p.name: [sha256_bytes(d)] for p, d in files.items()}
        staged: list[tuple[Path, Path]] = []
        try:
            for path, data in files.items():
                staged.append((stage_bytes(path, data), path))
            _write_manifest(folder, {**listed, **{n: listed.get(n, []) + h for n, h in new.items()}})
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, path in staged:
            commit(tmp, path)
        _write_manifest(folder, {**listed, **new})


def stage_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to this process's temp sibling of `path`, synced: half of an atomic write (`commit` is the
    other), so that several files can be written first and then moved into place together."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SoftarError(f"cannot write {path}: {e.strerror or e}") from None
    return tmp


def commit(tmp: Path, path: Path) -> None:
    """Move a staged file into place."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SoftarError(f"cannot write {path}: {e.strerror or e}") from None
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    commit(stage_bytes(path, text.encode("utf-8")), path)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on a folder itself (flock on its descriptor; nothing is created), so that two
    processes replacing files that belong together there do so one after the other."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_text(path: Path, what: str, limit: int = 1 << 28) -> str:
    """A UTF-8 text file of at most `limit` bytes."""
    if not path.exists():
        raise SoftarError(f"{what}: {path} does not exist")
    try:
        with open_regular(path, what) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise SoftarError(f"{what}: {path} is {size} bytes, more than such a file can be")
            return f.read(limit + 1).decode("utf-8")
    except UnicodeDecodeError:
        raise SoftarError(f"{what}: {path} is not UTF-8 text") from None
    except OSError as e:
        raise SoftarError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def _finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


def _is(value: Any, kind: Any) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_fields(obj: Any, fields: dict[str, Any], where: str) -> None:
    """obj must be a JSON object holding each of `fields` with its type; a nested dict of fields checks a nested
    object."""
    if not isinstance(obj, dict):
        raise SoftarError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, kind in fields.items():
        if key not in obj:
            raise SoftarError(f"{where}: missing {key!r}")
        if isinstance(kind, dict):
            check_fields(obj[key], kind, f"{where}: {key}")
        elif not _is(obj[key], kind):
            name = getattr(kind, "__name__", str(kind))
            raise SoftarError(f"{where}: {key!r} must be {name}, got {type(obj[key]).__name__}")


def strict_json(obj: Any, indent: int | None = None) -> str:
    """JSON that strict parsers accept: a non-finite float (an unbounded threshold, say) is written as the string
    "inf", "-inf" or "nan"."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def read_json(path: Path, what: str, fields: dict[str, Any] | None = None) -> Any:
    """A JSON document (an object when `fields` are given, with those fields and types). Non-finite numbers
    (NaN, Infinity) are refused."""
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: also an integer of more digits than Python parses
        raise SoftarError(f"{what}: {path} is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    try:
        finite = _finite(obj)
    except RecursionError:
        raise SoftarError(f"{what}: {path} is nested too deeply to be a softar file") from None
    if not finite:
        raise SoftarError(f"{what}: {path} holds a non-finite number")
    if fields is not None:
        check_fields(obj, fields, f"{what} {path}")
    return obj


def read_jsonl(path: Path, what: str) -> tuple[list[dict], bool]:
    """The objects of a JSON-lines file, and whether a torn last line (a write cut short) was dropped. A bad line
    anywhere else is an error."""
    lines = read_text(path, what).splitlines()
    rows, torn = [], False
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except (ValueError, RecursionError):
            if i == len(lines) - 1:
                torn = True
                break
            raise SoftarError(f"{what}: {path} line {i + 1} is not a JSON object") from None
        rows.append(row)
    return rows, torn
