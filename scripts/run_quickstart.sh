#!/usr/bin/env bash
# Quick start on real data, on a CPU: train FCOS (ResNet-18, from scratch) on two DeepForest
# tree-crown orthophotos, evaluate it with COCO metrics on a third one it never saw, and draw
# its predictions there.
# Usage: bash scripts/run_quickstart.sh [OUTPUT_DIR (default output/quickstart)] [extra --key=value ...]
# CONFIG=... picks another configuration (e.g. configs/deepforest_tiles_cpu.yaml), IMAGE=... the
# image to draw predictions on (default: the held-out validation image), DRAW_THRESHOLD=... the
# lowest score drawn (default 0.45).
source "$(dirname "$0")/common.sh"
OUTPUT_DIR=$(abspath "${1:-output/quickstart}")
[ $# -ge 1 ] && shift
set -euo pipefail
CONFIG=$(abspath "${CONFIG:-$REPO_DIR/configs/deepforest_cpu.yaml}")
IMAGE=$(abspath "${IMAGE:-$REPO_DIR/data/deepforest_voc/OSBS_029.png}")
cd "$REPO_DIR"
start=$(date +%s)

echo "== 1/3 training (log: $OUTPUT_DIR/train.log)"
python train.py --config_path="$CONFIG" --output_dir="$OUTPUT_DIR" "$@"
CKPT=$(ls -t "$OUTPUT_DIR"/checkpoints/fcos-*.ckpt | head -n 1)

echo "== 2/3 evaluating $CKPT"
python eval.py --config_path="$CONFIG" --ckpt_file="$CKPT" --output_dir="$OUTPUT_DIR/eval" "$@"

echo "== 3/3 drawing predictions on a validation image"
python predict.py --config_path="$CONFIG" --ckpt_file="$CKPT" --input "$IMAGE" --draw_score_threshold="${DRAW_THRESHOLD:-0.45}" \
  --output_dir="$OUTPUT_DIR/predictions" "$@"

echo "done in $(( $(date +%s) - start )) s: metrics $OUTPUT_DIR/eval/eval_result.json, pictures in $OUTPUT_DIR/predictions"
