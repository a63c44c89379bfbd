"""The atomic store: immutable version folders and one pointer file.

A checkpoint is a folder holding

- ``jaxflat.json``: the description of the current version (it names its
  folder), replaced in one ``os.replace``: that replacement is the commit;
- ``arrays-<hex>/``: one folder per version, written once and never changed
  (an ordinary Orbax item);
- ``.jaxflat.lock``: the writers' lock file (``flock``), never deleted
  while a checkpoint is there.

A save, under the lock, writes a new version folder, fsyncs every file and
folder in it, then replaces ``jaxflat.json``. A SIGKILL at any moment leaves
the old pointer (and its folder) or the new one. A reader reads the pointer,
takes a shared ``flock`` on the folder it names and reads the pointer again:
if it still names that folder, no one deletes it until the reader lets go.
Old version folders are deleted by the next save, or by their last reader,
when no reader holds them; leftovers of killed saves by the next save.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._errors import LoadError

META = "jaxflat.json"
LOCK = ".jaxflat.lock"
MAX_META_BYTES = 256 * 2**20  # a description larger than this is not read
VERSION = re.compile(r"arrays-[0-9a-f]{32}(?![0-9a-f.])")
READ_RETRIES = 200  # a reader that keeps losing the race to saves gives up after this


def ours(name: str) -> bool:
    """Names a checkpoint folder may hold (killed saves' leftovers included)."""
    return name in (META, LOCK) or name.startswith(("arrays-", f".{META}.tmp-"))


def read_text(file: Path, limit: int = MAX_META_BYTES) -> str:
    """A small text file's contents: not through a symbolic link, not from a
    FIFO or device (never blocks), at most ``limit`` bytes."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LoadError(
                f"{file} is a symbolic link; a checkpoint's files are never links"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoadError(f"{file} is not a regular file")
        if st.st_size > limit:
            raise LoadError(
                f"{file} holds {st.st_size} bytes, more than the {limit} a description may"
            )
        data = bytearray()
        while chunk := os.read(fd, 1 << 20):
            data += chunk
            if len(data) > limit:
                raise LoadError(f"{file} grew past {limit} bytes while it was read")
    finally:
        os.close(fd)
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise LoadError(f"{file}: corrupt {META}: not UTF-8 text ({e})") from None


def is_checkpoint(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path / META).st_mode)
    except OSError:
        return False


def _flock(fd: int, op: int) -> bool | None:
    """True: locked; False: busy (with LOCK_NB); None: the file system has no flock."""
    try:
        fcntl.flock(fd, op)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, then ``folder``."""
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            fsync(Path(root) / name)
    fsync(folder)


def remove(folder: Path) -> bool:
    """Delete a version folder unless a reader holds it; True if it is gone."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:  # a file or a link: nothing reads it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder)
        return True
    try:
        if _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) is False:
            return False  # a reader holds it; the next save or its last reader removes it
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """The per-checkpoint writer lock (threads and processes alike)."""
    while True:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            _flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path / LOCK).st_ino:
                    break  # else a failed first save removed the folder meanwhile
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a jaxflat checkpoint; touch nothing."""
    if not os.path.lexists(path):
        return
    hint = "overwrite=True replaces only a jaxflat checkpoint; it was left untouched"
    if path.is_symlink():
        raise FileExistsError(f"save: {path} is a symbolic link, not a jaxflat checkpoint; {hint}")
    if not path.is_dir():
        raise FileExistsError(f"save: {path} is a file, not a jaxflat checkpoint; {hint}")
    others = sorted(n for n in os.listdir(path) if not ours(n))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(
            f"save: {path} is a folder but not a jaxflat checkpoint (it holds {shown}); {hint}"
        )
    if is_checkpoint(path) and not overwrite:
        raise FileExistsError(f"save: {path} exists; pass overwrite=True to replace it")


def clean(path: Path) -> None:
    """Under the writer lock: remove every version folder the pointer does not
    name and no reader holds, and the pointer files of killed saves."""
    try:
        keep = set(VERSION.findall(read_text(path / META)))
    except (OSError, LoadError):  # no pointer (or a damaged one): keep every whole version
        keep = (
            {n for n in os.listdir(path) if VERSION.fullmatch(n)} if is_checkpoint(path) else set()
        )
    for name in os.listdir(path):
        if name.startswith(f".{META}.tmp-"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path / name)
        elif name.startswith("arrays-") and name not in keep:
            remove(path / name)


def commit(path: Path, version: str, text: str, token: str) -> None:
    """Make ``version`` (complete, fsynced) the checkpoint: replace the pointer."""
    tmp = path / f".{META}.tmp-{token}"
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / META)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync(path)


def discard(path: Path, version: str, created: bool) -> None:
    """After a failed save: remove its version (and the folder it created)."""
    for name in os.listdir(path) if path.is_dir() else ():
        if name == version or name.startswith(f"{version}."):
            shutil.rmtree(path / name, ignore_errors=True)
    if created and not is_checkpoint(path):
        with contextlib.suppress(OSError):
            if set(os.listdir(path)) <= {LOCK}:
                os.unlink(path / LOCK)
                os.rmdir(path)


@contextlib.contextmanager
def reading(path: Path, parse: Callable[[str], tuple[Any, str]]) -> Iterator[tuple[Any, Path]]:
    """Yield ``(parse(pointer text)[0], version folder)`` for one whole
    checkpoint, held against deletion until the block ends."""
    if not is_checkpoint(path):
        what = "nothing" if not os.path.lexists(path) else "no jaxflat checkpoint"
        raise FileNotFoundError(f"no checkpoint at {path} ({what} there)")
    for attempt in range(READ_RETRIES):
        if attempt:
            time.sleep(min(0.001 * attempt, 0.02))
        text = read_text(path / META)
        meta, version = parse(text)
        if not VERSION.fullmatch(version):
            raise LoadError(f"{path / META}: corrupt {META}: bad version folder {version!r:.60}")
        folder = path / version
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if read_text(path / META) == text:
                raise LoadError(
                    f"{path}: corrupt checkpoint: its folder {version}/ is missing"
                ) from None
            continue  # replaced and removed since the pointer was read
        except OSError as e:
            raise LoadError(f"{folder} is not a folder (a link, or a file): {e.strerror}") from None
        try:
            if _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB) is False or read_text(path / META) != text:
                continue  # being removed, or no longer current: read the new one
            try:
                yield meta, folder
            finally:
                with contextlib.suppress(OSError, LoadError):  # the last reader of an old version
                    if read_text(path / META) != text and _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                        shutil.rmtree(folder, ignore_errors=True)
            return
        finally:
            os.close(fd)
    raise LoadError(
        f"{path}: replaced by other saves {READ_RETRIES} times while it was read; try again"
    )
