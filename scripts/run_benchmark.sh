#!/usr/bin/env bash
# Benchmark inference, a training step or the data pipeline (python -m tools.benchmark) and
# append its JSON line to OUTPUT_FILE, so that repeated runs can be compared.
usage() {
  echo "Usage: bash scripts/run_benchmark.sh [MODE infer|train|data] [OUTPUT_FILE] [CONFIG_PATH(optional)] [extra --key=value ...]"
  echo "  e.g. bash scripts/run_benchmark.sh train output/bench.jsonl configs/synthetic_cpu.yaml --steps=5"
  echo "  side by side with torchvision: TORCH_PYTHON=/path/to/venv/bin/python bash scripts/run_benchmark.sh infer output/bench.jsonl --compare_torchvision"
}
source "$(dirname "$0")/common.sh"
if [ $# -lt 2 ]; then usage; exit 1; fi
MODE=$1; OUTPUT_FILE=$(abspath "$2")
shift 2
case "$MODE" in infer|train|data) ;; *) echo "error: MODE must be infer, train or data, got '$MODE'"; usage; exit 1 ;; esac
CONFIG_PATH="$REPO_DIR/default_config.yaml"
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then CONFIG_PATH=$(abspath "$1"); shift; fi
need_file CONFIG_PATH "$CONFIG_PATH"
mkdir -p "$(dirname "$OUTPUT_FILE")"
cd "$REPO_DIR" || exit 1
set -o pipefail
python -m tools.benchmark --mode="$MODE" --config_path="$CONFIG_PATH" "$@" | tee /dev/stderr | tail -n 1 >> "$OUTPUT_FILE"
