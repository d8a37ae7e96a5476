"""Output folders: one writer at a time, checked writable before any work, cleaned of what a killed writer left.

    with lock_folder(out, "vitlab pareto"):      # creates `out` if needed; exit 2 if another process holds it
        ...                                      # write into out

The lock is `DIR/.vitlab.lock`, held with `flock` (released by the kernel when its process dies, even on kill -9)
and holding the holder's pid, host, command and start time, so that a second process can name who has the folder:
`FolderLocked` (a `UserError`: one line, exit 2). A lock file left by a killed process is taken over with a warning
that names the dead pid. Forked children (DataLoader workers) close their copy of the lock at fork, so a killed
run's orphaned workers do not keep its folder locked.

On taking the lock, files a killed writer left half-written are removed (`atomic_path`'s `.NAME.<random>.tmp`
files and unfinished `.vitlab-staging-*` folders), and a staged result whose commit was interrupted is finished
(`commit_staged`'s journal), so a folder never holds a half-written output after a crash.

`check_writable` is the same early check for verbs that write a few files and take no lock (eval, quantize,
export --out).

`kill_point(name)` is a test hook: with VITLAB_TEST_KILL_AT=name in the environment, the process kills itself
with SIGKILL there (tests/engine/test_crash_resume.py).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import warnings
from pathlib import Path

from ..errors import UserError
from .io import atomic_write_json

__all__ = ["FolderLocked", "OutputNotWritable", "FolderLock", "lock_folder", "check_writable", "commit_staged",
           "staging_folder", "abandon_staged", "kill_point", "LOCK_NAME"]

LOCK_NAME = ".vitlab.lock"
JOURNAL_NAME = ".vitlab-commit.json"
STAGING_PREFIX = ".vitlab-staging-"
_ATOMIC_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")   # atomic_path's tempfile.mkstemp names

_held_fds: set[int] = set()


def _close_in_child() -> None:
    # A forked child shares the parent's open lock; closing the child's copy leaves the parent's lock held but lets
    # it go when the parent dies, whatever the children still do.
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class FolderLocked(UserError):
    """Another process holds the output folder; names its pid and host."""


class OutputNotWritable(UserError):
    """The output folder cannot be created or written; names it."""


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _not_writable(folder: Path, flag: str, err: OSError) -> OutputNotWritable:
    why = err.strerror or type(err).__name__
    if isinstance(err, (NotADirectoryError, FileExistsError)) or (folder.exists() and not folder.is_dir()):
        why = "a file is in the way (it must be a folder)"
    return OutputNotWritable(f"{flag} {folder}: cannot write there: {why}; choose a folder you can write to")


def check_writable(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Create `folder` if needed and write and delete a temporary file in it; `OutputNotWritable` (exit 2, naming
    the folder) if that fails. A folder created only for this check is removed again."""
    folder = Path(folder)
    created = []
    try:
        missing = folder
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".vitlab-write-test-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise _not_writable(folder, flag, err) from None
    finally:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break
    return folder


