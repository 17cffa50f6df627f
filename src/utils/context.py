"""MindSpore context and distributed setup shared by every entry point."""
import logging
import os
import sys

import mindspore as ms

from src.config import ConfigError

logger = logging.getLogger("fcos")

_LAUNCHER_VARS = ("RANK_SIZE", "MS_WORKER_NUM", "OMPI_COMM_WORLD_SIZE")


def env_int(name: str, default: int, minimum: int = 0, maximum: int = 1 << 20) -> int:
    """An integer environment variable (default when unset or empty); ValueError in one line when
    it is not an integer in [minimum, maximum] (a ConfigError: the entry points print it as one line)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not minimum <= value <= maximum:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer in [{minimum}, {maximum}]")
    return value


def launched_distributed():
    """True when a launcher (rank table script, msrun, mpirun) started more than one process."""
    return any(env_int(var, 1, minimum=1) > 1 for var in _LAUNCHER_VARS)


def init_context(device_target, mode="GRAPH", device_id=0, distributed=None):
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


def setup_logging(output_dir=None, rank=0, name="train"):
    """Log to stdout and, when output_dir is given, to <output_dir>/<name>[_rank<r>].log; lines of
    a multi-process run carry "[rank r]" (msrun shows all workers' output in one console)."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        suffix = f"_rank{rank}" if rank else ""
        handlers.append(logging.FileHandler(os.path.join(output_dir, f"{name}{suffix}.log")))
    tag = f"[rank {rank}] " if launched_distributed() else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s", "%H:%M:%S")
    log = logging.getLogger("fcos")
    log.handlers.clear()
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log
