"""Compile every graph a run needs up front, and keep the compiled graphs for the next run.

A GRAPH_MODE run compiles one graph per cell and input signature (a training step per pad shape:
~35 s for the small CPU configuration, ~45 s for R50). ``precompile`` compiles them all before
the first step, in a fixed order, so that no compilation stalls a running epoch, and with
``cache_root`` it stores them through MindSpore's compile cache so that the same run started
again loads them in seconds.

MindSpore's own cache (MS_COMPILER_CACHE_ENABLE) is not safe as it comes: it numbers graphs in
the order a process compiles them and checks only a hash of the entry script's dependencies
outside sys.path - not input shapes, constants, parameters, or this package's code. A run with
another class_num loaded the old graph and failed in ApplyMomentum; a run at another input size
ran on the old graph without a word. So here:
- the folder is named by a digest of everything that decides the graphs: this package's source,
  the entry script, MindSpore's version, the configuration, and for each planned graph its cell,
  train/eval mode, parameter shapes and input signature, in order;
- only the planned graphs are compiled with the cache on; graphs compiled later (an input the
  plan did not foresee) are compiled normally and never stored;
- MindSpore numbers cached graphs from 0 per process, so only a process's first ``precompile``
  uses the cache (later ones, e.g. in a test session, just compile);
- a new folder is written under a temporary name and renamed when all its graphs are in, so an
  interrupted run leaves no partial cache behind;
- data-parallel runs, and processes without an entry script file, do not use it.
The cached graphs hold no weights: a run loads a checkpoint into the same graph (tested). A cache
file MindSpore cannot read is compiled anew (seen with a file overwritten by garbage).
"""
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from src.config import Config, schema
from src.ops.backend import backend_of

logger = logging.getLogger("fcos")

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENABLE, _PATH = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"

# Where MindSpore puts a single process's cache files inside the cache path.
RANK_DIR = "rank_0"
_state = {"used": False}


def graph_config(cfg: Config) -> Dict[str, Any]:
    """The configuration values that can reach a graph: every schema key but the run_only group
    (paths, logging and checkpoint cadence), so entry-point flags and config_path stay out too."""
    run_only = set(schema().group("run_only"))
    return {key: value for key, value in sorted(cfg.items()) if key in schema().values and key not in run_only}


class PlannedGraph:
    """One graph to compile: ``cell`` in train (``training=True``) or eval mode on inputs of the
    given (shape, NumPy dtype) signature."""

    def __init__(self, cell: ms.nn.Cell, inputs: Sequence[Tuple[Sequence[int], Any]], training: bool) -> None:
        self.cell = cell
        self.inputs = [(tuple(int(d) for d in shape), np.dtype(dtype)) for shape, dtype in inputs]
        self.training = training

    def describe(self) -> Dict[str, Any]:
        """JSON-able identity: cell class, mode, parameters (name, shape, dtype) and inputs."""
        params = [(p.name, list(p.shape), str(p.dtype)) for p in self.cell.get_parameters()]
        return {"cell": type(self.cell).__name__, "training": self.training, "params": params,
                "backend": backend_of(self.cell),
                "inputs": [(list(shape), dtype.name) for shape, dtype in self.inputs]}

    def compile(self) -> None:
        self.cell.set_train(self.training)
        self.cell.compile(*(ms.Tensor(np.zeros(shape, dtype)) for shape, dtype in self.inputs))


def source_digest() -> str:
    """sha256 over this package's Python files and the entry script."""
    files = sorted(glob.glob(os.path.join(PACKAGE_DIR, "**", "*.py"), recursive=True))
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and os.path.isfile(main):
        files.append(os.path.abspath(main))
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, os.path.dirname(PACKAGE_DIR)).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def plan_digest(cfg: Config, graphs: Sequence[PlannedGraph]) -> str:
    """Name of the cache folder for this configuration and sequence of graphs (16 hex digits)."""
    identity = {"source": source_digest(), "mindspore": ms.__version__,
                "config": graph_config(cfg),
                "graphs": [g.describe() for g in graphs]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _compile_all(graphs):
    """Compile in order, then give every cell back the train/eval mode it had (in reverse order,
    as cells share their network: the first cell's mode wins)."""
    modes = [g.cell.training for g in graphs]
    for graph in graphs:
        graph.compile()
    for graph, mode in reversed(list(zip(graphs, modes))):
        graph.cell.set_train(mode)


def _compile_cached(graphs, folder):
    """Compile with MindSpore's cache on: load from ``folder`` when its RANK_DIR is complete,
    otherwise write a new one under a temporary name and rename it into place."""
    hit = os.path.isdir(os.path.join(folder, RANK_DIR))
    target = folder if hit else f"{folder}.tmp-{os.getpid()}"
    os.environ[_ENABLE], os.environ[_PATH] = "1", target
    try:
        _compile_all(graphs)
    except BaseException:
        if not hit:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        del os.environ[_ENABLE], os.environ[_PATH]
    if not hit:
        os.makedirs(folder, exist_ok=True)
        try:
            os.rename(os.path.join(target, RANK_DIR), os.path.join(folder, RANK_DIR))
        except OSError:  # another process put the same graphs there first
            pass
        shutil.rmtree(target, ignore_errors=True)
    return hit


def precompile(graphs: Sequence[PlannedGraph], cfg: Config, cache_root: Optional[str] = None) -> str:
    """Compile ``graphs`` (PlannedGraph list) now; with ``cache_root`` load them from, or store
    them in, <cache_root>/<plan_digest>. No-op in PYNATIVE mode. Returns "loaded", "stored",
    "compiled" or "skipped"."""
    if ms.get_context("mode") != ms.GRAPH_MODE or not graphs:
        return "skipped"
    start = time.perf_counter()
    # MindSpore hashes the entry script's imports: it needs one (not `python -c`, not a REPL).
    has_entry_script = bool(sys.argv) and os.path.isfile(sys.argv[0])
    use_cache = bool(cache_root) and has_entry_script and not _state["used"] and _ENABLE not in os.environ
    if use_cache:
        _state["used"] = True
        folder = os.path.join(cache_root, plan_digest(cfg, graphs))
        outcome = "loaded" if _compile_cached(graphs, folder) else "stored"
        where = f" ({outcome} {folder})"
    else:
        _compile_all(graphs)
        outcome, where = "compiled", ""
    logger.info("%d graphs ready in %.1f s%s", len(graphs), time.perf_counter() - start, where)
    return outcome
