"""Checkpoints that are never half-written: save to a temporary file, then rename.

A training checkpoint holds the network, the optimiser state (momenta, global step) and the
position in the schedule (epoch, step_in_epoch), so --resume continues exactly.
"""
import glob
import logging
import os
import re

import mindspore as ms

logger = logging.getLogger("fcos")

# Schedule position entries are stored as meta_<key>: the optimiser has a Parameter named
# global_step of its own, which a plain "global_step" entry would overwrite.
META_PREFIX = "meta_"


def save_checkpoint_atomic(cell_or_params, path, meta=None):
    """ms.save_checkpoint to ``path`` via a temporary file and os.replace (atomic on POSIX)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # ms.save_checkpoint appends .ckpt to other names
    try:
        append = {META_PREFIX + key: value for key, value in (meta or {}).items()}
        ms.save_checkpoint(cell_or_params, tmp, append_dict=append)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint_file(path):
    """Load a .ckpt into {name: Parameter}; one clear error for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return ms.load_checkpoint(path)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError variants for bad files
        raise ValueError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None


def split_meta(params):
    """Separate the schedule position entries from a loaded checkpoint dict."""
    meta = {}
    for name in [n for n in params if n.startswith(META_PREFIX)]:
        meta[name[len(META_PREFIX):]] = int(params.pop(name).asnumpy())
    return params, meta


def load_weights(network, path, strict_prefixes=()):
    """Load the network's parameters from ``path`` (extra entries such as optimiser momenta are
    ignored). Returns the names of network parameters the file did not hold; raises when any of
    them starts with one of ``strict_prefixes``."""
    params, _ = split_meta(load_checkpoint_file(path))
    missing, _ = ms.load_param_into_net(network, params)
    missing = [m for m in missing]
    critical = [m for m in missing if m.startswith(tuple(strict_prefixes))] if strict_prefixes else []
    if critical:
        raise ValueError(f"{path} lacks {len(critical)} parameters, e.g. {critical[0]}")
    return missing


class CheckpointKeeper:
    """Writes fcos-<epoch>_<step>.ckpt into a folder and keeps the newest ``keep`` of them."""

    PATTERN = re.compile(r"^fcos-(\d+)_(\d+)\.ckpt$")

    def __init__(self, folder, keep=5):
        self.folder = folder
        self.keep = max(int(keep), 1)

    def save(self, cell, epoch, step_in_epoch, global_step):
        path = os.path.join(self.folder, f"fcos-{epoch}_{global_step}.ckpt")
        save_checkpoint_atomic(cell, path, {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                            "global_step": global_step})
        for old in self.existing()[:-self.keep]:
            os.remove(old)
        return path

    def existing(self):
        """Checkpoints in the folder, oldest first."""
        found = []
        for path in glob.glob(os.path.join(self.folder, "fcos-*.ckpt")):
            match = self.PATTERN.search(os.path.basename(path))
            if match:
                found.append((int(match.group(2)), path))
        return [p for _, p in sorted(found)]

    def latest(self):
        paths = self.existing()
        return paths[-1] if paths else None
