"""Atomic writes: the one implementation behind adapters, checkpoints, the asset cache and merged checkpoints.

A folder is filled in a hidden temporary sibling and swapped in by rename, so a crash leaves either the previous
complete folder or the new one at the path, never a half-written one. A single file is written beside its target
and ``os.replace``d over it. A failed write (a full disk) raises an ``OSError`` that names the path and says that
what was there before is unchanged.

Every file lorafit writes goes through here: ``atomic_dir`` / ``writing_dir`` (folders), ``replace_file`` and its
``write_text``, ``write_json``, ``write_figure`` (single files), and ``append_line`` (the one log appended to while
it is read). ``read_json`` and ``read_jsonl`` are the matching readers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Type

from safetensors import SafetensorError

from .errors import AdapterError

# What writers raise when a write fails (a full disk: OSError from Python, SafetensorError from safetensors,
# RuntimeError "[enforce fail at inline_container.cc...] unexpected pos" from torch.save).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_error(e: Exception, path: Path) -> OSError:
    """An OSError for a failed write that names the target and says that it was left as it was."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"os error (\d+)", str(e))):  # safetensors: "... (os error 28)"
        code = int(m.group(1))
    reason = getattr(e, "strerror", None) or str(e).strip()
    hint = "" if code else " (is the disk full?)"
    msg = f"could not write {path}: {reason}{hint}; what was there before is unchanged"
    return OSError(code, msg) if code else OSError(msg)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux/glibc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def usual_permissions(path: Path) -> None:
    """mkdtemp/mkstemp (and safetensors) create private 0700/0600 entries: give them the umask's usual modes."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _swap_in(tmp: Path, path: Path, keep_existing: bool) -> None:
    """Put the finished folder ``tmp`` at ``path``, replacing what is there (one atomic exchange where possible),
    or, with ``keep_existing``, leaving a folder that appeared meanwhile (a concurrent writer of the same content)."""
    if not path.exists() or keep_existing:
        try:
            os.rename(tmp, path)
        except OSError:
            if not (keep_existing and path.is_dir()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # the other writer's copy stays; ours goes
        return
    if not path.is_dir():
        raise AdapterError(f"{path} exists and is not a folder; choose another output path")
    if exchange(tmp, path):  # path now holds the new folder and tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / "x")  # between these two renames a crash leaves the old folder in ``old``
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old / "x", path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing_dir(path: Path, *, tmp_prefix: Optional[str] = None, name_errors: bool = True,
                keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``path``; when the block ends without error, its files are synced and
    the folder is swapped in at ``path``. On any error the temporary folder is removed and ``path`` is unchanged;
    with ``name_errors``, write failures become an ``OSError`` naming ``path``.

    Args:
        tmp_prefix: name prefix of the temporary folder (default ``.NAME.tmp-``).
        name_errors: turn write failures into ``OSError("could not write PATH ...")``.
        keep_existing: if ``path`` appears while writing, keep it and drop this copy (caches).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix or f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        usual_permissions(tmp)
        _swap_in(tmp, path, keep_existing)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not name_errors:
            raise
        raise write_error(e, path) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder via ``write(tmpdir)`` and swap it in at ``path`` (see ``writing_dir``)."""
    with writing_dir(path) as tmp:
        write(tmp)
    return Path(path)


def replace_file(path: Path, write: Callable[[Path], None], *, tmp_prefix: Optional[str] = None) -> Path:
    """Write one file via ``write(tmpfile)`` into a uniquely named hidden file beside ``path`` and rename it over
    ``path``; on any error the temporary file is removed and ``path`` is unchanged."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=tmp_prefix or f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        usual_permissions(tmp)
        os.replace(tmp, path)
    except WRITE_ERRORS as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Replace a text file atomically."""
    return replace_file(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data, *, indent: Optional[int] = 2, sort_keys: bool = False) -> Path:
    """Replace a JSON file atomically."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys))


def write_figure(path: Path, fig, *, dpi: int = 110) -> Path:
    """Replace an image file atomically with a matplotlib figure (the format from ``path``'s suffix, e.g. png: the
    temporary file's own suffix would tell savefig nothing)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return replace_file(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def append_line(path: Path, text: str) -> None:
    """Append one line to a log that is read while it grows (a run's metrics.jsonl), creating it if needed.

    Not a replace: the log is appended to at every logging step and read by another process (tune's watcher) as it
    grows. Appending is safe here because each record is one ``write`` of one line, so a kill or a full disk can
    tear only the last line, and the readers (``read_jsonl``) skip a line that does not parse; a resumed run
    rewrites the log (``write_text``) with the records it keeps.
    """
    with open(path, "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def read_jsonl(path: Path) -> list:
    """The records of a JSON-lines log (``append_line``'s), [] when it does not exist; a line that does not parse
    (torn by a kill or a full disk) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_json(path: Path, *, error: Type[Exception] = AdapterError, what: str = ""):
    """A JSON file's value; ``error`` (AdapterError unless given) naming the file when it is missing, unreadable or
    not valid JSON. ``what`` ends the missing-file message (e.g. "; pass the base model's transformers folder")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist{what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not valid JSON ({e}): it is not UTF-8 text") from None
