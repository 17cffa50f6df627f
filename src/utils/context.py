"""MindSpore context and distributed setup shared by every entry point."""
import logging
import os
from typing import Optional, Tuple

import mindspore as ms

from src.utils.logs import env_int, launched_distributed

logger = logging.getLogger("fcos")

def init_context(device_target: str, mode: str = "GRAPH", device_id: int = 0,
                 distributed: Optional[bool] = None) -> Tuple[int, int]:
    """Set device and execution mode; initialise collectives for multi-process runs.

    Returns (rank, group_size). ``distributed=None`` detects a multi-process launch from the
    launcher's environment (RANK_SIZE for the Ascend rank-table scripts, MS_WORKER_NUM for msrun).
    """
    ms_mode = ms.GRAPH_MODE if mode == "GRAPH" else ms.PYNATIVE_MODE
    ms.set_context(mode=ms_mode)
    if distributed is None:
        distributed = launched_distributed()
    if device_target == "CPU" or (distributed and not os.environ.get("RANK_TABLE_FILE")):
        ms.set_device(device_target)  # msrun picks each worker's device
    else:
        # Standalone: DEVICE_ID or --device_id. A rank-table launch starts one process per DEVICE_ID,
        # and without it MindSpore would put them all on device 0.
        ms.set_device(device_target, env_int("DEVICE_ID", device_id, maximum=4095))
    if not distributed:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rank, group_size = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return rank, group_size
