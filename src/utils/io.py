"""One way to write a file that readers never see half-written: write a temporary file in the
same folder, then os.replace it onto the target (atomic on POSIX and Windows)."""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temporary name keeps the extension, since some writers (ms.save_checkpoint, cv2.imwrite,
    ms.export) choose the format from it or append it.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path, obj):
    """Write obj as JSON to path through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