class FolderLock:
    """An exclusive lock on an output folder (see the module docstring). Use `lock_folder` or `with FolderLock(...)`."""

    def __init__(self, folder: str | os.PathLike, command: str = "vitlab", flag: str = "--out"):
        self.folder, self.command, self.flag = Path(folder), command, flag
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.held = False
        self.created = False      # the folder did not exist: removed again on release if nothing was written

    def acquire(self) -> "FolderLock":
        try:
            self.created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _not_writable(self.folder, self.flag, err) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as err:
                raise _not_writable(self.folder, self.flag, err) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked_error() from None
                warnings.warn(f"{self.folder}: this file system has no file locks ({err.strerror}): a second "
                              "process writing the same folder is not detected", stacklevel=3)
                fd = None
                break
            try:   # the holder before us may have deleted the file between our open and our flock: start again
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_info(self.path)
        info = {"pid": os.getpid(), "host": _host(), "command": self.command,
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            data = json.dumps(info).encode()
            if fd is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            else:
                self.path.write_bytes(data)
        except OSError as err:
            if fd is not None:
                os.close(fd)
            raise _not_writable(self.folder, self.flag, err) from None
        self.fd, self.held = fd, True
        if fd is not None:
            _held_fds.add(fd)
        if previous.get("pid") and (previous.get("pid"), previous.get("host")) != (info["pid"], info["host"]):
            warnings.warn(f"{self.folder}: taking over the lock left by pid {previous['pid']} on "
                          f"{previous.get('host', '?')} ({previous.get('command', 'vitlab')}, since "
                          f"{previous.get('since', '?')}), which no longer holds it (killed?)", stacklevel=3)
        self._recover()
        return self

    def _locked_error(self) -> FolderLocked:
        info = {}
        for _ in range(20):   # the holder writes its pid right after taking the lock
            info = _read_info(self.path)
            if info.get("pid"):
                break
            time.sleep(0.05)
        pid, host = info.get("pid", "?"), info.get("host", "?")
        extra = ""
        if host == _host() and isinstance(pid, int) and not _pid_alive(pid):
            extra = (f"; pid {pid} is no longer running but a process it started still holds the lock: wait for "
                     "it to exit")
        return FolderLocked(f"{self.folder} is in use by {info.get('command', 'another vitlab process')} (pid {pid} "
                            f"on {host}, since {info.get('since', '?')}){extra}; wait for it to finish or choose "
                            f"another {self.flag}")

    def _recover(self) -> None:
        """Finish an interrupted commit and remove half-written files a killed writer left (we hold the lock)."""
        _roll_forward(self.folder)
        for entry in self.folder.iterdir():
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif _ATOMIC_TMP.match(entry.name) and entry.is_file():
                entry.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        try:
            self.path.unlink(missing_ok=True)   # while still holding it: see the inode check in acquire
        except OSError:
            pass
        if self.fd is not None:
            _held_fds.discard(self.fd)
            os.close(self.fd)
        self.fd, self.held = None, False
        if self.created:
            try:
                self.folder.rmdir()   # only if empty: a command that failed before writing leaves no folder
            except OSError:
                pass

    def __enter__(self) -> "FolderLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike, command: str = "vitlab", flag: str = "--out") -> FolderLock:
    """Take the lock on `folder` (creating it): `FolderLocked` if another process has it, `OutputNotWritable` if it
    cannot be written. Release with `.release()` or use the result as a context manager."""
    return FolderLock(folder, command, flag).acquire()


def staging_folder(folder: str | os.PathLike) -> Path:
    """A fresh hidden folder inside `folder` to write a result into before `commit_staged` moves it in."""
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))


def commit_staged(folder: str | os.PathLike, staging: str | os.PathLike) -> None:
    """Move every file of `staging` into `folder`, replacing files of the same name: all or (after a crash, once the
    folder's lock is taken again) all the same. A journal names the files first; `FolderLock` finishes an
    interrupted commit from it, and deletes a staging folder that has no journal (its writer died before it)."""
    folder, staging = Path(folder), Path(staging)
    names = sorted(p.name for p in staging.iterdir())

    atomic_write_json(folder / JOURNAL_NAME, {"staging": staging.name, "files": names})
    kill_point("commit-journaled")
    _roll_forward(folder)


def abandon_staged(folder: str | os.PathLike, staging: str | os.PathLike) -> None:
    """Delete `staging` unless a commit of it has begun (then the next lock of `folder` finishes that commit)."""
    folder, staging = Path(folder), Path(staging)
    if _read_info(folder / JOURNAL_NAME).get("staging") != staging.name:
        shutil.rmtree(staging, ignore_errors=True)


def _roll_forward(folder: Path) -> None:
    journal = folder / JOURNAL_NAME
    if not journal.is_file():
        return
    info = _read_info(journal)
    staging = folder / str(info.get("staging", ""))
    names = info.get("files", [])
    if not info.get("staging", "").startswith(STAGING_PREFIX) or not isinstance(names, list):
        journal.unlink()   # not ours: nothing to finish
        return
    for i, name in enumerate(names):
        if "/" in name or name.startswith("."):
            continue
        src = staging / name
        if src.exists():
            os.replace(src, folder / name)
        if i == 0:
            kill_point("commit-half")
    shutil.rmtree(staging, ignore_errors=True)
    journal.unlink(missing_ok=True)


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process here when VITLAB_TEST_KILL_AT equals `name` (see tests/engine/test_crash_resume.py)."""
    if os.environ.get("VITLAB_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
