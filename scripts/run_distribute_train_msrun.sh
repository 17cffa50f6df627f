#!/usr/bin/env bash
# Data-parallel training with msrun on GPU or CPU (one worker per device / CPU process).
usage() {
  echo "Usage: bash scripts/run_distribute_train_msrun.sh [DEVICE_TARGET GPU|CPU] [DEVICE_NUM] [TRAIN_IMG_DIR] [TRAIN_ANN_FILE] [OUTPUT_DIR] [PRETRAINED_BACKBONE|none] [CONFIG_PATH(optional)] [extra --key=value ...]"
}
source "$(dirname "$0")/common.sh"
if [ $# -lt 6 ]; then usage; exit 1; fi
DEVICE_TARGET=$1; DEVICE_NUM=$2; TRAIN_IMG_DIR=$(abspath "$3"); TRAIN_ANN_FILE=$(abspath "$4"); OUTPUT_DIR=$(abspath "$5"); PRETRAINED=$6
shift 6
case "$DEVICE_TARGET" in GPU|CPU) ;; *) echo "error: DEVICE_TARGET must be GPU or CPU (Ascend: run_distribute_train.sh)"; usage; exit 1 ;; esac
[[ "$DEVICE_NUM" =~ ^[1-9][0-9]*$ ]] || { echo "error: DEVICE_NUM must be a positive integer: $DEVICE_NUM"; usage; exit 1; }
CONFIG_PATH="$REPO_DIR/default_config.yaml"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then CONFIG_PATH=$(abspath "$1"); shift; fi
need_dir TRAIN_IMG_DIR "$TRAIN_IMG_DIR"; need_file TRAIN_ANN_FILE "$TRAIN_ANN_FILE"; need_file CONFIG_PATH "$CONFIG_PATH"
if [ "$PRETRAINED" = "none" ]; then
  PRETRAINED_ARGS=(--pretrained=False)
else
  PRETRAINED=$(abspath "$PRETRAINED"); need_file PRETRAINED_BACKBONE "$PRETRAINED"
  PRETRAINED_ARGS=(--pretrained=True --pretrained_backbone="$PRETRAINED")
fi
MASTER_PORT=${MASTER_PORT:-8118}
mkdir -p "$OUTPUT_DIR"
cd "$REPO_DIR" || exit 1
echo "msrun: $DEVICE_NUM workers on $DEVICE_TARGET, master port $MASTER_PORT (set MASTER_PORT to change it)"
echo "logs: $OUTPUT_DIR/msrun_log/worker_<i>.log and $OUTPUT_DIR/train[_rank<i>].log; checkpoints (rank 0): $OUTPUT_DIR/checkpoints"
msrun --worker_num="$DEVICE_NUM" --local_worker_num="$DEVICE_NUM" --master_port="$MASTER_PORT" \
  --log_dir="$OUTPUT_DIR/msrun_log" --join=True \
  train.py --config_path="$CONFIG_PATH" --device_target="$DEVICE_TARGET" \
  --train_img_dir="$TRAIN_IMG_DIR" --train_ann_file="$TRAIN_ANN_FILE" --output_dir="$OUTPUT_DIR" \
  "${PRETRAINED_ARGS[@]}" "$@"
