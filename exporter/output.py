"""The output folder: built under a hidden name next to it, put in place in one step, never half there.

An export writes into `.NAME.pidPID.XXXX.partial` beside `NAME` and renames it into place at the end. With
`--force` the new folder and the old one swap places in one atomic rename (Linux renameat2 RENAME_EXCHANGE),
then the old one is deleted; where the file system cannot swap, the old folder is renamed aside to
`.NAME.pidPID.XXXX.old` first. Either way `NAME` is at every moment absent, the old export or the new one.

A killed export (SIGKILL, power loss) leaves its hidden folder behind; the next export to the same name removes
those whose owner process is gone (a live pid may be a concurrent export: left alone), and puts back an `.old`
folder if it was renamed aside and `NAME` is missing.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.pid(?P<pid>\d+)\.[^.]+\.(?P<kind>partial|old)$")


def check_output(out: Path, force: bool) -> None:
    """Refuse up front what would fail at the end or destroy something that is not an earlier export."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"is inside {parent}, a file"
            raise NotADirectoryError(f"--out {out} {where}, not a folder; choose another --out")
    if not out.exists():
        return
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():  # --force --out ~ must not delete a home folder
        raise FileExistsError(f"{out} is not an export (no {MANIFEST}) and not empty; --force replaces only a "
                              "folder gemma3-export wrote: choose another --out")


def new_partial(out: Path) -> Path:
    """A fresh private folder beside `out`, named after this process so a later run can tell it is stale."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.pid{os.getpid()}.", suffix=".partial", dir=out.parent))


def clean_stale(out: Path) -> list[Path]:
    """Remove the hidden folders of earlier exports to `out` whose process is gone; returns what it removed."""
    removed = []
    for hidden in sorted(out.parent.glob(f".{glob.escape(out.name)}.pid*")):
        found = _HIDDEN.match(hidden.name)
        if not found or found["name"] != out.name or not hidden.is_dir() or _alive(int(found["pid"])):
            continue
        if found["kind"] == "old" and not out.exists() and (hidden / MANIFEST).is_file():
            hidden.rename(out)  # killed between the two renames of a replacement: the old export comes back
            log.info("restored %s from %s (an export replacing it was killed)", out, hidden.name)
            continue
        shutil.rmtree(hidden, ignore_errors=True)
        log.info("removed %s (left by export process %s, which is gone)", hidden, found["pid"])
        removed.append(hidden)
    return removed


def put_in_place(work: Path, out: Path, force: bool) -> None:
    """Rename the finished `work` folder to `out`, replacing an old `out` only with `force`."""
    work.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary one
    if not out.exists():
        work.rename(out)  # fails if another process put a non-empty `out` there meanwhile
        return
    if not force:
        raise FileExistsError(f"{out} appeared during the export; pass --force to replace it")
    if _exchange(work, out):
        shutil.rmtree(work)  # the old export, now under the hidden name (a kill here: clean_stale's job)
        return
    aside = work.with_name(work.name.removesuffix(".partial") + ".old")
    out.rename(aside)
    try:
        work.rename(out)
    except BaseException:
        aside.rename(out)  # the old export stays where it was
        raise
    shutil.rmtree(aside)


def describe_os_error(e: OSError, out: Path) -> str:
    """One line for a failed write: which file, what went wrong, and the fix."""
    where = e.filename or out
    if e.filename and Path(e.filename).parent.name.startswith(f".{out.name}.pid"):  # a file of our partial folder
        where = f"{out} (writing {Path(e.filename).name})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: no space left on device; the partial export was removed, nothing was written (free "
                "some space, or choose another --out)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {e.strerror} (no permission to write there); choose a writable --out"
    if e.errno is None:
        return str(e)
    return f"{where}: {e.strerror}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where this system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
