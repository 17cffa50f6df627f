#!/usr/bin/env bash
# Data-parallel training with msrun on GPU or CPU, on one node or several (run it on every node with
# its NODE_RANK; node 0 runs msrun's scheduler at MASTER_ADDR:MASTER_PORT).
#   bash scripts/run_distribute_train_msrun.sh DEVICE_TARGET DEVICE_NUM TRAIN_IMG_DIR TRAIN_ANN_FILE OUTPUT_DIR PRETRAINED_BACKBONE|none [CONFIG_PATH] [--key=value ...]
#   several nodes: --node_num=N --node_rank=R --master_addr=IP [--master_port=P] (or NODE_NUM, NODE_RANK, MASTER_ADDR, MASTER_PORT)
# Checks and the msrun command: src/launch/.
source "$(dirname "$0")/common.sh"
launch msrun "$@"
