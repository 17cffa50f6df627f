"""The custom-op library cache (src/ops/build.py) under faults: an entry another user owns or can
write to is refused in one line, the compiler's version and flags key the cache, and concurrent
processes build once under the lock. Real g++ builds (a wrapper around g++ counts them)."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from src.ops.build import OpsUnavailable, build, check_trusted


def _wrapper(tmp_path, version="wrapper 1"):
    """A CXX that logs each compile to tmp_path/compiles and reports `version` for --version."""
    log = tmp_path / "compiles"
    script = tmp_path / f"cxx-{version.replace(' ', '_')}"
    script.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
                      f'echo compile >> "{log}"\nexec g++ "$@"\n')
    script.chmod(0o755)
    return str(script), log


@pytest.fixture()
def cache(tmp_path, monkeypatch, ops_library):
    """A cache of this test's own holding a copy of the session's build (no compile) -> the library."""
    from src.ops.build import library

    built = library()
    entry = tmp_path / "cache" / os.path.basename(os.path.dirname(built))
    entry.mkdir(parents=True, mode=0o700)
    shutil.copy2(built, entry / os.path.basename(built))
    monkeypatch.setenv("FCOS_OPS_CACHE", str(tmp_path / "cache"))
    assert build() == str(entry / os.path.basename(built))  # the same digest: found, not built
    return build()


def test_a_foreign_or_writable_cache_entry_is_refused_in_one_line(cache):
    """Mutation caught: loading whatever .so sits at the digest path."""
    entry = os.path.dirname(cache)
    assert build() == cache  # this user's, mode 0755 / 0700: loaded
    os.chmod(cache, 0o777)
    with pytest.raises(OpsUnavailable, match=r"refusing .*libfcos_ops.so: writable by group or others"):
        build()
    os.chmod(cache, 0o755)
    os.chmod(entry, 0o777)
    with pytest.raises(OpsUnavailable, match="writable by group or others"):
        build()
    os.chmod(entry, 0o700)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(cache, 4242, 4242)
        with pytest.raises(OpsUnavailable, match="owned by uid 4242, not by this user") as err:
            build()
        assert "\n" not in str(err.value)
        os.chown(cache, 0, 0)
    check_trusted(cache)


BUILDER = """
import sys
sys.path.insert(0, sys.argv[1])
from src.ops.build import build
print(build())
"""


@pytest.mark.slow
def test_concurrent_builds_happen_once_and_the_compiler_version_keys_the_cache(tmp_path, monkeypatch):
    """Two processes (two ranks) start on an empty cache: one compiles, the other waits for it and
    loads the same file; a compiler reporting another version builds anew. Mutations caught: no
    lock (both ran g++, each renaming over the other), a digest without the compiler's version (a
    new compiler reused a stale build)."""
    cxx, log = _wrapper(tmp_path, "wrapper 1")
    env = dict(os.environ, FCOS_OPS_CACHE=str(tmp_path / "cache"), CXX=cxx)
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, ROOT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    if any(proc.returncode for proc in procs) and "OpsUnavailable" in outputs[0][1]:
        pytest.skip(outputs[0][1].strip().splitlines()[-1])
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert log.read_text().count("compile") == 1
    monkeypatch.setenv("FCOS_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", cxx)
    assert build() == outputs[0][0].strip() and log.read_text().count("compile") == 1  # reused
    second_cxx, _ = _wrapper(tmp_path, "wrapper 2")
    monkeypatch.setenv("CXX", second_cxx)
    assert build() != outputs[0][0].strip() and log.read_text().count("compile") == 2
