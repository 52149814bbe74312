"""All-or-nothing output dirs: write into a hidden sibling, rename into place at the very end.

A crash, Ctrl-C, SIGTERM, full disk or validation error leaves no half-written directory behind
and never touches an existing one unless the user asked for `--overwrite`. The rules:

- An output that overlaps an input (equal, parent or child, on the paths as given and as resolved
  through links, including the hub cache's `blobs/` dir a snapshot links into) is refused, with or
  without `--overwrite`: replacing it would delete what is being read.
- Each writer holds an flock on its own temp dir for as long as it lives. The next writer of the
  same OUT removes temp dirs whose lock it can take (their writer was killed) and refuses to start
  while one is still held (another live run writes that OUT).
- The final rename refuses to replace an OUT that appeared meanwhile (renameat2 RENAME_NOREPLACE):
  of two runs racing for one OUT, the second fails instead of silently replacing the first.
- Temp dirs honour the umask (mkdtemp's 0700 would otherwise become OUT's mode).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

from jaxvocab.errors import CheckpointError, JaxVocabError, UsageError, WriteError, fault_point, raise_if_interrupted

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


def _variants(p: Path) -> set[Path]:
    """The path as given (made absolute, `..` folded) and as resolved through links."""
    return {Path(os.path.abspath(p)), Path(os.path.realpath(p))}


def _input_paths(p: Path) -> set[Path]:
    """Every path whose loss would destroy input `p`: itself, and for a dir, where its links point
    (a linked file itself; a hub snapshot's whole `blobs/` dir)."""
    out = _variants(p)
    if p.is_dir():
        with contextlib.suppress(OSError):
            for n, f in enumerate(os.scandir(p)):
                if n > 10000:
                    break
                if f.is_symlink():
                    target = Path(os.path.realpath(f.path))
                    out.add(target.parent if target.parent.name == "blobs" else target)
    return out


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_overlap(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """Refuse an output that is, contains or lies inside an input or another output."""
    named_out = [(f, Path(p)) for f, p in outputs.items() if p is not None]
    named_in = [(f, Path(p)) for f, p in inputs.items() if p is not None]
    for i, (oflag, out) in enumerate(named_out):
        outs = _variants(out)
        read = "writing it would destroy what is read: choose an output outside the inputs"
        written = "two outputs cannot share a dir: choose separate dirs"
        others = [(f, _input_paths(p), p, read) for f, p in named_in]
        others += [(f, _variants(p), p, written) for f, p in named_out[i + 1 :]]
        for flag, paths, given, fix in others:
            if any(_overlaps(o, q) for o in outs for q in paths):
                raise UsageError(
                    f"{oflag} {out} overlaps {flag} {given} (same dir, inside it or containing it, "
                    f"through links too); {fix}"
                )


def check_output(out: Path, overwrite: bool, flag: str = "OUT") -> None:
    """Fail before any work when OUT cannot be written: a file, under a file, or existing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: is a file, not a directory; choose another {flag}")
    for parent in Path(os.path.abspath(out)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(
                    f"{flag} {out}: {parent} is a file, so no directory can be created under it; choose another {flag}"
                )
            break
    if out.exists() and not overwrite:
        raise UsageError(f"{flag} {out}: already exists; pass --overwrite to replace it or choose another {flag}")


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock_dir(path: Path, blocking: bool = False) -> int | None:
    """An open fd holding an exclusive flock on `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _sweep(out: Path) -> None:
    """Remove temp dirs of killed writers of `out`; refuse while a live writer holds one."""
    now = time.time()
    for d in out.parent.glob(f".{out.name}.new-*"):  # killed between mkdtemp and its rename below
        with contextlib.suppress(OSError):
            if now - d.stat().st_mtime > 60:
                shutil.rmtree(d, ignore_errors=True)
    for d in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            fd = _lock_dir(d)
        except OSError:
            continue
        if fd is None:
            raise CheckpointError(
                f"{out}: another jaxvocab run is writing it right now ({d.name} is locked); "
                "wait for it or choose another OUT"
            )
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


def _new_temp(out: Path, sweep: bool = True) -> tuple[Path, int]:
    """A locked, umask-honouring temp sibling. It is created under another name and renamed once
    locked, so a concurrent sweep never sees a `.tmp-` dir unlocked."""
    if sweep:
        _sweep(out)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    fd = _lock_dir(new)
    tmp = new.with_name(new.name.replace(".new-", ".tmp-", 1))
    os.rename(new, tmp)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp, fd


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing `dst` (Linux renameat2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists():
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    trash = None
    if out.exists() and overwrite:
        trash, trash_fd = _new_temp(out, sweep=False)
        os.rename(out, trash / "old")
    try:
        _rename_noreplace(tmp, out)
    except FileExistsError:
        raise CheckpointError(
            f"{out}: appeared while this run was writing it (another run?); it was left as is "
            "and this run's result discarded; choose another OUT or pass --overwrite"
        ) from None
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
            os.close(trash_fd)


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e` (libraries such as orbax wrap it), if any."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e, seen = e.__cause__ or (None if e.__suppress_context__ else e.__context__), seen + 1
    return None


def _fs_errno(e: BaseException, where: Path) -> int | None:
    """The errno behind a failed write: from an OSError in the chain, from the text of a library
    error that carries one (tensorstore: os_error_code='28'), or from the filesystem's own state."""
    os_err = os_error_in(e)
    if os_err is not None:
        return os_err.errno
    m = re.search(r"os_error_code='?(\d+)", str(e))
    if m:
        return int(m.group(1))
    with contextlib.suppress(OSError):
        st = os.statvfs(where)
        if st.f_flag & os.ST_RDONLY:
            return errno.EROFS
        if st.f_bavail * st.f_frsize < (1 << 20):
            return errno.ENOSPC
    return None


def write_error(out: Path, e: BaseException) -> WriteError | None:
    """A one-line error for a failed write (full or read-only disk, ...), or None if not a filesystem error.
    Call it before removing the temp dir: a full disk stops looking full once that is gone."""
    code = _fs_errno(e, out.parent if out.parent.exists() else Path("/"))
    if code is None:
        return None
    hint = "free some space or choose another OUT" if code in _NO_SPACE else "check the target filesystem"
    return WriteError(out, os.strerror(code), hint)


@contextlib.contextmanager
def signals_blocked():
    """Cleanup must finish: a second Ctrl-C must not leave half a temp dir behind."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove(tmp: Path, settle: int = 5, limit: float = 3.0) -> None:
    """rmtree, until the dir has stayed gone for `settle` checks 20 ms apart. After a failed orbax
    write (a full disk) tensorstore can still finish a few small files, re-creating the tree after
    the first rmtree (seen in ~1 run in 10 once orbax's failure logs were muted and cleanup came sooner)."""
    deadline, gone = time.monotonic() + limit, 0
    while gone < settle and time.monotonic() < deadline:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            gone = 0
        else:
            gone += 1
        time.sleep(0.02)


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
    out = Path(out)
    check_output(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _new_temp(out)
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield tmp
        raise_if_interrupted()
        fault_point("atomic:rename")
        with signals_blocked():
            _publish(tmp, out, overwrite)
    except BaseException as e:
        err = write_error(out, e) if isinstance(e, Exception) and not isinstance(e, JaxVocabError) else None
        with signals_blocked():
            _remove(tmp)
        if err is not None:
            raise err from None
        raise
    finally:
        os.close(fd)
