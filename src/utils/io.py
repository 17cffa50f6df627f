"""One way to write a file that readers never see half-written and that survives a power loss:
write a temporary file in the same folder, flush it to disk, os.replace it onto the target
(atomic on POSIX and Windows), then flush the folder so that the rename itself is on disk."""
import contextlib
import glob
import json
import os
import re
from typing import Any, Iterator, List, Optional

TEMP_MARK = ".tmp"  # <root>.tmp<pid><ext>: the temporary name atomic_path uses
_TEMP_PATTERN = re.compile(r"\.tmp(\d+)(\.[^.]*)?(\.tmp)?$")


def fsync_path(path: str) -> None:
    """Flush a file's (or a folder's) contents and metadata to disk; folders where the platform
    cannot open them (Windows) are skipped."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: Optional[str] = None) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is flushed, replaces ``path`` and the
    folder is flushed; on error it is removed.

    The temporary name keeps the extension (or ends with ``suffix``), since some writers
    (ms.save_checkpoint, cv2.imwrite, ms.export) choose the format from it or append it; ``path``
    itself is written under exactly the name given.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    root, ext = os.path.splitext(path)
    if suffix is not None and ext != suffix:
        root, ext = path, suffix
    tmp = f"{root}{TEMP_MARK}{os.getpid()}{ext}"
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write obj as JSON to path through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def pid_alive(pid: int) -> bool:
    """Whether a process pid exists on this machine (another user's counts; a zombie does too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str, pattern: str = "*") -> List[str]:
    """Remove the temporaries atomic_path left in folder (names matching pattern) when the process
    that wrote them is gone (killed mid-write) -> the paths removed. A live writer's are kept; so
    are files of any other naming."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), pattern)):
        match = _TEMP_PATTERN.search(os.path.basename(path))
        if match and os.path.isfile(path) and not pid_alive(int(match.group(1))):
            os.remove(path)
            removed.append(path)
    return removed
