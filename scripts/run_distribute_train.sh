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

# One "DEVICE_ID RANK_ID" line per device of the table (a single server: one process per device here).
DEVICES=$(python3 -c "
import json, sys
servers = json.load(open(sys.argv[1]))['server_list']
if len(servers) != 1:
    sys.exit(f'{len(servers)} servers in the table; this script starts the devices of one server')
for device in servers[0]['device']:
    print(device['device_id'], device['rank_id'])
" "$RANK_TABLE_FILE") || { echo "error: cannot read the devices of one server from RANK_TABLE_FILE: $RANK_TABLE_FILE"; usage; exit 1; }
RANK_SIZE=$(echo "$DEVICES" | grep -c .)
[ "$RANK_SIZE" -ge 1 ] || { echo "error: no devices in RANK_TABLE_FILE: $RANK_TABLE_FILE"; usage; exit 1; }
export RANK_TABLE_FILE RANK_SIZE
CORES=$(nproc); CORES_PER_RANK=$((CORES / RANK_SIZE)); [ "$CORES_PER_RANK" -ge 1 ] || CORES_PER_RANK=1
WORK_DIR="$REPO_DIR/train_parallel"
OUTPUT_DIR="$WORK_DIR/output"
echo "launching $RANK_SIZE processes in the background, $CORES_PER_RANK CPU cores each"
echo "logs: $WORK_DIR/rank_<RANK_ID>/log.txt; checkpoints (rank 0): $OUTPUT_DIR/checkpoints"
i=0
while read -r DEVICE_ID RANK_ID; do
  export DEVICE_ID RANK_ID
  rm -rf "$WORK_DIR/rank_$RANK_ID"; mkdir -p "$WORK_DIR/rank_$RANK_ID"
  cd "$WORK_DIR/rank_$RANK_ID" || exit 1
  FIRST=$((i * CORES_PER_RANK)); LAST=$((FIRST + CORES_PER_RANK - 1)); i=$((i + 1))
  taskset -c "$FIRST-$LAST" python "$REPO_DIR/train.py" --config_path="$CONFIG_PATH" --device_target=Ascend \
    --train_img_dir="$TRAIN_IMG_DIR" --train_ann_file="$TRAIN_ANN_FILE" --output_dir="$OUTPUT_DIR" \
    "${PRETRAINED_ARGS[@]}" "$@" < /dev/null > log.txt 2>&1 &
done <<< "$DEVICES"
echo "started; follow with: tail -f $WORK_DIR/rank_0/log.txt"
