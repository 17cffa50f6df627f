#!/usr/bin/env bash
# Compile check of ascend310_infer/ without an Ascend machine, against the MindSpore C++
# inference headers (include/api) of the mindspore-lite 2.0.0 wheel from PyPI:
#   1. g++ -std=c++17 -Wall -Wextra -Werror -fsyntax-only on src/main.cc and src/utils.cc;
#   2. when cmake is installed: the real build (build.sh, CMakeLists.txt), linked against the
#      wheel's inference library, so every API call must resolve to an exported symbol.
# The wheel is downloaded to a temporary folder and deleted afterwards, unless a .whl file or an
# extracted folder (holding include/api/model.h) is given.
# Exit codes: 0 passed, 1 bad arguments, 2 compile or link failure, 3 wheel not available (offline).
usage() {
  echo "Usage: bash scripts/check_ascend310_build.sh [MINDSPORE_LITE_WHEEL_OR_DIR(optional)]"
}
source "$(dirname "$0")/common.sh"
if [ $# -gt 1 ]; then usage; exit 1; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SOURCE=${1:+$(abspath "$1")}
if [ -z "$SOURCE" ]; then
  echo "downloading mindspore-lite==2.0.0 (its C++ headers) ..."
  if ! pip download --no-deps --python-version 3.7 --only-binary :all: mindspore-lite==2.0.0 -d "$WORK" -q; then
    echo "error: cannot download the mindspore-lite 2.0.0 wheel (offline?); pass its path instead"
    exit 3
  fi
  SOURCE=$(ls "$WORK"/mindspore_lite-*.whl)
fi
if [ -f "$SOURCE" ]; then
  # Only the headers and the inference library: the wheel's other libraries are not needed.
  python3 - "$SOURCE" "$WORK" <<'PY' || exit 3
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    members = [m for m in wheel.namelist() if m.startswith("mindspore_lite/include/")
               or m == "mindspore_lite/lib/libmindspore-extendrt_python.so"]
    if not members:
        sys.exit(f"error: {sys.argv[1]} holds no mindspore_lite/include headers")
    wheel.extractall(sys.argv[2], members)
PY
  MS_DIR="$WORK/mindspore_lite"
elif [ -f "$SOURCE/include/api/model.h" ]; then
  MS_DIR=$SOURCE
elif [ -f "$SOURCE/mindspore_lite/include/api/model.h" ]; then
  MS_DIR=$SOURCE/mindspore_lite
else
  echo "error: $SOURCE is neither a mindspore-lite wheel nor a folder with include/api/model.h"
  usage
  exit 1
fi

INFER_DIR="$REPO_DIR/ascend310_infer"
for source_file in src/main.cc src/utils.cc; do
  g++ -std=c++17 -Wall -Wextra -Werror -fsyntax-only -isystem "$MS_DIR" -I"$INFER_DIR" "$INFER_DIR/$source_file" \
    || { echo "FAILED: syntax check of ascend310_infer/$source_file"; exit 2; }
done
echo "syntax check passed: ascend310_infer/src/main.cc, utils.cc (g++ -std=c++17 -Werror)"

LIB="$MS_DIR/lib/libmindspore-extendrt_python.so"
if ! command -v cmake > /dev/null; then
  echo "cmake not installed: build and link check skipped"
elif [ ! -f "$LIB" ]; then
  echo "no inference library in $MS_DIR/lib: build and link check skipped"
else
  BUILD_DIR="$WORK/build" MINDSPORE_PATH="$MS_DIR" bash "$INFER_DIR/build.sh" -DMS_LIB="$LIB" > "$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; echo "FAILED: build.sh (cmake + make + link)"; exit 2; }
  echo "build and link check passed: build.sh linked ascend310_infer/main against $(basename "$LIB")"
fi
