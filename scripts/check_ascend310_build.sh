#!/usr/bin/env bash
# Build check of ascend310_infer/ without an Ascend machine, against the MindSpore C++ inference
# headers and CPU runtime library of the mindspore-lite 2.0.0 wheel from PyPI:
#   1. g++ -std=c++17 -Wall -Wextra -Werror -fsyntax-only on every source, both loading paths;
#   2. when cmake is installed: build.sh twice, linked against the wheel's inference library, so
#      that every API call of both loading paths resolves to an exported symbol: the Lite path
#      (ENABLE_LITE, Model::Build(path, kMindIR)) and the GraphCell path (-DFCOS_INFER_RUNTIME=mindspore),
#      and the test double (main_fake) once.
# Nothing is run here (tests/test_cpp_infer.py runs the programs). The wheel is downloaded to a
# temporary folder and deleted afterwards, unless a .whl file or an unpacked folder (holding
# include/api/model.h and lib/, e.g. from ascend310_infer/test/mslite_wheel.py) is given.
# Exit codes: 0 passed, 1 bad arguments, 2 compile or link failure, 3 wheel not available (offline).
usage() {
  echo "Usage: bash scripts/check_ascend310_build.sh [MINDSPORE_LITE_WHEEL_OR_DIR(optional)]"
}
source "$(dirname "$0")/common.sh"
if [ $# -gt 1 ]; then usage; exit 1; fi
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SOURCE=${1:+$(abspath "$1")}
UNPACK="$REPO_DIR/ascend310_infer/test/mslite_wheel.py"  # download (when needed) and unpack
if [ -z "$SOURCE" ] || [ -f "$SOURCE" ]; then
  [ -z "$SOURCE" ] && echo "downloading mindspore-lite==2.0.0 (its C++ headers and CPU runtime) ..."
  MS_DIR=$("$PYTHON" "$UNPACK" "$WORK/mslite" ${SOURCE:+"$SOURCE"})
  status=$?
  if [ $status -eq 3 ]; then echo "error: cannot download the mindspore-lite 2.0.0 wheel (offline?); pass its path instead"; exit 3; fi
  if [ $status -ne 0 ]; then usage; exit 1; fi
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
syntax() {  # syntax FILE [DEFINES...]
  local file=$1
  shift
  g++ -std=c++17 -Wall -Wextra -Werror -fsyntax-only "$@" -isystem "$MS_DIR" -I"$INFER_DIR" "$INFER_DIR/$file" \
    || { echo "FAILED: syntax check of ascend310_infer/$file $*"; exit 2; }
}
for source_file in src/main.cc src/pipeline.cc src/utils.cc src/mindir_info.cc test/fake_model.cc; do
  syntax "$source_file"
done
syntax src/mindspore_model.cc -DENABLE_LITE
syntax src/mindspore_model.cc
echo "syntax check passed: ascend310_infer/src/*.cc, test/fake_model.cc, both loading paths (g++ -std=c++17 -Werror)"

if ! command -v cmake > /dev/null; then
  echo "cmake not installed: build and link check skipped"
  exit 0
fi
if [ ! -f "$MS_DIR/lib/libmindspore-extendrt_python.so" ] && [ ! -f "$MS_DIR/lib/libmindspore-lite.so" ]; then
  echo "no inference library in $MS_DIR/lib: build and link check skipped"
  exit 0
fi
for runtime in lite mindspore; do
  extra=()
  [ "$runtime" = lite ] && extra=(-DFCOS_INFER_TEST_DOUBLE=ON)
  BUILD_DIR="$WORK/build_$runtime" MINDSPORE_PATH="$MS_DIR" bash "$INFER_DIR/build.sh" \
    -DFCOS_INFER_RUNTIME=$runtime "${extra[@]}" > "$WORK/build_$runtime.log" 2>&1 \
    || { cat "$WORK/build_$runtime.log"; echo "FAILED: build.sh -DFCOS_INFER_RUNTIME=$runtime (cmake + make + link)"; exit 2; }
  grep "ascend310_infer: runtime library" "$WORK/build_$runtime.log" | sed 's/^-- //'
done
echo "build and link check passed: build.sh linked ascend310_infer/main (Lite and GraphCell paths) and main_fake"
