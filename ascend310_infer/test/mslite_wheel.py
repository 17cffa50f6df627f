"""Unpack the C++ side of the mindspore-lite 2.0.0 wheel (PyPI): headers and CPU runtime library.

    python ascend310_infer/test/mslite_wheel.py DEST_DIR [WHEEL]

Writes DEST_DIR/mindspore_lite/{include/, version.py, lib/} and prints that folder. Without WHEEL,
the wheel is downloaded with pip (it is a Python 3.7 wheel, so --python-version 3.7
--only-binary=:all: --no-deps) and deleted after unpacking. Only the inference library, the
libraries it needs (its DT_NEEDED closure inside the wheel, read with readelf) and the plugin it
dlopens for a CPU session (libmsplugin-ge-litert_python.so; without it Build fails with "Create
session failed" before reading the MindIR) are unpacked: about 300 MB instead of the wheel's 500 MB.
A finished DEST_DIR is reused as it is.
Exit status: 0 done, 1 not a mindspore-lite wheel, 3 the download failed (offline?).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERSION = "2.0.0"
LIBS = ("libmindspore-extendrt_python.so", "libmindspore_core.so", "libmindspore_glog.so.0",
        "libmindspore_converter.so", "libmslite_converter_plugin.so", "libdnnl.so.2",
        "libopencv_core.so.4.5", "libopencv_imgcodecs.so.4.5", "libopencv_imgproc.so.4.5",
        "libmsplugin-ge-litert_python.so")
DONE = ".complete-2"  # the layout's version: a folder unpacked with another LIBS is unpacked again


def download(work):
    """pip download of the wheel into work -> its path; exits 3 with pip's last line on failure."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.7",
                             "--only-binary=:all:", f"mindspore-lite=={VERSION}", "-d", work, "-q"],
                            capture_output=True, text=True)
    wheels = [f for f in os.listdir(work) if f.startswith("mindspore_lite-") and f.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no wheel"]
        print(f"error: cannot download mindspore-lite=={VERSION}: {lines[-1]}", file=sys.stderr)
        sys.exit(3)
    return os.path.join(work, wheels[0])


def unpack(wheel, dest):
    members = {f"mindspore_lite/lib/{lib}" for lib in LIBS} | {"mindspore_lite/version.py"}
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n in members or n.startswith("mindspore_lite/include/")]
        missing = sorted(members - set(names))
        if missing or "mindspore_lite/include/api/model.h" not in names:
            print(f"error: {wheel} is not a mindspore-lite {VERSION} wheel (lacks {missing or 'include/api'})",
                  file=sys.stderr)
            sys.exit(1)
        archive.extractall(dest, names)


def main(argv):
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 1
    dest = os.path.abspath(argv[0])
    runtime = os.path.join(dest, "mindspore_lite")
    if not os.path.isfile(os.path.join(dest, DONE)):
        if os.path.isdir(dest) and os.listdir(dest):  # never delete a folder this tool did not make
            print(f"error: {dest} exists and is not a runtime folder made by this tool (no {DONE}); "
                  "give a new or empty folder", file=sys.stderr)
            return 1
        if os.path.exists(dest) and not os.path.isdir(dest):
            print(f"error: {dest} exists and is not a folder", file=sys.stderr)
            return 1
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        work = tempfile.mkdtemp(prefix=".mslite-", dir=os.path.dirname(dest) or ".")
        try:
            wheel = argv[1] if len(argv) == 2 else download(work)
            unpack(wheel, os.path.join(work, "out"))
            with open(os.path.join(work, "out", DONE), "w", encoding="utf-8") as f:
                f.write(os.path.basename(wheel) + "\n")
            if os.path.isdir(dest):
                os.rmdir(dest)  # empty (checked above)
            os.replace(os.path.join(work, "out"), dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
