#!/usr/bin/env bash
# Build the FCOS inference program: ascend310_infer/out/main (BUILD_DIR overrides the folder).
# Where the MindSpore C++ inference runtime comes from, first found wins:
#   MINDSPORE_PATH           a folder with include/api and lib (see CMakeLists.txt)
#   LITE_HOME / MS_LITE_HOME an unpacked MindSpore Lite (cloud) package: its runtime/ folder
#   the mindspore_lite Python package (pip install mindspore-lite), then the mindspore one (only
#   MindSpore packages with C++ inference, e.g. MindSpore 310, have include/api)
# Extra arguments go to cmake (e.g. -DFCOS_INFER_RUNTIME=mindspore, -DFCOS_INFER_TEST_DOUBLE=ON).
# Exit status: 0 built; 1 no runtime found (nothing built); 2 cmake or the compiler failed.
set -o pipefail
cd "$(dirname "$0")" || exit 2
PYTHON=${PYTHON:-python3}
source_of_runtime=""
if [ -n "$MINDSPORE_PATH" ]; then
  source_of_runtime="MINDSPORE_PATH"
elif [ -n "${LITE_HOME:-$MS_LITE_HOME}" ]; then
  MINDSPORE_PATH="${LITE_HOME:-$MS_LITE_HOME}/runtime"
  source_of_runtime=$([ -n "$LITE_HOME" ] && echo LITE_HOME || echo MS_LITE_HOME)
else
  for pkg in mindspore_lite mindspore; do
    # find_spec does not import the package (importing mindspore takes seconds).
    location=$("$PYTHON" -c "import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')" "$pkg" 2>/dev/null)
    if [ -n "$location" ] && [ -f "$location/include/api/model.h" ]; then
      MINDSPORE_PATH=$location
      source_of_runtime="the $pkg Python package"
      break
    fi
  done
fi
if [ -z "$MINDSPORE_PATH" ]; then
  echo "ascend310_infer: no MindSpore C++ inference runtime found (set MINDSPORE_PATH, or LITE_HOME to an unpacked MindSpore Lite package; the installed Python packages have no include/api)" >&2
  exit 1
fi
if [ ! -f "$MINDSPORE_PATH/include/api/model.h" ]; then
  echo "ascend310_infer: $source_of_runtime points at $MINDSPORE_PATH, which has no include/api/model.h" >&2
  exit 1
fi
echo "ascend310_infer: MindSpore runtime from $source_of_runtime: $MINDSPORE_PATH"
BUILD_DIR=${BUILD_DIR:-out}
cmake -S . -B "$BUILD_DIR" -DMINDSPORE_PATH="$MINDSPORE_PATH" "$@" || exit 2
cmake --build "$BUILD_DIR" -j "$(nproc)" || exit 2
echo "built $(realpath "$BUILD_DIR")/main"
