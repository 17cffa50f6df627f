"""Build the C++ custom ops of src/ops once, on first use, into a cache folder: one library with
every kernel (the convolutions, GroupNorm, trained BatchNorm, the gradient norm, the stem's
max-pool, the FPN's upsample-and-add), so that they share one thread pool (runtime.h).

The library is compiled with g++ against the oneDNN headers of the PyPI package onednn-devel and
linked to the libdnnl.so.3 that the MindSpore wheel ships (one oneDNN in the process). It lands
in <cache>/<digest of sources, headers' version, libdnnl, compiler version and flags>/, built by
one process under a file lock, written to a temporary name and renamed; a cache entry that
another user owns or can write to is refused. OpsUnavailable says in one line what is wrong.
"""
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("onednn_conv.cc", "group_norm.cc", "batch_norm.cc", "global_norm.cc", "pooling.cc", "upsample.cc")
HEADERS = ("runtime.h", "norm_loops.h")
LIBRARY_NAME = "libfcos_ops.so"
_LIBRARY = None


class OpsUnavailable(RuntimeError):
    """The custom ops cannot be built or loaded here (no compiler, no headers, no libdnnl)."""


def cache_root() -> str:
    """FCOS_OPS_CACHE, else ~/.cache/fcos_mindspore/ops."""
    return os.environ.get("FCOS_OPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fcos_mindspore", "ops")


def onednn_include() -> str:
    """The folder holding oneapi/dnnl/dnnl.hpp (ONEDNN_INCLUDE, else the environment's include folders)."""
    candidates = [os.environ.get("ONEDNN_INCLUDE", ""), os.path.join(sys.prefix, "include"),
                  os.path.join(sysconfig.get_paths()["data"], "include"), os.path.join(sys.base_prefix, "include")]
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "oneapi", "dnnl", "dnnl.hpp")):
            return folder
    raise OpsUnavailable('no oneDNN headers (oneapi/dnnl/dnnl.hpp): pip install --no-deps "onednn-devel>=2025,<2026", '
                         'or set ONEDNN_INCLUDE')


def mindspore_libdnnl() -> str:
    """The libdnnl.so.3 inside the installed mindspore package."""
    import mindspore

    path = os.path.join(os.path.dirname(mindspore.__file__), "lib", "libdnnl.so.3")
    if not os.path.isfile(path):
        raise OpsUnavailable(f"the mindspore package has no {path}")
    return path


def _header_version(include):
    with open(os.path.join(include, "oneapi", "dnnl", "dnnl_version.h"), encoding="utf-8") as f:
        return ".".join(re.findall(r"#define DNNL_VERSION_(?:MAJOR|MINOR|PATCH) (\d+)", f.read()))


COMPILE_TIMEOUT = 600  # seconds; g++ on the oneDNN headers takes ~10 s here
LOCK_TIMEOUT = 900  # seconds another process may hold the build lock before we give up


def _compiler_version(compiler):
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else compiler


def check_trusted(path: str) -> None:
    """OpsUnavailable (one line) unless path is owned by this user (or root) and writable by no one
    else, nor is its folder: a library loaded into the process runs as this user, so a cache that
    another user can write to could plant code."""
    uid = os.getuid()
    for item in (path, os.path.dirname(path)):
        info = os.stat(item)
        if info.st_uid not in (uid, 0):
            raise OpsUnavailable(f"refusing {item}: owned by uid {info.st_uid}, not by this user (uid {uid}); "
                                 "remove it or set FCOS_OPS_CACHE to a folder of your own")
        if info.st_mode & 0o022:
            raise OpsUnavailable(f"refusing {item}: writable by group or others (mode {info.st_mode & 0o777:o}); "
                                 "remove it or set FCOS_OPS_CACHE to a folder of your own")


@contextlib.contextmanager
def _build_lock(folder):
    """An exclusive lock on <folder>/.lock: one process builds, the others wait for its library."""
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OpsUnavailable(f"another process has held {folder}/.lock for {LOCK_TIMEOUT} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def build(sources: Sequence[str] = SOURCES, library_name: str = LIBRARY_NAME, headers: Sequence[str] = HEADERS) -> str:
    """Compile src/ops/<sources> into <cache>/<digest>/<library_name> unless there -> its path.

    The digest covers the sources, the headers, oneDNN's version, libdnnl, the compiler's version
    and every flag; the cache entry must be this user's and writable by no one else (check_trusted);
    concurrent processes (data-parallel ranks) build once under a file lock."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise OpsUnavailable("no C++ compiler (g++, or CXX) to build the oneDNN convolution")
    include, libdnnl = onednn_include(), mindspore_libdnnl()
    paths = [os.path.join(HERE, name) for name in sources]
    lib_dir = os.path.dirname(libdnnl)
    # -fopenmp-simd: the loops' simd pragmas, without an OpenMP runtime (the kernels share one pool)
    flags = ["-O2", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread", f"-I{include}", f"-I{HERE}"]
    links = [f"-L{lib_dir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib_dir}"]
    digest = hashlib.sha256()
    for path in paths + [os.path.join(HERE, name) for name in headers]:
        with open(path, "rb") as f:
            digest.update(f.read())
    stat = os.stat(libdnnl)
    digest.update(f"{_header_version(include)}|{libdnnl}|{stat.st_size}|{stat.st_mtime_ns}|{compiler}|"
                  f"{_compiler_version(compiler)}|{' '.join(flags + links)}".encode())
    folder = os.path.join(cache_root(), digest.hexdigest()[:16])
    target = os.path.join(folder, library_name)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as err:
        raise OpsUnavailable(f"cannot make the ops cache folder {folder}: {err.strerror}") from None
    check_trusted(folder)
    with _build_lock(folder):
        if os.path.isfile(target):
            check_trusted(target)
            return target
        tmp = f"{target}.{os.getpid()}.tmp"
        command = [compiler, *flags, *paths, "-o", tmp, *links]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0:
            if os.path.exists(tmp):
                os.remove(tmp)
            if done is None:
                raise OpsUnavailable(f"building {', '.join(sources)} took over {COMPILE_TIMEOUT} s; stopped")
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise OpsUnavailable(f"building {', '.join(sources)} failed: {first}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    return target


def library() -> str:
    """Path of the built custom-op library (built once per process, cached on disk)."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = build()
    return _LIBRARY


def loaded_library() -> Optional[str]:
    """The library's path when this process has built or loaded it, else None (compiled graphs
    name it: the compile cache keys on it)."""
    return _LIBRARY
