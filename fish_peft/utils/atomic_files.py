"""Write files and folders so that a crash mid-write never leaves a half-written version under the final name.

What a save writes gets the usual modes, 0666 for files and 0777 for folders less the umask, not the 0600 / 0700 of
`tempfile` or of writers that stage through one (safetensors 0.8 does): it is the user's output, which their group
or their web server may need to read. A file or folder that is replaced keeps the mode it had.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional

_RENAME_EXCHANGE = 2  # linux/fs.h

# Which entries of the previous version a save replaces, by their path relative to the folder ("a", "sub/b").
Owns = Callable[[str], bool]


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; on success move it into place, on error remove it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _new_sibling(Path(path), "tmp", _create_file)
    usual = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask, as `open` made it
    try:
        yield str(tmp)
        os.chmod(tmp, _mode_of(Path(path), usual))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, owns: Optional[Owns] = None):
    """Yield an empty staging folder next to `path`; on success it replaces `path` as a whole, on error it is removed.

    Files that belong together (an adapter's config and weights, the results and card that describe them) thus
    change together: until the swap, readers and a process killed mid-save see the previous folder complete. The swap
    is one atomic `renameat2(RENAME_EXCHANGE)` on Linux; elsewhere the old folder is renamed aside first, so a crash
    between the two renames leaves it, complete, under `.NAME.old-*`.

    Only what the save owns of the previous folder is dropped: `owns(relative_path)` says which entries those are
    (by default, the names the new version writes). Every other entry (a user's notes, an earlier experiment's
    sub-folder) is hard-linked into the new version before the swap (copied where the file system has no hard links),
    so it is in the folder at every moment, and after the swap the previous version's own entries are moved over
    those links, so that a file created or replaced while the save ran is kept too. The staging folders of saves that
    were killed are removed (one save of a folder runs at a time); they hold only this save's files and links.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(path, "saving", _create_folder)
    usual = stat.S_IMODE(staging.stat().st_mode)  # 0777 less the umask, as `mkdir` made it
    try:
        yield staging
        _give_usual_modes(staging, usual)
        owns = owns or _writes(staging)
        if path.is_dir():
            _carry_over(path, staging, owns)
            shutil.copymode(path, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, path, owns)
    for leftover in (*path.parent.glob(f".{path.name}.saving-*"), *path.parent.glob(f".{path.name}.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _writes(staging: Path) -> Owns:
    """The default ownership: a save owns the top-level names it writes, whatever lies beneath them."""
    written = {entry.name for entry in staging.iterdir()}
    return lambda relative: relative.split("/", 1)[0] in written


def _carry_over(old: Path, new: Path, owns: Owns, prefix: str = "") -> None:
    """Hard-link into `new` every entry of `old` the save does not own (recursively, keeping folders' modes). A
    folder that held only owned entries is not carried; an empty one is."""
    for entry in sorted(old.iterdir()):
        relative = prefix + entry.name
        target = new / entry.name
        if owns(relative) or target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            target.mkdir()
            _carry_over(entry, target, owns, relative + "/")
            shutil.copystat(entry, target)
            if not any(target.iterdir()) and any(entry.iterdir()):
                target.rmdir()
        else:
            _link(entry, target)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _swap_in(staging: Path, path: Path, owns: Owns) -> None:
    """Put `staging` in place of `path` and settle the previous version into it."""
    if not path.exists():
        os.rename(staging, path)
    elif _exchange(staging, path):
        _settle(staging, path, owns)  # `staging` now holds the previous version
    else:
        aside = _new_sibling(path, "old", _create_folder)
        os.rename(path, aside / path.name)
        os.rename(staging, path)
        _settle(aside / path.name, path, owns)
        aside.rmdir()


def _settle(previous: Path, new: Path, owns: Owns, prefix: str = "") -> None:
    """Remove what the save owns from the previous version and move the rest into the new one: over the links
    carried there (the same files), and anything created or replaced in the folder while the save ran."""
    for entry in list(previous.iterdir()):
        relative = prefix + entry.name
        if entry.is_dir() and not entry.is_symlink() and not owns(relative):
            _settle(entry, new / entry.name, owns, relative + "/")
        elif not owns(relative):
            new.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # a folder of the new version under that name: it stays
                os.replace(entry, new / entry.name)
    shutil.rmtree(previous, ignore_errors=True)


def _new_sibling(path: Path, kind: str, create: Callable[[Path], None]) -> Path:
    """A new hidden file or folder `.NAME.KIND-RANDOM` next to `path`, made by `create` (which fails if it exists)."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{kind}-{secrets.token_hex(4)}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"Could not create a temporary name next to {path}; remove the .{path.name}.{kind}-* entries there.")


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _create_folder(path: Path) -> None:
    os.mkdir(path, 0o777)


def _mode_of(previous: Path, usual: int) -> int:
    """A replaced file keeps its mode (a user may have made it private, or shared it); a new one gets `usual`."""
    try:
        return stat.S_IMODE(os.stat(previous).st_mode)
    except FileNotFoundError:
        return usual


def _give_usual_modes(staging: Path, folder_mode: int) -> None:
    """What the save wrote gets the umask's modes, whatever its writers chose (before anything is carried over:
    those are the user's files, with their own modes)."""
    for path in staging.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, folder_mode if path.is_dir() else folder_mode & 0o666)


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
