#!/usr/bin/env bash
# Train on one device.
usage() {
  echo "Usage: bash scripts/run_standalone_train.sh [DEVICE_TARGET] [TRAIN_IMG_DIR] [TRAIN_ANN_FILE] [OUTPUT_DIR] [CONFIG_PATH(optional)] [extra --key=value ...]"
  echo "  e.g. bash scripts/run_standalone_train.sh CPU data/deepforest/train data/deepforest/annotations/train.json output/df configs/deepforest_cpu.yaml"
}
source "$(dirname "$0")/common.sh"
if [ $# -lt 4 ]; then usage; exit 1; fi
DEVICE_TARGET=$1; TRAIN_IMG_DIR=$(abspath "$2"); TRAIN_ANN_FILE=$(abspath "$3"); OUTPUT_DIR=$(abspath "$4")
shift 4
CONFIG_PATH="$REPO_DIR/default_config.yaml"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then CONFIG_PATH=$(abspath "$1"); shift; fi
need_dir TRAIN_IMG_DIR "$TRAIN_IMG_DIR"; need_file TRAIN_ANN_FILE "$TRAIN_ANN_FILE"; need_file CONFIG_PATH "$CONFIG_PATH"
mkdir -p "$OUTPUT_DIR"
cd "$REPO_DIR" || exit 1
python train.py --config_path="$CONFIG_PATH" --device_target="$DEVICE_TARGET" \
  --train_img_dir="$TRAIN_IMG_DIR" --train_ann_file="$TRAIN_ANN_FILE" --output_dir="$OUTPUT_DIR" "$@"
