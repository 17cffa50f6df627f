#!/usr/bin/env bash
# Inference with an exported MindIR and COCO evaluation of its outputs (ModelZoo's run_infer_310.sh):
# preprocess.py (images -> .bin) -> the C++ program (ascend310_infer/) when it builds, otherwise the
# Python MindIR runner (python -m src.deploy.runner) -> postprocess.py (COCO table, eval_result.json
# with the keys of eval.py). The export's <name>.json must sit next to the MindIR.
# Everything is written to OUTPUT_DIR (environment; default ./infer_output):
#   preprocess_Result/ (images/*.bin, preprocess_info.json), result_Files/ (output bins,
#   infer_time.json), eval_result.json and the logs (preprocess.log, build.log, infer.log, acc.log).
# The C++ program builds against a MindSpore C++ inference runtime, found by ascend310_infer/build.sh
# (MINDSPORE_PATH, LITE_HOME / MS_LITE_HOME, or an installed mindspore_lite / mindspore package with
# include/api). On Ascend, set up CANN first (source .../ascend-toolkit/set_env.sh).
# Environment: INFER_RUNNER=auto (default: C++ when it builds, else Python), cpp (a build failure is
# an error) or python; CPP_BUILD_DIR (default ascend310_infer/out); PYTHON (default python).
usage() {
  echo "Usage: bash scripts/run_infer_310.sh [MINDIR_PATH] [DATA_PATH] [ANN_FILE] [NEED_PREPROCESS] [DEVICE_TARGET] [DEVICE_ID(optional, 0)]"
  echo "  DATA_PATH: folder of the validation images; ANN_FILE: their COCO annotation json"
  echo "  NEED_PREPROCESS: y, or n to reuse OUTPUT_DIR/preprocess_Result; DEVICE_TARGET: Ascend, GPU or CPU"
}
source "$(dirname "$0")/common.sh"
if [ $# -lt 5 ] || [ $# -gt 6 ]; then usage; exit 1; fi
MINDIR_PATH=$(abspath "$1"); DATA_PATH=$(abspath "$2"); ANN_FILE=$(abspath "$3")
NEED_PREPROCESS=$4; DEVICE_TARGET=$5; DEVICE_ID=${6:-0}
EXPORT_INFO="${MINDIR_PATH%.mindir}.json"
OUTPUT_DIR=$(abspath "${OUTPUT_DIR:-./infer_output}")
PRE_DIR="$OUTPUT_DIR/preprocess_Result"
RESULT_DIR="$OUTPUT_DIR/result_Files"
PYTHON=${PYTHON:-python}
INFER_RUNNER=${INFER_RUNNER:-auto}
need_file MINDIR_PATH "$MINDIR_PATH"; need_dir DATA_PATH "$DATA_PATH"; need_file ANN_FILE "$ANN_FILE"
need_file "the export's json (written by export.py)" "$EXPORT_INFO"
case "$DEVICE_TARGET" in
  Ascend|GPU|CPU) ;;
  *) echo "error: DEVICE_TARGET must be Ascend, GPU or CPU, got '$DEVICE_TARGET'"; usage; exit 1 ;;
esac
if ! [[ "$DEVICE_ID" =~ ^[0-9]+$ ]]; then echo "error: DEVICE_ID must be a number, got '$DEVICE_ID'"; usage; exit 1; fi
case "$NEED_PREPROCESS" in
  y|Y) NEED_PREPROCESS=y ;;
  n|N) need_file "preprocess_info.json of an earlier run" "$PRE_DIR/preprocess_info.json" ;;
  *) echo "error: NEED_PREPROCESS must be y or n, got '$NEED_PREPROCESS'"; usage; exit 1 ;;
esac
case "$INFER_RUNNER" in
  auto|cpp|python) ;;
  *) echo "error: INFER_RUNNER must be auto, cpp or python, got '$INFER_RUNNER'"; usage; exit 1 ;;
esac
CPP_BUILD_DIR=${CPP_BUILD_DIR:+$(abspath "$CPP_BUILD_DIR")}
CPP_BUILD_DIR=${CPP_BUILD_DIR:-$REPO_DIR/ascend310_infer/out}
mkdir -p "$OUTPUT_DIR"
cd "$REPO_DIR" || exit 1

# run_step NAME LOG COMMAND...: run a step with its output in LOG; on failure show its end and stop.
run_step() {
  local name=$1 log=$2
  shift 2
  echo "$name (log: $log)"
  if ! "$@" > "$log" 2>&1; then
    tail -n 20 "$log"
    echo "error: $name failed, see $log"
    exit 1
  fi
}

if [ "$NEED_PREPROCESS" = y ]; then
  run_step "preprocessing images" "$OUTPUT_DIR/preprocess.log" \
    "$PYTHON" preprocess.py --val_img_dir="$DATA_PATH" --val_ann_file="$ANN_FILE" --output_dir="$PRE_DIR" \
    --export_info="$EXPORT_INFO"
fi
rm -rf "$RESULT_DIR"
mkdir -p "$RESULT_DIR"

runner=python
if [ "$INFER_RUNNER" != python ]; then
  echo "building ascend310_infer (log: $OUTPUT_DIR/build.log)"
  if BUILD_DIR="$CPP_BUILD_DIR" PYTHON="$PYTHON" bash ascend310_infer/build.sh > "$OUTPUT_DIR/build.log" 2>&1; then
    runner=cpp
    grep "^ascend310_infer: MindSpore runtime from" "$OUTPUT_DIR/build.log"
  elif [ "$INFER_RUNNER" = cpp ]; then
    tail -n 20 "$OUTPUT_DIR/build.log"
    echo "error: ascend310_infer did not build (INFER_RUNNER=cpp), see $OUTPUT_DIR/build.log"
    exit 1
  else
    echo "ascend310_infer did not build: $(grep -v '^\s*$' "$OUTPUT_DIR/build.log" | tail -n 1)"
  fi
fi
if [ "$runner" = cpp ]; then
  echo "inference runs with: the C++ program $CPP_BUILD_DIR/main ($DEVICE_TARGET $DEVICE_ID)"
  run_step "inference (C++, $DEVICE_TARGET $DEVICE_ID)" "$OUTPUT_DIR/infer.log" \
    "$CPP_BUILD_DIR/main" --mindir_path="$MINDIR_PATH" --input_path="$PRE_DIR/images" \
    --result_path="$RESULT_DIR" --device_type="$DEVICE_TARGET" --device_id="$DEVICE_ID"
else
  echo "inference runs with: the Python MindIR runner, python -m src.deploy.runner ($DEVICE_TARGET $DEVICE_ID)"
  run_step "inference (Python MindIR runner, $DEVICE_TARGET $DEVICE_ID)" "$OUTPUT_DIR/infer.log" \
    "$PYTHON" -m src.deploy.runner --mindir_path="$MINDIR_PATH" --input_path="$PRE_DIR/images" \
    --result_path="$RESULT_DIR" --device_target="$DEVICE_TARGET" --device_id="$DEVICE_ID"
fi
grep "NN inference cost average time" "$OUTPUT_DIR/infer.log"
"$PYTHON" postprocess.py --result_dir="$RESULT_DIR" --info_file="$PRE_DIR/preprocess_info.json" \
  --export_info="$EXPORT_INFO" --val_ann_file="$ANN_FILE" --output_dir="$OUTPUT_DIR" 2>&1 | tee "$OUTPUT_DIR/acc.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then echo "error: postprocess failed, see $OUTPUT_DIR/acc.log"; exit 1; fi
echo "COCO metrics written to $OUTPUT_DIR/eval_result.json"
