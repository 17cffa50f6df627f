#!/usr/bin/env bash
# Data-parallel training on Ascend with a rank table (hccl_tools.py): run it once on every server of
# the table; it starts this server's devices, one background process each, in
# <output_dir>/train_parallel<RANK_ID>/ (log.txt, env.log), and fails (exit 1) when one does not start.
#   bash scripts/run_distribute_train.sh RANK_TABLE_FILE [TRAIN_IMG_DIR] [TRAIN_ANN_FILE] [PRETRAINED_BACKBONE|none] [CONFIG_PATH] [--key=value ...]
# Data paths, backbone and schedule default to the configuration; SERVER_ID picks this server of a
# multi-server table (else it is found by its address). Checks and plan: src/launch/.
source "$(dirname "$0")/common.sh"
launch rank_table "$@"
