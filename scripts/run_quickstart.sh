#!/usr/bin/env bash
# Quick start on real data, on a CPU: train FCOS (ResNet-18, from scratch) on the shipped
# DeepForest tree-crown tiles, evaluate it with COCO metrics and draw its predictions.
# Usage: bash scripts/run_quickstart.sh [OUTPUT_DIR (default output/quickstart)] [extra --key=value ...]
source "$(dirname "$0")/common.sh"
OUTPUT_DIR=$(abspath "${1:-output/quickstart}")
[ $# -ge 1 ] && shift
set -euo pipefail
CONFIG="$REPO_DIR/configs/deepforest_cpu.yaml"
cd "$REPO_DIR"
start=$(date +%s)

echo "== 1/3 training (log: $OUTPUT_DIR/train.log)"
python train.py --config_path="$CONFIG" --output_dir="$OUTPUT_DIR" "$@"
CKPT=$(ls -t "$OUTPUT_DIR"/checkpoints/fcos-*.ckpt | head -n 1)

echo "== 2/3 evaluating $CKPT"
python eval.py --config_path="$CONFIG" --ckpt_file="$CKPT" --output_dir="$OUTPUT_DIR/eval" "$@"

echo "== 3/3 drawing predictions on a validation image"
python predict.py --config_path="$CONFIG" --ckpt_file="$CKPT" --input data/deepforest/val/YELL_x0929_y0345.jpg --draw_score_threshold=0.6 \
  --val_ann_file=data/deepforest/annotations/val.json --output_dir="$OUTPUT_DIR/predictions" "$@"

echo "done in $(( $(date +%s) - start )) s: metrics $OUTPUT_DIR/eval/eval_result.json, picture $OUTPUT_DIR/predictions/YELL_x0929_y0345_pred.png"
