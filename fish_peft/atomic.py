"""Write files and folders so that a crash mid-write never leaves a half-written version under the final name."""

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; on success move it into place, on error remove it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield an empty staging folder next to `path`; on success it replaces `path` as a whole, on error it is removed.

    Files that belong together (an adapter's config and weights, the results and card that describe them) thus
    change together: until the swap, readers and a process killed mid-save see the previous folder complete. The swap
    is one atomic `renameat2(RENAME_EXCHANGE)` on Linux; elsewhere the old folder is renamed aside first, so a crash
    between the two renames leaves it, complete, under `.NAME.old-*`. The previous folder's contents are deleted, and
    so are the staging folders of saves that were killed (one save of a folder runs at a time).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.saving-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not path.exists():
        os.rename(staging, path)
    elif _exchange(staging, path):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous version
    else:
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.rename(path, aside / path.name)
        os.rename(staging, path)
        shutil.rmtree(aside, ignore_errors=True)
    for leftover in (*path.parent.glob(f".{path.name}.saving-*"), *path.parent.glob(f".{path.name}.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return result == 0
