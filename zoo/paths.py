"""The rules every command follows for the paths it reads and writes.

* Paths are made absolute once, where they enter (`resolve`): orbax reads a relative
  checkpoint path differently from an absolute one, and a command may change
  directory, so nothing below the edge ever sees a relative path.
* A command never deletes or replaces what it did not write. A directory it creates
  (an HF export, a converted checkpoint, a fine-tuning run) must not exist yet or be
  empty (`check_new_dir`), must not be or overlap the source it reads, and is built
  in a temporary sibling that is renamed into place only when complete
  (`staged_dir`), with the permissions the umask gives (not mkdtemp's 0700).
* A run directory that resumes (`train.py --out`) may hold only its own run; one
  process at a time writes it (`RunLock`).

Refusals are `OutputError` (a ValueError): one line naming the flag and the path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


class OutputError(ValueError):
    """An output path that cannot be written without harming what is there."""


def resolve(path: str | os.PathLike) -> Path:
    """`path` absolute (user home expanded), without following symlinks."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _overlaps(a: Path, b: Path) -> bool:
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a in b.parents or b in a.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: str | os.PathLike, *, flag: str) -> Path:
    """`path` resolved; refused when the nearest existing ancestor is not a writable directory."""
    out = resolve(path)
    base = _nearest_existing(out.parent)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {base} (permission denied)")
    return out


def check_new_dir(path: str | os.PathLike, *, flag: str, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """`path` resolved, once it is known to be safe to create: absent or an empty directory,
    not a file, not inside or around any of `sources`, and in a writable place."""
    out = resolve(path)
    for src in sources:
        if _overlaps(out, resolve(src)):
            raise OutputError(f"{flag} {path} is or overlaps the source {src}; write to a new directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{flag} {path} is a file; pass a new directory")
        entries = sorted(os.listdir(out))
        if entries:
            raise OutputError(f"{flag} {path} is not empty ({len(entries)} entries, e.g. {entries[0]!r}); "
                              "pass a new or empty directory (nothing in it was touched)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {path}: cannot write in it (permission denied)")
        return out
    return check_writable_parent(out, flag=flag)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside `path`; on success it becomes `path` (which must be
    absent or empty: see `check_new_dir`), on any error it is removed and `path` is untouched."""
    out = resolve(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a published dir follows the umask
        yield tmp
        if out.is_dir() and not out.is_symlink():
            os.rmdir(out)  # only ever empty here: rmdir refuses otherwise, and nothing is lost
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_for_writing(path: str | os.PathLike, *, flag: str, mode: str = "w"):
    """`open(path, mode)` with a one-line OutputError (naming `flag`) instead of an OSError."""
    target = resolve(path)
    if target.is_dir():
        raise OutputError(f"{flag} {path} is a directory; pass a file path")
    check_writable_parent(target, flag=flag)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, mode, encoding=None if "b" in mode else "utf-8")
    except OSError as e:
        raise OutputError(f"{flag} {path}: {e.strerror}") from None


class RunLock:
    """An exclusive advisory lock on `<run>/.lock` (fcntl.flock): a second process writing the
    same run directory is refused at once. The kernel drops the lock when the holder exits,
    however it exits (kill -9 too), so a stale lock file never blocks a resume."""

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike, *, flag: str = "--out"):
        import fcntl

        self.path = resolve(run_dir) / self.NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise OutputError(f"{flag} {run_dir} is in use by {holder}; wait for it to finish or pass another "
                              f"{flag}") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()}\n")
        self._fh.flush()

    def release(self) -> None:
        """Drops the lock (also done by the kernel when the process exits)."""
        import fcntl

        if not self._fh.closed:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()


__all__ = ["OutputError", "resolve", "check_new_dir", "check_writable_parent", "staged_dir", "open_for_writing",
           "RunLock"]
