#!/usr/bin/env bash
# Evaluate a checkpoint with COCO mAP; writes OUTPUT_DIR/eval_result.json.
usage() {
  echo "Usage: bash scripts/run_eval.sh [DEVICE_TARGET] [CKPT_FILE] [VAL_IMG_DIR] [VAL_ANN_FILE] [OUTPUT_DIR] [CONFIG_PATH(optional)] [extra --key=value ...]"
}
source "$(dirname "$0")/common.sh"
if [ $# -lt 5 ]; then usage; exit 1; fi
DEVICE_TARGET=$1; CKPT_FILE=$(abspath "$2"); VAL_IMG_DIR=$(abspath "$3"); VAL_ANN_FILE=$(abspath "$4"); OUTPUT_DIR=$(abspath "$5")
shift 5
CONFIG_PATH="$REPO_DIR/default_config.yaml"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then CONFIG_PATH=$(abspath "$1"); shift; fi
need_file CKPT_FILE "$CKPT_FILE"; need_dir VAL_IMG_DIR "$VAL_IMG_DIR"; need_file VAL_ANN_FILE "$VAL_ANN_FILE"; need_file CONFIG_PATH "$CONFIG_PATH"
mkdir -p "$OUTPUT_DIR"
cd "$REPO_DIR" || exit 1
python eval.py --config_path="$CONFIG_PATH" --device_target="$DEVICE_TARGET" --ckpt_file="$CKPT_FILE" \
  --val_img_dir="$VAL_IMG_DIR" --val_ann_file="$VAL_ANN_FILE" --output_dir="$OUTPUT_DIR" "$@"
