#!/usr/bin/env bash
# Data-parallel training on Ascend with a rank table (one process per device, in the background).
usage() {
  echo "Usage: bash scripts/run_distribute_train.sh [RANK_TABLE_FILE] [TRAIN_IMG_DIR] [TRAIN_ANN_FILE] [PRETRAINED_BACKBONE] [CONFIG_PATH(optional)] [extra --key=value ...]"
  echo "  RANK_TABLE_FILE: hccl json made by hccl_tools.py (see README); PRETRAINED_BACKBONE: converted backbone .ckpt or 'none'"
}
source "$(dirname "$0")/common.sh"
if [ $# -lt 4 ]; then usage; exit 1; fi
RANK_TABLE_FILE=$(abspath "$1"); TRAIN_IMG_DIR=$(abspath "$2"); TRAIN_ANN_FILE=$(abspath "$3"); PRETRAINED=$4
shift 4
CONFIG_PATH="$REPO_DIR/default_config.yaml"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then CONFIG_PATH=$(abspath "$1"); shift; fi
need_file RANK_TABLE_FILE "$RANK_TABLE_FILE"; need_dir TRAIN_IMG_DIR "$TRAIN_IMG_DIR"
need_file TRAIN_ANN_FILE "$TRAIN_ANN_FILE"; need_file CONFIG_PATH "$CONFIG_PATH"
if [ "$PRETRAINED" = "none" ]; then
  PRETRAINED_ARGS=(--pretrained=False)
else
  PRETRAINED=$(abspath "$PRETRAINED"); need_file PRETRAINED_BACKBONE "$PRETRAINED"
  PRETRAINED_ARGS=(--pretrained=True --pretrained_backbone="$PRETRAINED")
fi

# RANK_SIZE = number of devices listed in the table.
RANK_SIZE=$(python3 -c "import json,sys; t=json.load(open(sys.argv[1])); print(sum(len(s['device']) for s in t['server_list']))" "$RANK_TABLE_FILE") \
  || { echo "error: cannot read devices from $RANK_TABLE_FILE"; exit 1; }
export RANK_TABLE_FILE RANK_SIZE
CORES=$(nproc); CORES_PER_RANK=$((CORES / RANK_SIZE)); [ "$CORES_PER_RANK" -ge 1 ] || CORES_PER_RANK=1
WORK_DIR="$REPO_DIR/train_parallel"
OUTPUT_DIR="$WORK_DIR/output"
echo "launching $RANK_SIZE processes, $CORES_PER_RANK CPU cores each; logs: $WORK_DIR/rank_<i>/log.txt; checkpoints (rank 0): $OUTPUT_DIR/checkpoints"
for ((i = 0; i < RANK_SIZE; i++)); do
  export DEVICE_ID=$i RANK_ID=$i
  rm -rf "$WORK_DIR/rank_$i"; mkdir -p "$WORK_DIR/rank_$i"
  cd "$WORK_DIR/rank_$i" || exit 1
  FIRST=$((i * CORES_PER_RANK)); LAST=$((FIRST + CORES_PER_RANK - 1))
  taskset -c "$FIRST-$LAST" python "$REPO_DIR/train.py" --config_path="$CONFIG_PATH" --device_target=Ascend \
    --train_img_dir="$TRAIN_IMG_DIR" --train_ann_file="$TRAIN_ANN_FILE" --output_dir="$OUTPUT_DIR" \
    "${PRETRAINED_ARGS[@]}" "$@" > log.txt 2>&1 &
done
echo "started; follow with: tail -f $WORK_DIR/rank_0/log.txt"
