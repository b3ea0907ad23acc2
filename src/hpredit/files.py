"""Atomic writes (files and whole directories), output-directory checks and checksums.

Everything hpredit writes goes through here: a file is written to a temporary sibling, flushed
and renamed into place; a directory is built in a temporary sibling and renamed whole. Readers
never see half an artifact, and temporary siblings are removed on any exit (exceptions,
KeyboardInterrupt, and SIGTERM once the CLI turns it into an exception).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; temporaries are then never taken for live ones
    fcntl = None  # type: ignore[assignment]

from .errors import HpreditError

__all__ = [
    "DiskFullError",
    "atomic_directory",
    "check_output_dir",
    "current_umask",
    "file_digest",
    "read_json",
    "remove_stale_temporaries",
    "sha256_file",
    "write_json_atomic",
    "write_text_atomic",
]


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``sha256`` for editors; ``blake2b``, ~2× faster here, for large stores)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    return file_digest(path, "sha256")


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling, fsync and ``os.replace``.

    The file is either the old version or the new one, never half written; its permissions are the
    usual ones for the umask (not ``mkstemp``'s private 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(tmp_name)
    _lock(fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except Exception as e:
        if _disk_full(e):
            raise DiskFullError(path, len(text.encode("utf-8")), exact=True) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON (plus a final newline) with :func:`write_text_atomic`."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings an interrupted write of ``target`` left.

    Returns what was removed. Used before overwriting ``target`` (``--force``).
    """
    removed = []
    for stale in _temporaries(target):
        if _in_use(stale):  # another process is writing it right now
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()
        removed.append(stale)
    return removed


