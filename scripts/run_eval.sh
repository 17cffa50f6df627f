#!/usr/bin/env bash
# Evaluate a checkpoint with COCO mAP on one device; writes OUTPUT_DIR/eval_result.json, the console
# to OUTPUT_DIR/log.txt and the environment to OUTPUT_DIR/env.log.
#   bash scripts/run_eval.sh DEVICE_TARGET DEVICE_ID CKPT_FILE [VAL_IMG_DIR] [VAL_ANN_FILE] [OUTPUT_DIR] [CONFIG_PATH] [--key=value ...]
# Data paths default to the configuration; every argument is checked before anything is created
# (src/launch/).
source "$(dirname "$0")/common.sh"
launch eval "$@"
