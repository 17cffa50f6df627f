#!/usr/bin/env bash
# Inference with an exported MindIR and COCO evaluation of its outputs:
# preprocess.py (images -> .bin) -> the C++ program on Ascend (ascend310_infer/) or the Python
# MindIR runner on CPU/GPU (src/infer_mindir.py) -> postprocess.py (COCO table, eval_result.json
# with the keys of eval.py). The export's <name>.json must sit next to the MindIR.
# Everything is written to OUTPUT_DIR (environment; default ./infer_output):
#   preprocess_Result/ (images/*.bin, preprocess_info.json), result_Files/ (output bins,
#   infer_time.json), eval_result.json and the logs.
# On Ascend, set up CANN first (source .../ascend-toolkit/set_env.sh) and, unless the installed
# mindspore Python package carries include/api and libmindspore.so, point MINDSPORE_PATH
# (environment) at the C++ inference package (e.g. MindSpore Lite's runtime/ folder); see
# ascend310_infer/build.sh.
usage() {
  echo "Usage: bash scripts/run_infer_310.sh [MINDIR_PATH] [DATA_PATH] [ANN_FILE] [DEVICE_TYPE] [DEVICE_ID] [NEED_PREPROCESS]"
  echo "  DATA_PATH: folder of the validation images; ANN_FILE: their COCO annotation json"
  echo "  DEVICE_TYPE: Ascend, GPU or CPU; NEED_PREPROCESS: y, or n to reuse OUTPUT_DIR/preprocess_Result"
}
source "$(dirname "$0")/common.sh"
if [ $# -ne 6 ]; then usage; exit 1; fi
MINDIR_PATH=$(abspath "$1"); DATA_PATH=$(abspath "$2"); ANN_FILE=$(abspath "$3")
DEVICE_TYPE=$4; DEVICE_ID=$5; NEED_PREPROCESS=$6
EXPORT_INFO="${MINDIR_PATH%.mindir}.json"
OUTPUT_DIR=$(abspath "${OUTPUT_DIR:-./infer_output}")
PRE_DIR="$OUTPUT_DIR/preprocess_Result"
RESULT_DIR="$OUTPUT_DIR/result_Files"
need_file MINDIR_PATH "$MINDIR_PATH"; need_dir DATA_PATH "$DATA_PATH"; need_file ANN_FILE "$ANN_FILE"
need_file "the export's json (written by export.py)" "$EXPORT_INFO"
case "$DEVICE_TYPE" in
  Ascend|GPU|CPU) ;;
  *) echo "error: DEVICE_TYPE must be Ascend, GPU or CPU, got '$DEVICE_TYPE'"; usage; exit 1 ;;
esac
if ! [[ "$DEVICE_ID" =~ ^[0-9]+$ ]]; then echo "error: DEVICE_ID must be a number, got '$DEVICE_ID'"; usage; exit 1; fi
case "$NEED_PREPROCESS" in
  y|Y) NEED_PREPROCESS=y ;;
  n|N) need_file "preprocess_info.json of an earlier run" "$PRE_DIR/preprocess_info.json" ;;
  *) echo "error: NEED_PREPROCESS must be y or n, got '$NEED_PREPROCESS'"; usage; exit 1 ;;
esac
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
    python preprocess.py --val_img_dir="$DATA_PATH" --val_ann_file="$ANN_FILE" --output_dir="$PRE_DIR" \
    --export_info="$EXPORT_INFO"
fi
rm -rf "$RESULT_DIR"
mkdir -p "$RESULT_DIR"
if [ "$DEVICE_TYPE" = Ascend ]; then
  run_step "building ascend310_infer" "$OUTPUT_DIR/build.log" bash ascend310_infer/build.sh
  run_step "inference (C++, Ascend $DEVICE_ID)" "$OUTPUT_DIR/infer.log" \
    ascend310_infer/out/main --mindir_path="$MINDIR_PATH" --input_path="$PRE_DIR/images" \
    --result_path="$RESULT_DIR" --device_id="$DEVICE_ID"
else
  run_step "inference (Python MindIR runner, $DEVICE_TYPE)" "$OUTPUT_DIR/infer.log" \
    python -m src.infer_mindir --mindir_path="$MINDIR_PATH" --input_path="$PRE_DIR/images" \
    --result_path="$RESULT_DIR" --device_target="$DEVICE_TYPE" --device_id="$DEVICE_ID"
fi
grep "NN inference cost average time" "$OUTPUT_DIR/infer.log"
python postprocess.py --result_dir="$RESULT_DIR" --info_file="$PRE_DIR/preprocess_info.json" \
  --export_info="$EXPORT_INFO" --val_ann_file="$ANN_FILE" --output_dir="$OUTPUT_DIR" 2>&1 | tee "$OUTPUT_DIR/acc.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then echo "error: postprocess failed, see $OUTPUT_DIR/acc.log"; exit 1; fi
echo "COCO metrics written to $OUTPUT_DIR/eval_result.json"