def _temporaries(target: str | os.PathLike) -> list[Path]:
    target = Path(target)
    if not target.name or not target.parent.is_dir():
        return []
    return [p for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*") for p in target.parent.glob(pattern)]


def _lock(fd: int) -> bool:
    """Hold an exclusive advisory lock on ``fd`` (released when it closes, or when the process dies,
    even by SIGKILL): marks a temporary as being written. False only when another process holds it
    (a filesystem without locks counts as unlocked)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # no locks here (some network filesystems)
        pass
    return True


def _in_use(path: Path) -> bool:
    """Whether a live process holds the lock of temporary ``path`` (see :func:`_lock`)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return not _lock(fd)
    finally:
        os.close(fd)


def _hold(path: Path) -> int | None:
    """A descriptor of ``path`` holding its lock (None where locks do not exist, e.g. Windows)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    _lock(fd)
    return fd


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` (an OSError, or another library's error such as safetensors') says the disk is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class DiskFullError(HpreditError):
    """The disk filled while writing ``target``; ``written`` bytes had been written by then (a lower
    bound of what the output needs). An enclosing :func:`atomic_directory` re-raises it naming its
    own target, so the message names what the user asked for, not a temporary directory."""

    def __init__(self, target: Path, written: int, exact: bool = False):
        self.target, self.written = target, written
        try:
            free = shutil.disk_usage(target.parent if target.parent.exists() else ".").free
        except OSError:
            free = 0
        if exact:
            need = f"it needs {_size(written)}, {_size(free)} free"
        elif written:
            need = f"it needs more than {_size(written)} (written when the disk filled), {_size(free)} free"
        else:
            need = f"it needs more than the {_size(free)} free there"
        super().__init__(
            f"no space left on the device to write {target}: {need}; nothing was kept: "
            "free some space or choose another place"
        )


def _tree_size(root: Path) -> int:
    total = 0
    for here, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(here, name)).st_size
    return total


def check_output_dir(
    path: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike | None] = ()
) -> None:
    """Refuse an output directory that cannot be written, before any work is done.

    One :class:`HpreditError` each for: an empty name, the current directory or one of its
    parents (the output is replaced whole); a directory holding one of ``inputs`` (files or
    directories the run reads); one another process is writing right now; an existing path that
    is not a directory; a non-empty directory without ``force``; a location where nothing can be
    created (probed by creating the missing parents and a temporary file, both removed again).
    """
    path = Path(path)
    if not str(path).strip():
        raise HpreditError("empty output directory name: choose an --out")
    here, resolved = Path.cwd().resolve(), path.expanduser().resolve()
    if here == resolved or here.is_relative_to(resolved):
        what = "the current directory" if here == resolved else f"a parent of the current directory ({here})"
        raise HpreditError(f"output directory {str(path)!r} is {what}: writing replaces it whole; choose a new one")
    _refuse_own_inputs(path, resolved, inputs)
    busy = [p for p in _temporaries(path) if _in_use(p)]
    if busy:
        raise HpreditError(
            f"another process is writing {path} right now ({busy[0].name} is in use): wait for it or choose another"
        )
    if path.exists() and not path.is_dir():
        raise HpreditError(f"output {path} exists and is not a directory: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise HpreditError(f"output directory {path} is not empty: pass --force to overwrite it, or choose another")
    _probe_writable(path)


def _refuse_own_inputs(path: Path, resolved: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output directory (``resolved``) holding one of the run's ``inputs``: writing replaces it whole."""
    for given in inputs:
        if given is None or not str(given).strip():
            continue
        source = Path(given).expanduser()
        if source.exists() and source.resolve().is_relative_to(resolved):
            raise HpreditError(
                f"output directory {path} holds the input {source}: writing it would replace its own input; "
                "choose another --out"
            )


def _probe_writable(path: Path) -> None:
    """Refuse a ``path`` nothing can be created at: make its missing parents and a temporary file, then remove them."""
    # The nearest existing ancestor must let us create the directory (or a file inside it).
    probe_dir = path if path.is_dir() else path.parent
    created: list[Path] = []
    try:
        missing = []
        p = probe_dir
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        if p.exists() and not p.is_dir():
            raise HpreditError(f"cannot create output directory {path}: {p} is not a directory")
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        fd, tmp = tempfile.mkstemp(prefix=".hpredit-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise HpreditError(f"cannot write to output directory {path}: {reason}") from None
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()


def _finish_tree(root: Path) -> None:
    """Give ``root`` and everything below it the usual permissions for the umask (``mkdtemp`` makes
    directories private) and flush every file to disk; symlinks are left alone."""
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for here, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~umask)
        for name in files:
            path = os.path.join(here, name)
            if os.path.islink(path):
                continue
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(here))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target`` whole.

    A crash or exception inside the block (KeyboardInterrupt and SIGTERM-turned-exception included)
    leaves ``target`` as it was (absent or the old version) and removes the temporary directory in
    ``finally``, so readers never see a half-written artifact. The temporary directory is locked
    while it is written: what a killed earlier write left (SIGKILL runs no ``finally``) is removed
    on entry, a live writer's never. A non-empty ``target`` that was there on entry is replaced;
    one another process wrote meanwhile is not (one :class:`HpreditError`). A full disk is one
    :class:`DiskFullError` naming ``target``.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise HpreditError(f"{target} exists and is not a directory")
    remove_stale_temporaries(target)  # what a killed earlier write left (never a live writer's)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise HpreditError(f"cannot write {target}: {e.strerror or type(e).__name__}") from None
    # What was there when we started is replaced; something another process wrote meanwhile is not.
    replace = target.is_dir() and any(target.iterdir())
    lock: int | None = None
    old: Path | None = None
    try:
        lock = _hold(tmp)
        try:
            yield tmp
            _finish_tree(tmp)
        except DiskFullError as e:  # an inner write (a file, or a nested directory already removed)
            raise DiskFullError(target, e.written + _tree_size(tmp)) from None
        except Exception as e:
            if _disk_full(e):
                raise DiskFullError(target, _tree_size(tmp)) from None
            raise
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "d")
        try:
            os.rename(tmp, target)  # fails on a non-empty directory: never replaces another process's output
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR) and not replace:
                raise HpreditError(
                    f"{target} was written by another process while this one worked: it is left as it is "
                    "and this result was not saved (choose another output, or --force to replace)"
                ) from None
            raise
        _fsync_dir(target.parent)
    finally:
        if lock is not None:
            os.close(lock)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not target.exists() and (old / "d").exists():  # interrupted between the two renames
                with contextlib.suppress(OSError):
                    os.rename(old / "d", target)
            shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object, turning every failure into one clear :class:`HpreditError`."""
    if not path.is_file():
        raise HpreditError(f"{what}: {path} is missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HpreditError(f"{what}: {path} is not valid JSON ({e})") from None
    except RecursionError:
        raise HpreditError(f"{what}: {path} is not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise HpreditError(f"{what}: {path} must hold a JSON object")
    return obj
