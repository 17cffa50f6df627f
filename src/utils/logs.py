"""The launch environment and logging every entry point shares, without MindSpore (preprocess.py
and the launchers import no MindSpore)."""
import logging
import os
import sys
from typing import Optional

from src.config import ConfigError

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


def launched_distributed() -> bool:
    """True when a launcher (rank table script, msrun, mpirun) started more than one process."""
    return any(env_int(var, 1, minimum=1) > 1 for var in _LAUNCHER_VARS)


def setup_logging(output_dir: Optional[str] = None, rank: int = 0, name: str = "train") -> logging.Logger:
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
