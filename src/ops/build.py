"""Build the C++ custom ops of src/ops once, on first use, into a cache folder: one library with
every kernel (the convolutions, GroupNorm, trained BatchNorm, the gradient norm, the stem's
max-pool, the FPN's upsample-and-add), so that they share one thread pool (runtime.h).

The library is compiled with g++ against the oneDNN headers of the PyPI package onednn-devel and
linked to the libdnnl.so.3 that the MindSpore wheel ships (one oneDNN in the process). It lands
in <cache>/<digest of source, headers' version, libdnnl and compiler>/ and is written to a
temporary name and renamed, so parallel ranks never load half a file. OpsUnavailable says in one
line what is missing.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("onednn_conv.cc", "group_norm.cc", "batch_norm.cc", "global_norm.cc", "pooling.cc", "upsample.cc")
HEADERS = ("runtime.h", "norm_loops.h")
LIBRARY_NAME = "libfcos_ops.so"
_LIBRARY = None


class OpsUnavailable(RuntimeError):
    """The custom ops cannot be built or loaded here (no compiler, no headers, no libdnnl)."""


def cache_root():
    """FCOS_OPS_CACHE, else ~/.cache/fcos_mindspore/ops."""
    return os.environ.get("FCOS_OPS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fcos_mindspore", "ops")


def onednn_include():
    """The folder holding oneapi/dnnl/dnnl.hpp (ONEDNN_INCLUDE, else the environment's include folders)."""
    candidates = [os.environ.get("ONEDNN_INCLUDE", ""), os.path.join(sys.prefix, "include"),
                  os.path.join(sysconfig.get_paths()["data"], "include"), os.path.join(sys.base_prefix, "include")]
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "oneapi", "dnnl", "dnnl.hpp")):
            return folder
    raise OpsUnavailable('no oneDNN headers (oneapi/dnnl/dnnl.hpp): pip install --no-deps "onednn-devel>=2025,<2026", '
                         'or set ONEDNN_INCLUDE')


def mindspore_libdnnl():
    """The libdnnl.so.3 inside the installed mindspore package."""
    import mindspore

    path = os.path.join(os.path.dirname(mindspore.__file__), "lib", "libdnnl.so.3")
    if not os.path.isfile(path):
        raise OpsUnavailable(f"the mindspore package has no {path}")
    return path


def _header_version(include):
    with open(os.path.join(include, "oneapi", "dnnl", "dnnl_version.h"), encoding="utf-8") as f:
        return ".".join(re.findall(r"#define DNNL_VERSION_(?:MAJOR|MINOR|PATCH) (\d+)", f.read()))


def build(sources=SOURCES, library_name=LIBRARY_NAME, headers=HEADERS):
    """Compile src/ops/<sources> into <cache>/<digest>/<library_name> unless there -> its path."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise OpsUnavailable("no C++ compiler (g++, or CXX) to build the oneDNN convolution")
    include, libdnnl = onednn_include(), mindspore_libdnnl()
    paths = [os.path.join(HERE, name) for name in sources]
    digest = hashlib.sha256()
    for path in paths + [os.path.join(HERE, name) for name in headers]:
        with open(path, "rb") as f:
            digest.update(f.read())
    stat = os.stat(libdnnl)
    digest.update(f"{_header_version(include)}|{libdnnl}|{stat.st_size}|{stat.st_mtime_ns}|{compiler}".encode())
    folder = os.path.join(cache_root(), digest.hexdigest()[:16])
    target = os.path.join(folder, library_name)
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    lib_dir = os.path.dirname(libdnnl)
    # -fopenmp-simd: the loops' simd pragmas, without an OpenMP runtime (the kernels share one pool)
    command = [compiler, "-O2", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread", f"-I{include}",
               f"-I{HERE}", *paths, "-o", tmp, f"-L{lib_dir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib_dir}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise OpsUnavailable(f"building {', '.join(sources)} failed: {first}")
    os.replace(tmp, target)
    return target


def library():
    """Path of the built custom-op library (built once per process, cached on disk)."""
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = build()
    return _LIBRARY


def loaded_library():
    """The library's path when this process has built or loaded it, else None (compiled graphs
    name it: the compile cache keys on it)."""
    return _LIBRARY
