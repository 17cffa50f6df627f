"""Checkpoints that are never half-written: save to a temporary file, then rename.

A training checkpoint holds the network, the optimiser state (momenta, global step) and the
position in the schedule (epoch, step_in_epoch), so --resume continues exactly.
"""
import dataclasses
import glob
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np

from src.utils.io import atomic_path, remove_stale_temporaries

logger = logging.getLogger("fcos")

# Schedule position entries are stored as meta_<key>: the optimiser has a Parameter named
# global_step of its own, which a plain "global_step" entry would overwrite.
META_PREFIX = "meta_"


def save_checkpoint_atomic(cell_or_params: Union[ms.nn.Cell, list], path: str,
                           meta: Optional[Dict[str, int]] = None) -> str:
    """ms.save_checkpoint to ``path`` (the name as given, .ckpt or not) via a temporary file and
    os.replace (atomic on POSIX)."""
    append = {META_PREFIX + key: value for key, value in (meta or {}).items()}
    with atomic_path(path, suffix=".ckpt") as tmp:  # MindSpore appends .ckpt to any other name
        ms.save_checkpoint(cell_or_params, tmp, append_dict=append)
    return path


def load_checkpoint_file(path: str) -> Dict[str, ms.Parameter]:
    """Load a .ckpt into {name: Parameter}; one clear error for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return ms.load_checkpoint(path)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError variants for bad files
        raise ValueError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None


def split_meta(params: Dict[str, ms.Parameter]) -> Tuple[Dict[str, ms.Parameter], Dict[str, int]]:
    """Separate the schedule position entries from a loaded checkpoint dict."""
    meta = {}
    for name in [n for n in params if n.startswith(META_PREFIX)]:
        meta[name[len(META_PREFIX):]] = int(params.pop(name).asnumpy())
    return params, meta


def fitting_params(own: Dict[str, ms.Parameter], params: Dict[str, ms.Parameter], path: str,
                   required_prefixes: Sequence[str] = ("",)) -> Dict[str, ms.Parameter]:
    """The entries of a loaded checkpoint ``params`` that fit the parameters ``own`` ({name:
    Parameter} of a cell) -> {name: Parameter} to load.

    ValueError naming ``path`` when, under required_prefixes, a parameter is absent or has
    another shape, or the file holds extra parameters of the same modules (a checkpoint of
    another architecture, depth or class count), or when an entry to load holds NaN/inf. Other
    entries of another shape are left out and logged: the classifier of a checkpoint with other
    classes, when only its backbone is wanted.
    """
    required = tuple(required_prefixes)
    absent = [name for name in own if name not in params and name.startswith(required)]
    if absent:
        raise ValueError(f"{path} lacks {len(absent)} parameters of the network, e.g. {absent[0]} "
                         "(a checkpoint of another backbone or model?)")
    modules = {name.split(".")[0] for name in own}
    extra = [name for name in params if name not in own and name.startswith(required)
             and name.split(".")[0] in modules]
    if extra:
        raise ValueError(f"{path} holds {len(extra)} parameters the network lacks, e.g. {extra[0]} "
                         "(a checkpoint of a deeper backbone or another model?)")
    reshaped = [name for name in own
                if name in params and tuple(params[name].shape) != tuple(own[name].shape)]
    for name in reshaped:
        if name.startswith(required):
            raise ValueError(f"{path} does not fit the network: {name} is {tuple(params[name].shape)} "
                             f"there, {tuple(own[name].shape)} here (another class_num, fpn_out_channels, "
                             "num_head_convs or backbone?)")
    if reshaped:
        logger.warning("%s: %d entries of another shape not loaded, e.g. %s", path, len(reshaped),
                       reshaped[0])
    selected = {name: params[name] for name in own if name in params and name not in reshaped}
    for name, value in selected.items():
        if not np.isfinite(value.asnumpy()).all():
            raise ValueError(f"{path} holds NaN/inf values in {name}")
    return selected


@dataclasses.dataclass
class TrainingCheckpoint:
    """A train.py checkpoint read for --resume: every saved parameter (network, momenta, the
    optimiser's step) and the schedule position meta (epoch, step_in_epoch, global_step)."""
    path: str
    params: dict
    meta: dict

    @property
    def epoch(self) -> int:
        """The epoch training continues in (0-based)."""
        return int(self.meta["epoch"])

    @property
    def global_batch(self) -> Optional[int]:
        """Images per step of the run that saved it (devices x batch_size); None in checkpoints
        written before it was recorded."""
        return int(self.meta["global_batch"]) if "global_batch" in self.meta else None


def read_training_checkpoint(path: str) -> "TrainingCheckpoint":
    """-> TrainingCheckpoint; ValueError naming the file when it is not a train.py checkpoint."""
    params, meta = split_meta(load_checkpoint_file(path))
    if not {"epoch", "step_in_epoch", "global_step"} <= set(meta):
        raise ValueError(f"{path} is not a train.py checkpoint (no schedule position); "
                         "use --pretrained_backbone or --ckpt_file for weights only")
    return TrainingCheckpoint(path, params, meta)


def load_weights(network: ms.nn.Cell, path: str, strict_prefixes: Sequence[str] = ()) -> None:
    """Load the network's parameters from ``path`` (extra entries such as optimiser momenta are
    ignored; see fitting_params for the checks: a missing parameter starting with one of
    ``strict_prefixes`` raises ValueError, others keep their initial values)."""
    params, _ = split_meta(load_checkpoint_file(path))
    ms.load_param_into_net(network, fitting_params(network.parameters_dict(), params, path, strict_prefixes))


class CheckpointKeeper:
    """Writes fcos-<epoch>_<step>.ckpt into a folder and keeps the newest ``keep`` of the files that
    this run wrote: checkpoints of other runs in the same folder (an earlier run, the run a resume
    started from) are never removed or overwritten. Where another run's file already has the name,
    this run's is fcos-<epoch>_<step>-<n>.ckpt with the first free n.
    """

    PATTERN = re.compile(r"^fcos-(\d+)_(\d+)(?:-(\d+))?\.ckpt$")

    def __init__(self, folder: str, keep: int = 5) -> None:
        self.folder = folder
        self.keep = max(int(keep), 1)
        self.written = []  # this run's checkpoints, oldest first
        if os.path.isdir(folder):
            for path in remove_stale_temporaries(folder, "fcos-*"):
                logger.info("removed %s, left by a save that did not finish", path)
            others = self.existing()
            if others:
                logger.info("%s holds %d checkpoints of earlier runs (newest %s); this run keeps them",
                            folder, len(others), os.path.basename(others[-1]))

    def _free_path(self, epoch: int, global_step: int) -> str:
        path = os.path.join(self.folder, f"fcos-{epoch}_{global_step}.ckpt")
        n = 1
        while os.path.exists(path) and path not in self.written:
            path = os.path.join(self.folder, f"fcos-{epoch}_{global_step}-{n}.ckpt")
            n += 1
        return path

    def save(self, cell: ms.nn.Cell, epoch: int, step_in_epoch: int, global_step: int, global_batch: int) -> str:
        """Save, then remove this run's checkpoints beyond the newest ``keep`` -> the path saved."""
        path = self._free_path(epoch, global_step)
        save_checkpoint_atomic(cell, path, {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                            "global_step": global_step, "global_batch": global_batch})
        if path in self.written:
            self.written.remove(path)
        self.written.append(path)
        for old in self.written[:-self.keep]:
            if os.path.exists(old):
                os.remove(old)
        self.written = self.written[-self.keep:]
        return path

    def existing(self) -> List[str]:
        """Checkpoints in the folder, of any run, by global step then modification time."""
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.folder), "fcos-*.ckpt")):
            match = self.PATTERN.search(os.path.basename(path))
            if match:
                found.append((int(match.group(2)), os.path.getmtime(path), path))
        return [p for _, _, p in sorted(found)]

    def latest(self) -> Optional[str]:
        """This run's newest checkpoint, else None."""
        return self.written[-1] if self.written else None


