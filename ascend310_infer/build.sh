#!/usr/bin/env bash
# Build the FCOS inference program: ascend310_infer/out/main (BUILD_DIR overrides the folder).
# MINDSPORE_PATH (environment) is the MindSpore folder with include/api and lib; by default the
# installed mindspore (or mindspore-lite) Python package. Extra arguments go to cmake.
set -e
cd "$(dirname "$0")"
if [ -z "$MINDSPORE_PATH" ]; then
  for pkg in mindspore mindspore-lite; do
    location=$(pip3 show "$pkg" 2>/dev/null | awk '/^Location:/ {print $2}')
    if [ -n "$location" ]; then
      MINDSPORE_PATH=$(realpath "$location/${pkg//-/_}")
      break
    fi
  done
fi
if [ -z "$MINDSPORE_PATH" ]; then
  echo "error: set MINDSPORE_PATH (no mindspore or mindspore-lite Python package found)" >&2
  exit 1
fi
BUILD_DIR=${BUILD_DIR:-out}
cmake -S . -B "$BUILD_DIR" -DMINDSPORE_PATH="$MINDSPORE_PATH" "$@"
cmake --build "$BUILD_DIR" -j "$(nproc)"
echo "built $(realpath "$BUILD_DIR")/main"