def newest_checkpoint(folder: str) -> Optional[str]:
    """The most recently written fcos-*.ckpt of folder (any run), else None: what a script that has
    just trained into folder evaluates next."""
    paths = glob.glob(os.path.join(glob.escape(folder), "fcos-*.ckpt"))
    return max(paths, key=os.path.getmtime) if paths else None


# best.ckpt records its AP in parts per million (checkpoint meta entries are integers)
BEST_AP_KEY = "best_ap_ppm"


def save_best(network: ms.nn.Cell, path: str, ap: float, meta: Dict[str, int]) -> str:
    """Write the network to path (best.ckpt) with its AP recorded (read_best_ap reads it back)."""
    return save_checkpoint_atomic(network, path, {**meta, BEST_AP_KEY: int(round(ap * 1e6))})


def read_best_ap(path: str) -> float:
    """The AP recorded in a best.ckpt, -1.0 when there is none or it holds no AP (written before it
    was recorded: any new evaluation replaces it)."""
    if not os.path.isfile(path):
        return -1.0
    try:
        _, meta = split_meta(load_checkpoint_file(path))
    except ValueError as err:
        logger.warning("%s", err)
        return -1.0
    return meta[BEST_AP_KEY] / 1e6 if BEST_AP_KEY in meta else -1.0
